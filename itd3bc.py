"""ITD3+BC: independent TD3+BC (Fujimoto & Gu 2021) per agent, and MATD3+BC (`--mixer`), paper §5.1.

Each agent i has its own (no parameter sharing, no agent id) deterministic actor π_i(h_i, o_i) with a
tanh output, double critic Q1_i, Q2_i(h_i, o_i, a_i), and target copies of both (docs/deviations.md §19.5).
h_i is agent i's 10-step (o_i, a_i) history, encoded by the one-layer self-attention +
soft-attention-pooling encoder of MOMA-PPO (paper §3.2, docs/deviations.md §6) on partially observable
tasks, with a target encoder soft-updated with τ. Every agent learns from the team reward r.

ITD3+BC (default; the authors' `itd3` with td3_omar_coeff = 0, td3_bc_coeff = 2.5):

    critic:  L_Q = Σ_k E[(y - Qk_i(x_i, a_i))²],  y = r + γ (1 - terminal) min_k Qk'_i(x'_i, ã'_i),
             ã'_i = clip(π'_i(x'_i) + clip(N(0, 0.2²), -0.5, 0.5), -1, 1)          (TD3 target smoothing)
    actor:   L_π = -λ_i E[Q1_i(x_i, π_i(x_i))] + E[Σ_dims (π_i(x_i) - a_i)²],  λ_i = α / E|Q1_i| (detached)
             updated every 2 critic steps, together with the soft target updates (τ = 0.005).

MATD3+BC (`--mixer`, Table 4a): centralised training with a QMIX-mixed critic,
Q_tot(s, a) = Σ_i w_i(s) Q_i(x_i, a_i) + b(s), w_i = |MLP(s)_i| >= 0 (monotonic, so each agent's greedy
action maximises Q_tot: QMIX's individual-global-max condition). The critic loss uses Q_tot (both heads
share the mixer; target mixer for y), the actors jointly maximise Q1_tot(s, π_1(x_1), ..., π_n(x_n))
with λ = α / E|Q1_tot|, plus each agent's BC term. Paper vs authors' code (docs/deviations.md §14): the
authors' mixers left w unconstrained; the paper calls it QMIX decomposition, and we follow the paper.
The mixer sees the global state only (QMIX); the actions enter through the Q_i, so ∂Q_tot/∂a_i flows
through agent i's own critic. `--action-aware-mixer` feeds it the joint action too (w_i(s, a), b(s, a)), the
authors' choice for MAIQL's Q-mixer, so that the team value can couple the agents' actions.

Other choices (not fixed by the paper; a researcher comparing offline MARL methods would expect these):
* the history encoder is trained by the critic loss only; actors read its (detached) embedding, and
  the target actor reads the target encoder's. Histories are on for partially observable tasks
  (`--history-len` None), off for fully observable ones where o_i = s is Markov.
* rewards are raw (the authors' TD3 family did not normalise them, docs/deviations.md §18); no state
  normalisation (docs/deviations.md §19.5); no gradient clipping.
* continuous actions only: the coordination game's discrete baselines are iql.py, maiql.py and ibc.py.
* all agents' networks are stacks of per-agent weights [n, in, out] run with one bmm per layer.
* one fused Adam kernel per optimizer step (torch's `fused=True`) and one foreach lerp per soft target update.
* `--bf16`: the updates' matrix products in bfloat16 (torch.autocast), every network's output layer, the losses,
  the weights and Adam in fp32; off by default (docs/benchmarks.md, "bfloat16": speed and paired scores).

    python itd3bc.py --env reacher --obs all-observant
    python itd3bc.py --env ant --obs partial --dataset expert --mixer
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pathlib
import subprocess
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import envs


@dataclasses.dataclass
class Args:
    env: envs.EnvName = "reacher"
    """reacher or ant (continuous actions)"""
    obs: Optional[envs.ObsName] = None
    """observation function (None = the env's default: coordination full, reacher all-observant, ant full)"""
    dataset: Optional[str] = None
    """dataset name of the env (None = the env's default: coordination unfavorable, reacher expert-mix, ant medium)"""
    mixer: bool = False
    """MATD3+BC: centralised critic training with a monotonic QMIX mixer over the agents' Q_i"""
    action_aware_mixer: bool = False
    """with --mixer: the mixer also reads the joint action, w_i(s, a) and b(s, a), as the authors' MAIQL Q-mixer
    does (their `action_aware_mixer`; maiql.py). Off (QMIX's state-only mixer), Q_tot is a sum of per-agent terms
    in the actions, so no actor's gradient depends on its partner's action (docs/diagnosis.md point 29)"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the run (default: this file's name, CleanRL's convention); its records are filed under the
    file's name, so a copy of the script never mixes its results with the original's"""
    seed: int = 1
    cuda: bool = False
    """use the GPU (CPU by default)"""
    torch_threads: int = 1
    """torch CPU threads: 1 is fastest for these batch-256 networks on a shared 2-core machine"""
    bf16: bool = False
    """run the updates' matrix products in bfloat16 (torch.autocast; output layers, losses, weights and Adam stay
    fp32): 1.4-1.9x the gradient steps/s on Ant with this CPU's AVX512-BF16 (docs/benchmarks.md, "bfloat16")"""
    total_steps: Optional[int] = None
    """critic gradient steps (authors: 1,000,001). None = a budget that fits a 2-core CPU: 50k without
    histories (fully observable), 10k with the history encoder (partially observable), which dominates
    the cost. Measured with 1 thread at batch 256 on the shared 2-core machine (load 6-10): ITD3+BC
    ant full 9.8 updates/s, MATD3+BC ant full 13.1, ITD3+BC ant partial 4.0, MATD3+BC ant partial 3.8; an
    unshared machine is expected to be several times faster (not measured)"""
    batch_size: int = 256
    hidden: int = 256
    """width of the two hidden layers of every MLP"""
    history_len: Optional[int] = None
    """history length (None = 10 on partially observable tasks, 0 on fully observable ones)"""
    history_dim: int = 128
    """width of the history encoder (docs/deviations.md §6)"""
    learning_rate: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    """soft target-update coefficient"""
    policy_noise: float = 0.2
    """std of the target-policy smoothing noise"""
    noise_clip: float = 0.5
    policy_freq: int = 2
    """critic steps per actor (and target) update"""
    alpha: float = 2.5
    """TD3+BC α: λ = α / mean|Q|"""
    eval_every: int = 5_000
    """gradient steps between greedy evaluations (10 episodes); 0 disables"""
    eval_episodes: int = 100
    """greedy episodes of the final evaluation"""
    checkpoint_every: int = 10_000
    """gradient steps between atomic checkpoints"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint"""
    cross_play_with: tuple[str, ...] = ()
    """run folders of other finished runs of this method and task (e.g. the other seeds): after the final evaluation
    (at once, for a finished run given with --resume), play teams stitched from this run's agents and each one's
    and write cross_play.json (envs.py, "Cross-play"; off by default, as in the authors' evaluation code)"""
    run_dir: Optional[str] = None
    """fixed run folder (default: runs/<env>__<obs>__<dataset>__<exp_name>__<seed>__<unix time>)"""
    results_dir: Optional[str] = None
    """when the run finishes, copy its small record (summary.json, curve.csv, command.txt; no checkpoints) to
    <results-dir>/<env>__<obs>__<dataset>__<algorithm>__<seed>/ (run_all.sh passes results/<table>)"""
    budget: Optional[str] = None
    """name of the budget the run belongs to (run_all.sh's BUDGET); recorded in summary.json"""


# --------------------------------------------------------------------------------------------------
# Networks. Every per-agent network is a stack of per-agent weights [n, in, out] and runs as one bmm
# per layer for all agents; agents with smaller inputs see zero-padded inputs, which is exactly a
# smaller per-agent network.
# --------------------------------------------------------------------------------------------------
class AgentsMLP(nn.Module):
    """n independent MLPs in -> hidden -> hidden -> out, ReLU; [n, B, in] -> [n, B, out]."""

    def __init__(self, n: int, sizes: list[int]):
        super().__init__()
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for i, o in zip(sizes[:-1], sizes[1:]):
            layers = [nn.Linear(i, o) for _ in range(n)]  # PyTorch's default init, per agent
            self.weights.append(nn.Parameter(torch.stack([l.weight.detach().T for l in layers])))
            self.biases.append(nn.Parameter(torch.stack([l.bias.detach() for l in layers])[:, None, :]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.relu(torch.baddbmm(b, x, w)) if k < last else output_layer(b, x, w)
        return x


def output_layer(b: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """b + x w for a network's output layer, always in fp32. Under --bf16's autocast the hidden layers' products
    run in bfloat16, whose 8-bit mantissa would round a Q-value of 300 to a multiple of 2, coarser than the TD
    errors the critic learns from; without autocast this is plain baddbmm."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.baddbmm(b, x.to(w.dtype), w)


class AgentsHistoryEncoder(nn.Module):
    """Per-agent history encoder of MOMA-PPO (paper §3.2, docs/deviations.md §6), batched over agents.

    [n, B, H, in] -> [n, B, d]: linear embedding + sinusoidal positions (0 = oldest), one single-head
    self-attention layer with residual + LayerNorm, then soft-attention pooling
    Σ_s softmax_s(qᵀ tanh(W_k H_s)) H_s. Padded (all-zero) steps are not masked, as in the authors'
    code (docs/deviations.md §6).
    """

    def __init__(self, n: int, in_dim: int, length: int, d: int = 128):
        super().__init__()
        self.d = d
        self.embed = AgentsMLP(n, [in_dim, d])
        self.qkv = AgentsMLP(n, [d, 3 * d])
        self.ln_weight = nn.Parameter(torch.ones(n, 1, 1, d))
        self.ln_bias = nn.Parameter(torch.zeros(n, 1, 1, d))
        self.pool_key = nn.Parameter(torch.stack([nn.Linear(d, d, bias=False).weight.detach().T for _ in range(n)]))
        self.pool_query = nn.Parameter(torch.randn(n, d, 1))
        position = torch.arange(length, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
        pe = torch.zeros(length, d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq)
        self.register_buffer("positions", pe)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, B, H, _ = h.shape
        (w_embed,), (b_embed,), (w_qkv,), (b_qkv,) = self.embed.weights, self.embed.biases, self.qkv.weights, self.qkv.biases
        h = h.reshape(n, B * H, -1)
        x = torch.baddbmm(b_embed, h, w_embed).reshape(n, B, H, self.d) + self.positions
        # qkv(x) = h (W_e W_qkv) + ((b_e + pos) W_qkv + b_qkv): the same function with the two linear maps
        # multiplied first, so each step is projected from its (o, a) pair (17 wide on PO Ant) instead of from the
        # 128-wide embedding: ~7x fewer FLOPs in the encoder's largest GEMM (docs/benchmarks.md)
        per_position = torch.baddbmm(b_qkv, b_embed + self.positions, w_qkv)  # [n, H, 3d]
        qkv = torch.bmm(h, torch.bmm(w_embed, w_qkv)).reshape(n, B, H, 3 * self.d) + per_position[:, None]
        q, k, v = qkv.reshape(n * B, H, 3 * self.d).split(self.d, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.d), dim=-1) @ v
        x = F.layer_norm(x + attn.reshape(n, B, H, self.d), (self.d,)) * self.ln_weight + self.ln_bias
        scores = torch.bmm(torch.tanh(torch.bmm(x.reshape(n, B * H, self.d), self.pool_key)), self.pool_query)
        weights = torch.softmax(scores.reshape(n, B, H, 1), dim=2)
        return (weights * x).sum(2)


class Mixer(nn.Module):
    """QMIX-style monotonic mixer: Q_tot = Σ_i |w_i(s)| Q_i + b(s), w and b from one 256-256 MLP of s.

    Paper §5.1 ("QMIX value decomposition"): |w| keeps ∂Q_tot/∂Q_i >= 0. The authors' code left w
    unconstrained (docs/deviations.md §14); we follow the paper.
    """

    def __init__(self, state_dim: int, n: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n + 1))

    def forward(self, values: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """values [..., n, B], states [B, S] -> [..., B]."""
        out = self.net[-1]  # the output layer in fp32 (output_layer)
        with torch.autocast(states.device.type, enabled=False):
            wb = F.linear(self.net[:-1](states).to(out.weight.dtype), out.weight, out.bias)
        return (wb[:, :-1].abs().T * values).sum(-2) + wb[:, -1]


class TD3Agents(nn.Module):
    """All agents' history encoders, deterministic tanh actors and double critics."""

    def __init__(self, n: int, obs_dim: int, action_dim: int, hidden: int, history_len: int, history_in: int,
                 history_dim: int):
        super().__init__()
        self.n, self.action_dim = n, action_dim
        self.encoder = AgentsHistoryEncoder(n, history_in, history_len, history_dim) if history_len > 0 else None
        x_dim = obs_dim + (history_dim if history_len > 0 else 0)
        self.actor = AgentsMLP(n, [x_dim, hidden, hidden, action_dim])
        self.critic = AgentsMLP(2 * n, [x_dim + action_dim, hidden, hidden, 1])  # [Q1_0..Q1_n-1, Q2_0..Q2_n-1]

    def features(self, obs: torch.Tensor, hist: Optional[torch.Tensor], encoder: Optional[nn.Module] = None) -> torch.Tensor:
        """obs [n, B, o], hist [n, B, H, d] -> per-agent input [n, B, (emb,) o] (embedding first, docs/deviations.md §6)."""
        encoder = self.encoder if encoder is None else encoder
        return obs if self.encoder is None else torch.cat([encoder(hist), obs], dim=-1)

    def act(self, x: torch.Tensor, actor: Optional[AgentsMLP] = None) -> torch.Tensor:
        return torch.tanh((self.actor if actor is None else actor)(x))

    def q_values(self, x: torch.Tensor, actions: torch.Tensor, critic: Optional[AgentsMLP] = None) -> torch.Tensor:
        """x [n, B, x], actions [n, B, a] -> [2, n, B] (Q1_i, Q2_i)."""
        critic = self.critic if critic is None else critic
        return critic(torch.cat([x, actions], -1).repeat(2, 1, 1)).reshape(2, self.n, x.shape[1])

    def q1(self, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q1_i only (the actor's objective), [n, B] — half the cost of q_values. The critic's weights are
        detached: the actor step differentiates Q1 with respect to the actions only."""
        w, b = self.critic.weights, self.critic.biases
        h = torch.cat([x, actions], -1)
        last = len(w) - 1
        for k in range(len(w)):
            wk, bk = w[k][: self.n].detach(), b[k][: self.n].detach()
            h = torch.relu(torch.baddbmm(bk, h, wk)) if k < last else output_layer(bk, h, wk)
        return h.squeeze(-1)


def td3bc_lambda(q: torch.Tensor, alpha: float) -> torch.Tensor:
    """TD3+BC's λ = α / mean|Q| over the batch (detached: it only rescales the Q term). q: [..., B]."""
    return alpha / q.abs().mean(-1).detach().clamp(min=1e-6)


def td3bc_actor_loss(q_pi: torch.Tensor, pi: torch.Tensor, data_actions: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per learner: -λ mean Q(s, π(s)) + mean Σ_dims (π(s) - a)² (Fujimoto & Gu 2021, docs/deviations.md §19.5).

    q_pi [L, B] (L learners: the n agents, or 1 mixed team value), pi / data_actions [n, B, a];
    the BC term is summed over agents."""
    lam = td3bc_lambda(q_pi, alpha)
    return -(lam * q_pi.mean(-1)).sum() + (pi - data_actions).pow(2).sum(-1).mean(-1).sum()


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - τ) target + τ source, one foreach kernel over all the parameters."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).parent,
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return "unknown"


def pad_stack(arrays: list, width: int) -> torch.Tensor:
    """Per-agent [..., d_i] -> zero-padded [n, ..., width] float32 tensor."""
    return torch.stack([F.pad(torch.as_tensor(np.asarray(a), dtype=torch.float32), (0, width - a.shape[-1]))
                        for a in arrays])


class ReplayData:
    """The offline dataset on the device: per-agent fields stacked [n, N, width] (zero-padded to a common
    width) so that a minibatch is one gather for all agents; histories are gathered from the (o_i, a_i)
    table with the dataset's history index (row N = the all-zero padding row)."""

    def __init__(self, data: envs.OfflineData, obs_dim: int, hist_dim: int, history_len: int, device: torch.device):
        dev, self.size = device, len(data)
        self.states = torch.as_tensor(data.states, device=dev)
        self.next_states = torch.as_tensor(data.next_states, device=dev)
        self.rewards = torch.as_tensor(data.rewards, dtype=torch.float32, device=dev)
        self.terminals = torch.as_tensor(data.terminals, dtype=torch.float32, device=dev)
        self.obs = pad_stack(data.observations, obs_dim).to(dev)
        self.next_obs = pad_stack(data.next_observations, obs_dim).to(dev)
        self.actions = torch.as_tensor(np.stack(data.actions), dtype=torch.float32, device=dev)
        self.history_len = history_len
        if history_len > 0:
            self.table = pad_stack([data.history_table(i) for i in range(data.n_agents)], hist_dim).to(dev)
            self.hist_index = torch.as_tensor(data.history_index, device=dev)
            self.next_hist_index = torch.as_tensor(data.next_history_index, device=dev)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict:
        rows = torch.randint(0, self.size, (batch_size,), device=self.states.device, generator=generator)
        hist = lambda index: None if self.history_len == 0 else self.table[:, index[rows]]  # noqa: E731
        return dict(states=self.states[rows], next_states=self.next_states[rows], rewards=self.rewards[rows],
                    terminals=self.terminals[rows], obs=self.obs[:, rows], next_obs=self.next_obs[:, rows],
                    actions=self.actions[:, rows], hist=hist(self.hist_index) if self.history_len else None,
                    next_hist=hist(self.next_hist_index) if self.history_len else None)


def make_learner(args: Args, n: int, obs_dim: int, action_dim: int, history_len: int, hist_dim: int, state_dim: int,
                 device: torch.device) -> dict:
    """The agents (encoders, actors, critics), the MATD3+BC mixer, their target copies and the two optimizers."""
    agents = TD3Agents(n, obs_dim, action_dim, args.hidden, history_len, hist_dim, args.history_dim).to(device)
    mixer_in = state_dim + (n * action_dim if args.action_aware_mixer else 0)
    mixer = Mixer(mixer_in, n, args.hidden).to(device) if args.mixer else None
    target_actor = copy.deepcopy(agents.actor).requires_grad_(False)
    target_critic = copy.deepcopy(agents.critic).requires_grad_(False)
    target_encoder = copy.deepcopy(agents.encoder).requires_grad_(False) if agents.encoder is not None else None
    target_mixer = copy.deepcopy(mixer).requires_grad_(False) if mixer is not None else None
    critic_params = list(agents.critic.parameters()) + (list(agents.encoder.parameters()) if agents.encoder else [])
    critic_params += list(mixer.parameters()) if mixer is not None else []
    critic_optimizer = torch.optim.Adam(critic_params, lr=args.learning_rate, fused=True)
    actor_optimizer = torch.optim.Adam(agents.actor.parameters(), lr=args.learning_rate, fused=True)
    return dict(agents=agents, mixer=mixer, target_actor=target_actor, target_critic=target_critic,
                target_encoder=target_encoder, target_mixer=target_mixer, critic_optimizer=critic_optimizer,
                actor_optimizer=actor_optimizer)


def mixer_input(states: torch.Tensor, actions: torch.Tensor, action_aware: bool) -> torch.Tensor:
    """The mixer's input: states [B, S], or with an action-aware mixer [states, joint action] [B, S + n·a]
    (actions [n, B, a], agent-major in the joint action)."""
    if not action_aware:
        return states
    return torch.cat([states, actions.transpose(0, 1).reshape(states.shape[0], -1)], dim=-1)


def update(learner: dict, b: dict, step: int, args: Args, generator: torch.Generator) -> dict:
    """One critic gradient step on minibatch b (the `step`-th, counted from 1), and every policy_freq-th step
    an actor step and the soft target updates. Returns the losses (tensors; actor_loss only on actor steps)."""
    agents, mixer, target_actor, target_critic, target_encoder, target_mixer, critic_optimizer, actor_optimizer = (
        learner[k] for k in ("agents", "mixer", "target_actor", "target_critic", "target_encoder", "target_mixer",
                             "critic_optimizer", "actor_optimizer"))
    device = b["rewards"].device
    with torch.no_grad():
        # TD3 target: smoothed target-policy action at s', min of the two target critics.
        x_next = agents.features(b["next_obs"], b["next_hist"], target_encoder)
        noise = (torch.randn(b["actions"].shape, device=device, generator=generator) * args.policy_noise).clamp(
            -args.noise_clip, args.noise_clip)
        next_actions = (agents.act(x_next, target_actor) + noise).clamp(-1.0, 1.0)
        q_next = agents.q_values(x_next, next_actions, target_critic)  # [2, n, B]
        if mixer is not None:
            q_next = target_mixer(q_next, mixer_input(b["next_states"], next_actions, args.action_aware_mixer))  # [2, B]
        y = b["rewards"] + args.gamma * (1.0 - b["terminals"]) * q_next.min(0).values  # [n, B] or [B]
    x = agents.features(b["obs"], b["hist"])
    q = agents.q_values(x, b["actions"])  # [2, n, B]
    if mixer is not None:
        q = mixer(q, mixer_input(b["states"], b["actions"], args.action_aware_mixer))  # [2, B]: Q1_tot, Q2_tot share it
    critic_loss = (y - q).pow(2).mean(-1).sum()  # Σ over heads (and agents) of the mean squared TD error
    critic_optimizer.zero_grad(set_to_none=True)
    critic_loss.backward()
    critic_optimizer.step()
    losses = dict(critic_loss=critic_loss, q=q)

    if step % args.policy_freq == 0:
        x_actor = x.detach()  # the encoder is the critic's; actors read its embedding
        pi = agents.act(x_actor)
        q_pi = agents.q1(x_actor, pi)  # [n, B]
        if mixer is not None:
            # [1, B]: all actors jointly maximise Q1_tot (through the mixer too when it reads the joint action)
            q_pi = mixer(q_pi, mixer_input(b["states"], pi, args.action_aware_mixer))[None]
        actor_loss = td3bc_actor_loss(q_pi, pi, b["actions"], args.alpha)
        actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()  # also reaches the mixer's grads; they are zeroed before its next step
        actor_optimizer.step()
        losses["actor_loss"] = actor_loss
        soft_update(target_actor, agents.actor, args.tau)
        soft_update(target_critic, agents.critic, args.tau)
        if target_encoder is not None:
            soft_update(target_encoder, agents.encoder, args.tau)
        if mixer is not None:
            soft_update(target_mixer, mixer, args.tau)
    return losses


def main(args: Args) -> dict:
    if args.env == "coordination":
        raise envs.MomaError("itd3bc.py is continuous-action only (reacher, ant); the coordination game's "
                             "discrete-action baselines are iql.py, maiql.py and ibc.py")
    obs_name = envs.check_names(args.env, args.obs, args.dataset)
    dataset = args.dataset or envs.DEFAULT_DATASET[args.env]
    # Every argument is checked before any folder is made or any data is loaded (docs/usage.md, "Run safety").
    envs.check_args(args, at_least_one=("total_steps", "batch_size", "hidden", "history_dim", "eval_episodes", "policy_freq"),
                    non_negative=("history_len", "eval_every", "checkpoint_every", "policy_noise", "noise_clip"),
                    positive=("learning_rate", "tau", "alpha"), between={"gamma": (0.0, 1.0), "tau": (0.0, 1.0)})
    if args.action_aware_mixer and not args.mixer:
        raise envs.MomaError("--action-aware-mixer needs --mixer (it changes MATD3+BC's mixer; ITD3+BC has none)")
    name = pathlib.Path(__file__).stem  # the method its records are filed under: this file's name
    # --mixer: MATD3+BC, the multi-agent (mixed-critic) version of the independent learners (itd3bc -> matd3bc)
    algorithm = "ma" + name.removeprefix("i") if args.mixer else name
    exp_name = algorithm if args.exp_name == name else args.exp_name
    given_run_dir = args.run_dir is not None
    run_dir = pathlib.Path(args.run_dir) if given_run_dir else envs.default_run_dir(
        args.env, obs_name, dataset, exp_name, args.seed)
    ckpt_path = run_dir / "checkpoint.pt"
    if args.resume and not ckpt_path.exists():
        raise envs.MomaError(f"no checkpoint at {ckpt_path} to resume; drop --resume to start a new run")
    envs.check_cross_play_partners(args.cross_play_with, run_dir)  # a wrong path fails now, not after training

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cudnn.deterministic = True
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if args.cuda and device.type == "cpu":
        raise envs.MomaError("--cuda given but torch sees no GPU; drop --cuda")
    from torch.utils.tensorboard import SummaryWriter

    history_len = args.history_len
    if history_len is None:
        history_len = envs.HISTORY_LEN if (args.env, obs_name) in envs.PARTIALLY_OBSERVABLE else 0
    total_steps = args.total_steps if args.total_steps is not None else (50_000 if history_len == 0 else 10_000)
    ck = None
    if args.resume:  # refuse another configuration before any work (the checkpoint records the run's arguments)
        ck = envs.load_checkpoint(ckpt_path, device)
        envs.check_resume(ck["args"], vars(args), "total_steps", ck.get("step", 0), total_steps)
    data = envs.load_dataset(args.env, dataset, obs_name, history_len=max(history_len, 1))
    n = data.n_agents
    adims = envs.action_dims(args.env)
    if len(set(adims)) != 1:
        raise envs.MomaError(f"itd3bc.py needs equal per-agent action dims, got {adims}")
    action_dim = adims[0]
    obs_dim, hist_dim = max(envs.obs_dims(args.env, obs_name)), max(envs.history_dims(args.env, obs_name))
    buffer = ReplayData(data, obs_dim, hist_dim, history_len, device)

    learner = make_learner(args, n, obs_dim, action_dim, history_len, hist_dim, data.states.shape[1], device)
    agents, mixer, target_actor, target_critic, target_encoder, target_mixer, critic_optimizer, actor_optimizer = (
        learner[k] for k in ("agents", "mixer", "target_actor", "target_critic", "target_encoder", "target_mixer",
                             "critic_optimizer", "actor_optimizer"))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    step, wall_before = 0, 0.0
    if ck is not None:
        if ck.get("dataset_fingerprint", data.fingerprint) != data.fingerprint:
            raise envs.MomaError(f"dataset {data.dataset_id} was rebuilt with other data since checkpoint {ckpt_path} "
                                 f"was written; start a new run without --resume")
        try:
            agents.load_state_dict(ck["agents"])
            target_actor.load_state_dict(ck["target_actor"])
            target_critic.load_state_dict(ck["target_critic"])
            if target_encoder is not None:
                target_encoder.load_state_dict(ck["target_encoder"])
            if mixer is not None:
                mixer.load_state_dict(ck["mixer"])
                target_mixer.load_state_dict(ck["target_mixer"])
            critic_optimizer.load_state_dict(ck["critic_optimizer"])
            actor_optimizer.load_state_dict(ck["actor_optimizer"])
            step, wall_before = ck["step"], ck["wall_s"]
            generator.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            np.random.set_state(ck["numpy_rng"])
        except Exception as e:
            raise envs.MomaError(f"checkpoint {ckpt_path} does not fit this run ({type(e).__name__}: {str(e)[:200]}); "
                                 f"start a new run without --resume") from None
        envs.check_weights(step, agents, target_actor, target_critic, target_encoder, mixer, target_mixer,
                           what=f"checkpoint {ckpt_path} holds")
        del ck
        print(f"resumed {run_dir} at step {step}")
    envs.check_free_space(run_dir, 4 * envs.tensor_bytes(agents, mixer))  # weights, 2 Adam moments, targets
    # The record of this table cell (see envs.py, "Run records"): command, eval curve, fingerprints.
    record = envs.record_name(args.env, obs_name, dataset, algorithm, args.seed)
    envs.check_results_dir(args.results_dir, record, args.budget)
    envs.make_run_dir(run_dir, given_run_dir)  # only now: an argument or data error leaves no folder behind
    code = envs.code_fingerprint(__file__)  # hashed before training: the code that runs, even if edited meanwhile
    envs.write_command(run_dir, args.resume)
    curve = envs.CurveLog(run_dir, step if args.resume else None)
    # training.csv: losses and the critic's mean value on dataset actions every 1000 steps, and whether it diverged
    # (envs.CriticLog) (the critic loss sums the two heads' (and, without a mixer, n agents') mean squared TD errors)
    critic_log = envs.CriticLog(run_dir, buffer.rewards.cpu().numpy(), args.gamma, td_terms=2 if args.mixer else 2 * n,
                                extra_columns=("actor_loss",), resume_step=step if args.resume else None)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    t0 = time.time()

    def save_checkpoint():
        # a diverged network is never checkpointed
        envs.check_weights(step, agents, target_actor, target_critic, target_encoder, mixer, target_mixer)
        envs.save_checkpoint(dict(agents=agents.state_dict(), target_actor=target_actor.state_dict(),
                                  target_critic=target_critic.state_dict(),
                                  target_encoder=None if target_encoder is None else target_encoder.state_dict(),
                                  mixer=None if mixer is None else mixer.state_dict(),
                                  target_mixer=None if mixer is None else target_mixer.state_dict(),
                                  critic_optimizer=critic_optimizer.state_dict(), actor_optimizer=actor_optimizer.state_dict(),
                                  step=step, wall_s=wall_before + time.time() - t0, generator=generator.get_state(),
                                  torch_rng=torch.get_rng_state(), numpy_rng=np.random.get_state(), args=vars(args),
                                  dataset_fingerprint=data.fingerprint), ckpt_path)

    def greedy_act(observations, histories, agents=agents):  # agents=: another run's team, for cross-play
        with torch.no_grad():
            obs_t = pad_stack(observations, obs_dim).to(device)
            hist_t = pad_stack(histories, hist_dim).to(device) if history_len > 0 else None
            return list(agents.act(agents.features(obs_t, hist_t)).cpu().numpy())


    def cross_play():  # --cross-play-with: this run's agents in teams with other runs' agents (envs.py, "Cross-play")
        return envs.cross_play(run_dir=run_dir, partners=args.cross_play_with, method=algorithm, env=args.env,
                               obs=obs_name, eval_obs=obs_name, data=data, own_act=greedy_act,
                               partner_act=lambda ck: lambda o, h, team=envs.load_team(agents, ck, "agents"): greedy_act(o, h, team),
                               n_episodes=args.eval_episodes, seed=10101 + 1 + args.seed, history_len=history_len,
                               record=record, results_dir=args.results_dir, budget=args.budget, code=code, device=device)

    if args.cross_play_with and step >= total_steps and (run_dir / "summary.json").exists():
        return cross_play()  # a finished run given with --resume: only the teams are played; its record stays

    # ---- training loop ----
    t_last, step_last, sps, start_step = time.time(), step, 0.0, step
    actor_loss = torch.zeros(())
    # a plain progress line about once a minute (phase, step/total, rate, ETA), in batch logs and terminals alike
    bar = envs.PlainProgress(total=total_steps, initial=step, desc=f"{exp_name} {args.env}/{obs_name}/{dataset}")
    while step < total_steps:
        b = buffer.sample(args.batch_size, generator)
        step += 1
        bar.update(1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            losses = update(learner, b, step, args, generator)
        critic_loss, q = losses["critic_loss"], losses["q"]
        actor_loss = losses.get("actor_loss", actor_loss)

        if step % 1000 == 0 or step == total_steps:
            sps = (step - step_last) / max(time.time() - t_last, 1e-9)
            t_last, step_last = time.time(), step
            writer.add_scalar("charts/SPS", sps, step)
            writer.add_scalar("losses/critic_loss", critic_loss.item(), step)
            writer.add_scalar("losses/actor_loss", actor_loss.item(), step)
            writer.add_scalar("losses/q_mean", q.mean().item(), step)
            critic_log.add(step, td_loss=critic_loss.item(), value_mean=q.mean().item(), actor_loss=actor_loss.item())
            envs.check_losses(step, critic_loss=critic_loss, actor_loss=actor_loss)
        if args.eval_every > 0 and step % args.eval_every == 0 and step < total_steps:
            envs.check_losses(step, critic_loss=critic_loss, actor_loss=actor_loss)
            eval_ret = envs.evaluate(args.env, obs_name, greedy_act, 10, seed=10101 + 1000 * step, history_len=history_len)
            writer.add_scalar("eval/episodic_return", eval_ret.mean(), step)
            eval_score = float(data.normalized_score(eval_ret).mean())
            writer.add_scalar("eval/normalized_score", eval_score, step)
            curve.add(step, step * args.batch_size, wall_before + time.time() - t0, eval_score, len(eval_ret))
            print(f"step {step} | greedy return {eval_ret.mean():.3f} | critic_loss {critic_loss.item():.4f} | "
                  f"actor_loss {actor_loss.item():.4f} | SPS {sps:.1f}", flush=True)
        if args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            save_checkpoint()
    if step > start_step:  # this process trained: its last losses must be finite
        envs.check_losses(step, critic_loss=critic_loss, actor_loss=actor_loss)
    bar.close()
    save_checkpoint()  # checks the weights first: a broken policy never reaches the evaluation or a summary

    # ---- final greedy evaluation and summary ----
    returns, lengths, conventions = envs.evaluate(args.env, obs_name, greedy_act, args.eval_episodes,
                                                  seed=10101 + 1 + args.seed, history_len=history_len,
                                                  return_lengths=True, return_conventions=True)
    scores = data.normalized_score(returns)
    wall = wall_before + time.time() - t0
    summary = dict(algorithm=algorithm, env=args.env, obs=obs_name, dataset_id=data.dataset_id, seed=args.seed,
                   config=vars(args), eval_episodes=args.eval_episodes,
                   normalized_score_mean=float(scores.mean()), normalized_score_std=float(scores.std()),
                   episode_returns=returns.tolist(), episode_normalized_scores=scores.tolist(),
                   train_steps=step, wall_time_s=wall, git_commit=git_commit())
    summary.update(method=algorithm, **envs.record_fields(code, data, args.budget, lengths, conventions),
                   **critic_log.record_fields())
    curve.add(step, step * args.batch_size, wall, summary["normalized_score_mean"], len(returns))
    writer.add_scalar("eval/episodic_return", returns.mean(), step)
    writer.add_scalar("eval/normalized_score", scores.mean(), step)
    writer.close()
    envs.write_summary(run_dir, summary)
    if args.results_dir is not None:
        print(f"record of this cell: {envs.save_record(run_dir, args.results_dir, record)}")
    if args.cross_play_with:
        cross_play()
    print(f"final normalised score {scores.mean():.3f} +- {scores.std():.3f} over {len(returns)} greedy episodes; "
          f"{step} steps in {wall:.0f}s; run {run_dir}")
    if summary["critic_diverged"]:
        print(f"warning: the critic diverged ({summary['critic_diverged']['reason']} at step "
              f"{summary['critic_diverged']['step']}): results.py leaves this score out of the tables")
    return summary


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except envs.MomaError as e:
        raise SystemExit(f"error: {e}")
