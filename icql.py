"""ICQL: independent CQL, a TD3 actor on a conservative (CQL) double critic per agent, paper §5.1.

This is the paper's ICQL as the authors ran it (docs/deviations.md §19.5): their `itd3` learner with the
CQL critic term of OMAR's code switched on (td3_omar_coeff > 0, td3_omar_cql_alpha = α), the plain TD3
actor (td3_shortcut_omar, td3_bc_coeff = 0). Each agent i has its own (no parameter sharing, no agent
id) deterministic tanh actor π_i(x_i), double critic Q1_i, Q2_i(x_i, a_i) and target copies; x_i is
[history embedding, o_i] on partially observable tasks (the one-layer self-attention + soft-attention
pooling encoder of MOMA-PPO, paper §3.2 / docs/deviations.md §6, with a target encoder soft-updated with τ),
o_i otherwise. Every agent learns from the team reward r.

    critic:  L_Q = Σ_k E[(y - Qk_i(x_i, a_i))²] + α Σ_k E[ T·logsumexp_j((Qk_i(x_i, â_j) - log μ(â_j | x_i)) / T)
                                                          - Qk_i(x_i, a_i) ]
             y = r + γ (1 - terminal) min_k Qk'_i(x'_i, clip(π'_i(x'_i) + clip(N(0, 0.2²), ±0.5), ±1))
    actor:   L_π = -E[Q1_i(x_i, π_i(x_i))], every 2 critic steps, with the soft target updates (τ = 0.005).

The CQL(H) logsumexp is estimated by importance sampling (Kumar et al. 2020, appendix F) over 3 × 10
actions per state: 10 uniform in [-1, 1]^d (log μ = d log 0.5), 10 noisy current-policy actions
π_i(x_i) + N(0, 0.2²) and 10 noisy current-policy actions at the next step π_i(x'_i) + N(0, 0.2²),
scored at x_i, all clipped to [-1, 1] (docs/deviations.md §19.5; the authors' sampler). The authors'
code (inherited from OMAR) subtracts the Gaussian *pdf* of the noise, not its log-density; we subtract
the correct log-density log N(ε; 0, 0.2² I) = Σ_d log N(ε_d; 0, 0.2²) of the noise that was drawn,
which is what the importance-sampling estimate needs (the clip to [-1, 1] moves some mass onto the
bounds; like CQL and OMAR we ignore that). The constant log(30) of the sample mean is left out
(it shifts the term, not its gradients), as CQL does.

Other choices (not fixed by the paper; a researcher comparing offline MARL methods would expect these):
* the history encoder is trained by the critic loss (TD + CQL); actors read its detached embedding,
  the target actor the target encoder's. Histories on for partially observable tasks only.
* raw rewards (the authors' TD3 family did not normalise them, docs/deviations.md §18); no state
  normalisation; no gradient clipping.
* continuous actions only: the coordination game's discrete baselines are iql.py, maiql.py and ibc.py.
* all agents' networks are stacks of per-agent weights [n, in, out] run with one bmm per layer; the
  30 sampled actions per state go through the critics in the same batched call.
* one fused Adam kernel per optimizer step (torch's `fused=True`) and one foreach lerp per soft target update.

    python icql.py --env reacher --obs all-observant
    python icql.py --env ant --obs partial --dataset expert
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
    """critic gradient steps (authors: 1,000,001). None = a budget that fits a 2-core CPU: 10k without
    histories (fully observable), 5k with the history encoder (partially observable). The CQL term
    scores 30 sampled actions per state with both critics, about 30x a TD3 critic step, and dominates
    the cost: 26-33 GFLOP per step on Ant. Measured at batch 256 on a quiet 2-core AMD EPYC, 2 threads
    (docs/benchmarks.md): ICQL ant full 4.0 steps/s, partial 3.6; OMAR full 3.9, partial 3.1 (--bf16:
    5.2-6.7); about 1.5 steps/s on 1 thread beside another job. --cql-samples 3 cuts the CQL cost about 3x"""
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
    cql_alpha: float = 1.0
    """α, weight of the CQL term (authors' td3_omar_cql_alpha)"""
    cql_samples: int = 10
    """sampled actions per state and per proposal (uniform, π(s), π(s')): 3 x this in the logsumexp"""
    cql_noise: float = 0.2
    """std of the Gaussian noise on the policy proposals"""
    cql_temperature: float = 1.0
    """temperature T of the logsumexp"""
    eval_every: Optional[int] = None
    """gradient steps between greedy evaluations (10 episodes); None = a tenth of the run, so that the 5k-step
    default of a partially observable task has a learning curve too (every 5,000 steps gave it none); 0 disables.
    Evaluations draw no training random numbers: the run trains the same with any value"""
    eval_episodes: int = 100
    """greedy episodes of the final evaluation"""
    checkpoint_every: int = 1_000
    """gradient steps between atomic checkpoints. A CQL step costs ~30 TD3 steps: 1,000 of them are 5-10 minutes
    on a 2-core CPU, so a run stopped (session end, preemption) loses at most that; every 10,000 steps never
    checkpointed a 5k-step run before its end"""
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

    def q_sampled(self, x: torch.Tensor, actions: torch.Tensor, heads: int = 2) -> torch.Tensor:
        """Critics at M actions per state: x [n, B, x], actions [n, B, M, a] -> [heads, n, B, M] (heads = 2:
        Q1_i and Q2_i; 1: Q1_i only). Equal to q_values on x repeated M times, but the first layer's
        x-part is computed once per state instead of once per sampled action."""
        w, b = self.critic.weights, self.critic.biases
        n, B, M, a = actions.shape
        members, xd = heads * self.n, x.shape[-1]
        hx = torch.bmm(x.repeat(heads, 1, 1), w[0][:members, :xd])  # [members, B, hidden]
        ha = torch.bmm(actions.repeat(heads, 1, 1, 1).reshape(members, B * M, a), w[0][:members, xd:])
        h = torch.relu(ha.reshape(members, B, M, -1) + (hx + b[0][:members])[:, :, None]).reshape(members, B * M, -1)
        last = len(w) - 1
        for k in range(1, len(w)):
            wk, bk = w[k][:members], b[k][:members]
            h = torch.relu(torch.baddbmm(bk, h, wk)) if k < last else output_layer(bk, h, wk)
        return h.reshape(heads, n, B, M)

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


def cql_sample_actions(pi: torch.Tensor, pi_next: torch.Tensor, n_samples: int, noise: float,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CQL's proposal actions (docs/deviations.md §19.5): n_samples uniform in [-1, 1]^d, n_samples π(x) + ε and
    n_samples π(x') + ε, ε ~ N(0, noise² I), clipped to [-1, 1].

    pi, pi_next [n, B, a] (no grad) -> actions [n, B, 3 n_samples, a] and their proposal log-densities
    log μ [n, B, 3 n_samples]: d log 0.5 for the uniform ones, Σ_d log N(ε_d; 0, noise²) for the noisy
    ones (the log-density; the authors subtracted the pdf, see the module docstring)."""
    n, B, a = pi.shape
    shape = (n, B, n_samples, a)
    uniform = torch.rand(shape, device=pi.device, generator=generator) * 2.0 - 1.0
    eps = torch.randn((2,) + shape, device=pi.device, generator=generator) * noise
    noisy = (torch.stack([pi, pi_next])[:, :, :, None, :] + eps).clamp(-1.0, 1.0)  # [2, n, B, K, a]
    log_gauss = (-0.5 * (eps / noise).pow(2) - math.log(noise) - 0.5 * math.log(2 * math.pi)).sum(-1)  # [2, n, B, K]
    actions = torch.cat([uniform, noisy[0], noisy[1]], dim=2)
    log_density = torch.cat([torch.full((n, B, n_samples), a * math.log(0.5), device=pi.device), log_gauss[0], log_gauss[1]], 2)
    return actions, log_density


def cql_term(q_data: torch.Tensor, q_sampled: torch.Tensor, log_density: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """CQL(H)'s conservative term E_s[T logsumexp_j((Q(s, â_j) - log μ(â_j | s)) / T) - Q(s, a_data)].

    q_data [..., B], q_sampled / log_density [..., B, M] -> [...] (mean over B; the caller sums the
    critics and agents and multiplies by α). Importance-sampled logsumexp, Kumar et al. 2020 app. F."""
    lse = temperature * torch.logsumexp((q_sampled - log_density) / temperature, dim=-1)
    return (lse - q_data).mean(-1)


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


def make_learner(args: Args, n: int, obs_dim: int, action_dim: int, history_len: int, hist_dim: int,
                 device: torch.device) -> dict:
    """The agents (encoders, actors, critics), their target copies and the two optimizers."""
    agents = TD3Agents(n, obs_dim, action_dim, args.hidden, history_len, hist_dim, args.history_dim).to(device)
    target_actor = copy.deepcopy(agents.actor).requires_grad_(False)
    target_critic = copy.deepcopy(agents.critic).requires_grad_(False)
    target_encoder = copy.deepcopy(agents.encoder).requires_grad_(False) if agents.encoder is not None else None
    critic_params = list(agents.critic.parameters()) + (list(agents.encoder.parameters()) if agents.encoder else [])
    critic_optimizer = torch.optim.Adam(critic_params, lr=args.learning_rate, fused=True)
    actor_optimizer = torch.optim.Adam(agents.actor.parameters(), lr=args.learning_rate, fused=True)
    return dict(agents=agents, target_actor=target_actor, target_critic=target_critic, target_encoder=target_encoder,
                critic_optimizer=critic_optimizer, actor_optimizer=actor_optimizer)


def update(learner: dict, b: dict, step: int, args: Args, generator: torch.Generator) -> dict:
    """One critic gradient step on minibatch b (the `step`-th, counted from 1), and every policy_freq-th step
    an actor step and the soft target updates. Returns the losses (tensors; actor_loss only on actor steps)."""
    agents, target_actor, target_critic, target_encoder, critic_optimizer, actor_optimizer = (
        learner[k] for k in ("agents", "target_actor", "target_critic", "target_encoder", "critic_optimizer", "actor_optimizer"))
    device = b["rewards"].device
    with torch.no_grad():
        # TD3 target: smoothed target-policy action at s', min of the two target critics.
        x_next = agents.features(b["next_obs"], b["next_hist"], target_encoder)
        noise = (torch.randn(b["actions"].shape, device=device, generator=generator) * args.policy_noise).clamp(
            -args.noise_clip, args.noise_clip)
        next_actions = (agents.act(x_next, target_actor) + noise).clamp(-1.0, 1.0)
        q_next = agents.q_values(x_next, next_actions, target_critic)  # [2, n, B]
        y = b["rewards"] + args.gamma * (1.0 - b["terminals"]) * q_next.min(0).values  # [n, B]
    x = agents.features(b["obs"], b["hist"])
    q = agents.q_values(x, b["actions"])  # [2, n, B]
    td_loss = (y - q).pow(2).mean(-1).sum()  # Σ over heads and agents of the mean squared TD error
    # CQL term: push Q down on sampled actions (importance-sampled logsumexp), up on the data's.
    with torch.no_grad():
        x_sg = x.detach()
        sampled, log_density = cql_sample_actions(agents.act(x_sg), agents.act(x_next), args.cql_samples,
                                                  args.cql_noise, generator)  # [n, B, M, a], [n, B, M]
    q_sampled = agents.q_sampled(x, sampled)  # [2, n, B, M]
    cql_loss = args.cql_alpha * cql_term(q, q_sampled, log_density, args.cql_temperature).sum()
    critic_loss = td_loss + cql_loss
    critic_optimizer.zero_grad(set_to_none=True)
    critic_loss.backward()
    critic_optimizer.step()
    losses = dict(critic_loss=critic_loss, td_loss=td_loss, cql_loss=cql_loss, q=q)

    if step % args.policy_freq == 0:
        x_actor = x.detach()  # the encoder is the critic's; actors read its embedding
        pi = agents.act(x_actor)
        actor_loss = -agents.q1(x_actor, pi).mean(-1).sum()  # plain TD3 actor, each agent on its own Q1_i
        actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_optimizer.step()
        losses["actor_loss"] = actor_loss
        soft_update(target_actor, agents.actor, args.tau)
        soft_update(target_critic, agents.critic, args.tau)
        if target_encoder is not None:
            soft_update(target_encoder, agents.encoder, args.tau)
    return losses


def main(args: Args) -> dict:
    if args.env == "coordination":
        raise envs.MomaError("icql.py is continuous-action only (reacher, ant); the coordination game's "
                             "discrete-action baselines are iql.py, maiql.py and ibc.py")
    obs_name = envs.check_names(args.env, args.obs, args.dataset)
    dataset = args.dataset or envs.DEFAULT_DATASET[args.env]
    # Every argument is checked before any folder is made or any data is loaded (docs/usage.md, "Run safety").
    envs.check_args(args, at_least_one=("total_steps", "batch_size", "hidden", "history_dim", "eval_episodes", "policy_freq",
                                        "cql_samples"),
                    non_negative=("history_len", "eval_every", "checkpoint_every", "policy_noise", "noise_clip", "cql_alpha"),
                    positive=("learning_rate", "tau", "cql_noise", "cql_temperature"),
                    between={"gamma": (0.0, 1.0), "tau": (0.0, 1.0)})
    # the method its records are filed under: this file's name
    algorithm, exp_name = pathlib.Path(__file__).stem, args.exp_name
    given_run_dir = args.run_dir is not None
    run_dir = pathlib.Path(args.run_dir) if given_run_dir else envs.default_run_dir(
        args.env, obs_name, dataset, exp_name, args.seed)
    ckpt_path = run_dir / "checkpoint.pt"
    if args.resume and not ckpt_path.exists():
        raise envs.MomaError(f"no checkpoint at {ckpt_path} to resume; drop --resume to start a new run")
    envs.check_cross_play_partners(args.cross_play_with, run_dir)  # a wrong path fails now, not after training

    torch.set_num_threads(args.torch_threads)
    # CQL's sampled actions make [8 critics x 7,680 pairs x 256] activations of 63 MB, above glibc's largest mmap
    # threshold: each would be page-faulted in anew at every step (~220 ms of system time a step, 1 thread); kept in
    # the heap, ICQL / OMAR run ~1.5x faster with bit-identical results (docs/benchmarks.md)
    envs.keep_large_allocations_in_the_heap()
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
    total_steps = args.total_steps if args.total_steps is not None else (10_000 if history_len == 0 else 5_000)
    eval_every = args.eval_every if args.eval_every is not None else max(total_steps // 10, 1)
    ck = None
    if args.resume:  # refuse another configuration before any work (the checkpoint records the run's arguments)
        ck = envs.load_checkpoint(ckpt_path, device)
        envs.check_resume(ck["args"], vars(args), "total_steps", ck.get("step", 0), total_steps)
    data = envs.load_dataset(args.env, dataset, obs_name, history_len=max(history_len, 1))
    n = data.n_agents
    adims = envs.action_dims(args.env)
    if len(set(adims)) != 1:
        raise envs.MomaError(f"icql.py needs equal per-agent action dims, got {adims}")
    action_dim = adims[0]
    obs_dim, hist_dim = max(envs.obs_dims(args.env, obs_name)), max(envs.history_dims(args.env, obs_name))
    buffer = ReplayData(data, obs_dim, hist_dim, history_len, device)

    learner = make_learner(args, n, obs_dim, action_dim, history_len, hist_dim, device)
    agents, target_actor, target_critic, target_encoder, critic_optimizer, actor_optimizer = (
        learner[k] for k in ("agents", "target_actor", "target_critic", "target_encoder", "critic_optimizer", "actor_optimizer"))
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
            critic_optimizer.load_state_dict(ck["critic_optimizer"])
            actor_optimizer.load_state_dict(ck["actor_optimizer"])
            step, wall_before = ck["step"], ck["wall_s"]
            generator.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            np.random.set_state(ck["numpy_rng"])
        except Exception as e:
            raise envs.MomaError(f"checkpoint {ckpt_path} does not fit this run ({type(e).__name__}: {str(e)[:200]}); "
                                 f"start a new run without --resume") from None
        envs.check_weights(step, agents, target_actor, target_critic, target_encoder,
                           what=f"checkpoint {ckpt_path} holds")
        del ck
        print(f"resumed {run_dir} at step {step}")
    envs.check_free_space(run_dir, 4 * envs.tensor_bytes(agents))  # weights, 2 Adam moments, targets
    # The record of this table cell (see envs.py, "Run records"): command, eval curve, fingerprints.
    record = envs.record_name(args.env, obs_name, dataset, algorithm, args.seed)
    envs.check_results_dir(args.results_dir, record, args.budget)
    envs.make_run_dir(run_dir, given_run_dir)  # only now: an argument or data error leaves no folder behind
    code = envs.code_fingerprint(__file__)  # hashed before training: the code that runs, even if edited meanwhile
    envs.write_command(run_dir, args.resume)
    curve = envs.CurveLog(run_dir, step if args.resume else None)
    # training.csv: losses and the critic's mean value on dataset actions every 1000 steps, and whether it diverged
    # (envs.CriticLog) ("td_loss" sums the two heads' and n agents' mean squared TD errors)
    critic_log = envs.CriticLog(run_dir, buffer.rewards.cpu().numpy(), args.gamma, td_terms=2 * n,
                                extra_columns=("cql_loss", "actor_loss"), resume_step=step if args.resume else None)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    t0 = time.time()

    def save_checkpoint():
        # a diverged network is never checkpointed
        envs.check_weights(step, agents, target_actor, target_critic, target_encoder)
        envs.save_checkpoint(dict(agents=agents.state_dict(), target_actor=target_actor.state_dict(),
                                  target_critic=target_critic.state_dict(),
                                  target_encoder=None if target_encoder is None else target_encoder.state_dict(),
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
    bar = envs.PlainProgress(total=total_steps, initial=step, desc=f"ICQL {args.env}/{obs_name}/{dataset}")
    while step < total_steps:
        b = buffer.sample(args.batch_size, generator)
        step += 1
        bar.update(1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            losses = update(learner, b, step, args, generator)
        critic_loss, td_loss, cql_loss, q = (losses[k] for k in ("critic_loss", "td_loss", "cql_loss", "q"))
        actor_loss = losses.get("actor_loss", actor_loss)

        if step % 1000 == 0 or step == total_steps:
            sps = (step - step_last) / max(time.time() - t_last, 1e-9)
            t_last, step_last = time.time(), step
            writer.add_scalar("charts/SPS", sps, step)
            writer.add_scalar("losses/critic_loss", critic_loss.item(), step)
            writer.add_scalar("losses/td_loss", td_loss.item(), step)
            writer.add_scalar("losses/cql_loss", cql_loss.item(), step)
            writer.add_scalar("losses/actor_loss", actor_loss.item(), step)
            writer.add_scalar("losses/q_mean", q.mean().item(), step)
            critic_log.add(step, td_loss=td_loss.item(), value_mean=q.mean().item(), cql_loss=cql_loss.item(), actor_loss=actor_loss.item())
            envs.check_losses(step, td_loss=td_loss, cql_loss=cql_loss, actor_loss=actor_loss)
        if eval_every > 0 and step % eval_every == 0 and step < total_steps:
            envs.check_losses(step, td_loss=td_loss, cql_loss=cql_loss, actor_loss=actor_loss)
            eval_ret = envs.evaluate(args.env, obs_name, greedy_act, 10, seed=10101 + 1000 * step, history_len=history_len)
            writer.add_scalar("eval/episodic_return", eval_ret.mean(), step)
            eval_score = float(data.normalized_score(eval_ret).mean())
            writer.add_scalar("eval/normalized_score", eval_score, step)
            curve.add(step, step * args.batch_size, wall_before + time.time() - t0, eval_score, len(eval_ret))
            print(f"step {step} | greedy return {eval_ret.mean():.3f} | td_loss {td_loss.item():.4f} | cql_loss {cql_loss.item():.4f} | "
                  f"actor_loss {actor_loss.item():.4f} | SPS {sps:.1f}", flush=True)
        if args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            save_checkpoint()
    if step > start_step:  # this process trained: its last losses must be finite
        envs.check_losses(step, td_loss=td_loss, cql_loss=cql_loss, actor_loss=actor_loss)
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
