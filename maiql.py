"""MAIQL: multi-agent Implicit Q-Learning with QMIX value decomposition (paper §5.1), and MAIQL-ft.

Each agent i has its own (no parameter sharing, no agent id) double Q_i(h_i, o_i, a_i), value
V_i(h_i, o_i) and policy π_i(a_i | h_i, o_i); h_i is agent i's 10-step (o_i, a_i) history, encoded by
the same one-layer self-attention + soft-attention-pooling encoder as MOMA-PPO (paper §3.2, docs/deviations.md
§6). Two mixers turn the per-agent values into team values (centralised training, decentralised
execution):

    Q_tot(s, a) = Σ_i w^Q_i(s, a) Q_i + b^Q(s, a)         (action-aware Q-mixer, docs/deviations.md §19.2)
    V_tot(s)    = Σ_i w^V_i(s)    V_i + b^V(s)

IQL (Kostrikov et al. 2021) is then run on the team values (docs/deviations.md §19.2):

    V-step:  L_V = E[ |τ - 1(Q̂_tot < V_tot)| (Q̂_tot - V_tot)² ],  Q̂_tot = target-mixer(min(Q1'_i, Q2'_i))
    π-step:  L_π = -E[ min(exp(β (Q̂_tot - V_tot)), 100) Σ_i log π_i(a_i | h_i, o_i) ]   (team AWR)
    Q-step:  L_Q = E[ (y - Q1_tot)² + (y - Q2_tot)² ],  y = r + γ (1 - terminal) V_tot(s')

Paper vs authors' code (docs/deviations.md §14): the paper says "QMIX value decomposition", the authors'
mixers output unconstrained-sign weights. We follow the paper: w_i = |MLP(.)_i| >= 0, so Q_tot and
V_tot are monotonic in every Q_i / V_i (QMIX's individual-global-max condition). The mixers see the
global state s (QMIX; the authors fed the concatenated agents' observations, which in partially
observable tasks misses part of the state) and, for the Q-mixer, the joint action.

MAIQL-ft (`--finetune`, paper §5.1, docs/deviations.md §19.3): after `total_steps` offline steps, train the
same number of steps again while adding real-simulator data: every `populate_every` steps, start
short rollouts (`rollout_length` = 10 steps, sampled actions of the current policies, stopping at
terminals) from dataset states put into the simulator with `envs.make_env(...).set_state`, and add
them to the replay buffer; minibatches are drawn uniformly from offline ∪ online data (the authors'
binomial mixing of n_data / (n_data + n_online) is exactly that). The number of rollouts per
population is chosen so that at the end the buffer holds `online_ratio` (default 1: as many) online
transitions per offline one, as the paper states.

Other choices (not fixed by the paper; a researcher comparing offline MARL methods would expect these):
* history encoder on for partially observable tasks only (`--history-len` None); the coordination
  game never has one (authors, docs/deviations.md §17); FO tasks see the Markov state o_i = s.
* ant rewards are multiplied by 1000 / (max - min dataset episode return), as the authors did for
  the IQL family (docs/deviations.md §18); `--no-normalize-rewards` turns it off. Returns are reported raw.
* one combined backward per step (V, π and Q losses touch disjoint heads, targets are detached), with
  each module's gradient clipped to norm 1.0 as the authors did for MAIQL.
* one fused Adam kernel per step (torch's `fused=True`), one foreach lerp per soft target update, and one
  target-encoder pass over the histories at s and s' together.
* the coordination game is discrete: Q_i(o_i, ·) has one output per action, π_i is categorical and
  the greedy action is the argmax; the Q-mixer sees one-hot joint actions.

Coordination game, unfavorable dataset (Table 3 reports 0 ± 0): with exact values the team AWR
makes each agent's greedy action its weighted marginal, P(a1 = left) ≈ 0.53, P(a2 = right) ≈ 0.53,
so the team never agrees. That margin is thin: a gap of ~0.04 between the learned Q_tot of the two
coordinated joint actions (or a similar error on a rare uncoordinated one) tips one agent over and
the team coordinates. At small budgets (2k-10k steps, 64-wide nets) this happened in about half of the
seeds of early runs that left no record; in the recorded Table 3 cells (1k steps, docs/results.md) in 1
seed of 10. So the paper's "numerical errors break the symmetry" also shows on this dataset until the
critic is very precise.

    python maiql.py --env coordination --dataset favorable --total-steps 5000
    python maiql.py --env reacher --obs leader-only --total-steps 50000
    python maiql.py --env ant --obs full --dataset medium --total-steps 50000 --finetune
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
    env: envs.EnvName = "coordination"
    """coordination, reacher or ant"""
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
    """offline gradient steps (authors: 1,000,001). None = a budget that fits the shared 2-core CPU:
    5k on the coordination game, 50k without histories, 10k with the history encoder (PO tasks), which
    dominates the cost. Measured (1 thread, nets 256-256, batch 256, machine shared): MAIQL reacher all-observant 18 steps/s
    (50k ~ 45 min), MAIQL ant partial 2.3 steps/s (10k ~ 70 min), IBC ant partial 5.5 steps/s"""
    finetune: bool = False
    """MAIQL-ft: after the offline steps, train total_steps more with online simulator data mixed in"""
    populate_every: int = 10
    """MAIQL-ft: gradient steps between two rounds of simulator rollouts (authors: 10)"""
    rollout_length: int = 10
    """MAIQL-ft: steps per rollout from a dataset state (authors: 10)"""
    online_ratio: float = 1.0
    """MAIQL-ft: online / offline transitions in the buffer at the end of fine-tuning (paper: 1)"""
    batch_size: int = 256
    hidden: int = 256
    """width of the two hidden layers of every MLP"""
    history_len: Optional[int] = None
    """history length (None = 10 on partially observable tasks, 0 on fully observable ones)"""
    history_dim: int = 128
    """width of the history encoder (docs/deviations.md §6)"""
    learning_rate: float = 3e-4
    gamma: float = 0.99
    expectile: float = 0.7
    """τ of the expectile loss of V"""
    beta: float = 3.0
    """AWR inverse temperature"""
    max_weight: float = 100.0
    """AWR weights are clipped to this"""
    tau: float = 0.005
    """soft target-update coefficient"""
    monotonic_mixers: bool = True
    """QMIX mixers with |w| >= 0 (paper); --no-monotonic-mixers = the authors' unconstrained weights (docs/deviations.md §14)"""
    normalized_mixer_weights: bool = False
    """w = n softmax(w_raw) over the agents: positive mixing weights that sum to n, so their scale cannot drift against
    the Q_i's (Σ w_i Q_i is unchanged by w -> c w, Q_i -> Q_i / c); a diagnosis of MAIQL's divergence on Ant, where |w|
    grows while Q_i shrinks (docs/diagnosis.md)"""
    grad_clip: float = 1.0
    """per-module gradient-norm clip (authors' MAIQL); 0 disables"""
    normalize_rewards: bool = True
    """ant only: rewards x 1000 / (max - min episode return), as the authors did for the IQL family"""
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
    """QMIX-style monotonic mixer: Q_tot = Σ_i |w_i(m)| Q_i + b(m), w and b from one 256-256 MLP of m.

    Paper §5.1 ("QMIX value decomposition"): |w| keeps ∂Q_tot/∂Q_i >= 0. The authors' code left w
    unconstrained (docs/deviations.md §14); we follow the paper.
    """

    def __init__(self, in_dim: int, n: int, hidden: int, monotonic: bool = True, normalized: bool = False):
        super().__init__()
        self.monotonic, self.normalized = monotonic, normalized
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n + 1))

    def weights(self, m: torch.Tensor) -> tuple:
        """Mixer input m [B, in] -> (the weights w [B, n] that multiply the Q_i, the bias b [B]), as forward uses
        them: |w_raw| (paper), w_raw (non-monotonic) or n·softmax(w_raw) (--normalized-mixer-weights)."""
        out = self.net[-1]  # the output layer in fp32 (output_layer)
        with torch.autocast(m.device.type, enabled=False):
            wb = F.linear(self.net[:-1](m).to(out.weight.dtype), out.weight, out.bias)
        if self.normalized:  # --normalized-mixer-weights: positive, summing to n, no free scale
            w = (wb.shape[1] - 1) * torch.softmax(wb[:, :-1], dim=1)
        else:
            w = wb[:, :-1].abs() if self.monotonic else wb[:, :-1]
        return w, wb[:, -1]

    def forward(self, values: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """values [..., n, B], mixer input m [B, in] -> [..., B]."""
        w, b = self.weights(m)
        return (w.T * values).sum(-2) + b


class MAIQLAgents(nn.Module):
    """All agents' encoders, double Q_i, V_i, policies π_i, and the Q/V mixers."""

    LOG_STD_MIN, LOG_STD_MAX = -6.0, 0.0

    def __init__(self, n: int, obs_dim: int, action_dim: int, discrete: bool, state_dim: int,
                 joint_action_dim: int, hidden: int, history_len: int, history_in: int, history_dim: int,
                 monotonic_mixers: bool = True, normalized_mixer_weights: bool = False):
        super().__init__()
        self.n, self.action_dim, self.discrete = n, action_dim, discrete
        self.encoder = AgentsHistoryEncoder(n, history_in, history_len, history_dim) if history_len > 0 else None
        x_dim = obs_dim + (history_dim if history_len > 0 else 0)
        q_in, q_out = (x_dim, action_dim) if discrete else (x_dim + action_dim, 1)
        self.q = AgentsMLP(2 * n, [q_in, hidden, hidden, q_out])  # members [Q1_0..Q1_n-1, Q2_0..Q2_n-1]
        self.v = AgentsMLP(n, [x_dim, hidden, hidden, 1])
        self.policy = AgentsMLP(n, [x_dim, hidden, hidden, action_dim if discrete else 2 * action_dim])
        self.q_mixer = Mixer(state_dim + joint_action_dim, n, hidden, monotonic_mixers, normalized_mixer_weights)
        self.v_mixer = Mixer(state_dim, n, hidden, monotonic_mixers, normalized_mixer_weights)

    def features(self, obs: torch.Tensor, hist: Optional[torch.Tensor]) -> torch.Tensor:
        """obs [n, B, o], hist [n, B, H, d] -> per-agent input [n, B, (emb,) o] (embedding first, docs/deviations.md §6)."""
        if self.encoder is None:
            return obs
        return torch.cat([self.encoder(hist), obs], dim=-1)

    def q_values(self, x: torch.Tensor, actions: torch.Tensor, q_net: Optional[AgentsMLP] = None) -> torch.Tensor:
        """-> [2, n, B]: Q1_i and Q2_i of the agents' actions (ints [n, B] if discrete, else [n, B, a]);
        `q_net` = the target copy of self.q, or None for self.q."""
        q_net = self.q if q_net is None else q_net
        if self.discrete:
            q = q_net(x.repeat(2, 1, 1)).reshape(2, self.n, x.shape[1], -1)
            return q.gather(-1, actions[None, ..., None].expand(2, -1, -1, 1)).squeeze(-1)
        return q_net(torch.cat([x, actions], -1).repeat(2, 1, 1)).reshape(2, self.n, x.shape[1])

    def log_prob(self, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log π_i(a_i | x_i) -> [n, B]; continuous: tanh-squashed Gaussian (docs/deviations.md §19.1)."""
        out = self.policy(x)
        if self.discrete:
            return torch.log_softmax(out, -1).gather(-1, actions[..., None]).squeeze(-1)
        mean, log_std = out.split(self.action_dim, dim=-1)
        a = actions.clamp(-1 + 1e-5, 1 - 1e-5)  # data actions may sit on the bound; atanh(±1) = ±inf
        std = log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX).exp()
        logp = torch.distributions.Normal(mean, std).log_prob(torch.atanh(a)) - torch.log(1 - a.pow(2) + 1e-5)
        return logp.sum(-1)

    def act(self, x: torch.Tensor, greedy: bool) -> torch.Tensor:
        """Greedy (argmax / tanh(mean)) or sampled actions, [n, B] ints or [n, B, a]."""
        out = self.policy(x)
        if self.discrete:
            return out.argmax(-1) if greedy else torch.distributions.Categorical(logits=out).sample()
        mean, log_std = out.split(self.action_dim, dim=-1)
        if greedy:
            return torch.tanh(mean)
        return torch.tanh(mean + log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX).exp() * torch.randn_like(mean))

    def modules_to_clip(self) -> list[nn.Module]:
        return [m for m in (self.encoder, self.q, self.v, self.policy, self.q_mixer, self.v_mixer) if m is not None]


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """IQL's asymmetric L2: |τ - 1(diff < 0)| diff², diff = Q̂ - V (V is pushed up towards Q̂'s τ-expectile)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


def awr_weights(advantage: torch.Tensor, beta: float, max_weight: float = 100.0) -> torch.Tensor:
    """Advantage-weighted regression weights min(exp(β A), max_weight) (IQL; docs/deviations.md §19.1)."""
    return torch.exp(beta * advantage).clamp(max=max_weight)


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
    """Offline rows 0..N-1, then online (MAIQL-ft) rows, then one all-zero padding row for histories.

    Per-agent fields are stacked [n, rows, width] (zero-padded to a common width) so that a minibatch
    is one gather for all agents; histories are gathered from the (o_i, a_i) table with index rows.
    """

    def __init__(self, data: envs.OfflineData, capacity: int, obs_dim: int, hist_dim: int, history_len: int,
                 reward_scale: float, discrete: bool, device: torch.device):
        N, self.n_offline, self.size = len(data), len(data), len(data)
        total = N + capacity + 1
        self.pad_row = total - 1
        n, dev = data.n_agents, device

        def alloc(shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, device=dev)

        self.states, self.next_states = alloc((total, data.states.shape[1])), alloc((total, data.states.shape[1]))
        self.states[:N], self.next_states[:N] = torch.as_tensor(data.states), torch.as_tensor(data.next_states)
        self.joint_features = alloc((total, sum(envs.history_dims(data.env, data.obs)) - sum(o.shape[1] for o in data.observations)))
        self.joint_features[:N] = torch.as_tensor(np.concatenate(
            [envs.history_action_features(data.env, a) for a in data.actions], axis=1))
        self.rewards, self.terminals = alloc(total), alloc(total)
        self.rewards[:N] = torch.as_tensor(data.rewards) * reward_scale
        self.terminals[:N] = torch.as_tensor(data.terminals)
        self.obs, self.next_obs = alloc((n, total, obs_dim)), alloc((n, total, obs_dim))
        self.obs[:, :N], self.next_obs[:, :N] = pad_stack(data.observations, obs_dim), pad_stack(data.next_observations, obs_dim)
        if discrete:
            self.actions = alloc((n, total), torch.int64)
            self.actions[:, :N] = torch.as_tensor(np.stack([a.reshape(-1) for a in data.actions]))
        else:
            self.actions = alloc((n, total, data.actions[0].shape[1]))
            self.actions[:, :N] = torch.as_tensor(np.stack(data.actions))
        self.history_len = history_len
        if history_len > 0:
            self.table = alloc((n, total, hist_dim))  # row t = (o_t, a_t) features; pad_row stays zero
            self.table[:, :N] = pad_stack([data.history_table(i)[:-1] for i in range(n)], hist_dim)
            remap = lambda ix: torch.as_tensor(np.where(ix == N, self.pad_row, ix), device=dev)  # noqa: E731
            self.hist_index, self.next_hist_index = alloc((total, history_len), torch.int64), alloc((total, history_len), torch.int64)
            self.hist_index[:N], self.next_hist_index[:N] = remap(data.history_index), remap(data.next_history_index)

    ROW_FIELDS = ("states", "next_states", "joint_features", "rewards", "terminals", "hist_index", "next_hist_index")
    AGENT_FIELDS = ("obs", "next_obs", "actions", "table")

    def online_rows(self) -> dict:
        """The MAIQL-ft rows collected so far (for checkpoints)."""
        lo, hi = self.n_offline, self.size
        rows = {k: getattr(self, k)[lo:hi].cpu() for k in self.ROW_FIELDS if hasattr(self, k)}
        rows.update({k: getattr(self, k)[:, lo:hi].cpu() for k in self.AGENT_FIELDS if hasattr(self, k)})
        return rows

    def load_online(self, rows: dict) -> None:
        lo = self.n_offline
        for k, t in rows.items():
            hi = lo + t.shape[1 if k in self.AGENT_FIELDS else 0]
            if k in self.AGENT_FIELDS:
                getattr(self, k)[:, lo:hi] = t
            else:
                getattr(self, k)[lo:hi] = t
            self.size = hi

    def histories(self, index: torch.Tensor) -> Optional[torch.Tensor]:
        """index [B, H] -> [n, B, H, d]."""
        return None if self.history_len == 0 else self.table[:, index]

    def sample(self, batch_size: int, generator: torch.Generator) -> dict:
        rows = torch.randint(0, self.size, (batch_size,), device=self.states.device, generator=generator)
        return dict(
            states=self.states[rows], next_states=self.next_states[rows], joint_features=self.joint_features[rows],
            rewards=self.rewards[rows], terminals=self.terminals[rows], obs=self.obs[:, rows],
            next_obs=self.next_obs[:, rows], actions=self.actions[:, rows],
            hist=None if self.history_len == 0 else self.histories(self.hist_index[rows]),
            next_hist=None if self.history_len == 0 else self.histories(self.next_hist_index[rows]),
        )


def make_learner(args: Args, n: int, obs_dim: int, action_dim: int, discrete: bool, state_dim: int,
                 joint_action_dim: int, history_len: int, hist_dim: int, device: torch.device) -> dict:
    """The agents (encoders, Q_i, V_i, π_i, mixers), the target Q networks, Q-mixer and encoder, and the optimizer."""
    agents = MAIQLAgents(n, obs_dim, action_dim, discrete, state_dim, joint_action_dim, args.hidden,
                         history_len, hist_dim, args.history_dim, args.monotonic_mixers,
                         args.normalized_mixer_weights).to(device)
    target_q = copy.deepcopy(agents.q).requires_grad_(False)
    target_encoder = copy.deepcopy(agents.encoder).requires_grad_(False) if agents.encoder is not None else None
    target_q_mixer = copy.deepcopy(agents.q_mixer).requires_grad_(False)
    optimizer = torch.optim.Adam(agents.parameters(), lr=args.learning_rate, fused=True)
    return dict(agents=agents, target_q=target_q, target_encoder=target_encoder, target_q_mixer=target_q_mixer,
                optimizer=optimizer)


def update(learner: dict, b: dict, args: Args) -> dict:
    """One MAIQL gradient step (V, π and Q steps with one backward) on minibatch b, then the soft target
    updates. Returns the losses and the AWR weights (tensors)."""
    agents, target_q, target_encoder, target_q_mixer, optimizer = (learner[k] for k in ("agents", "target_q", "target_encoder", "target_q_mixer", "optimizer"))
    mixer_in_q = torch.cat([b["states"], b["joint_features"]], dim=1)
    with torch.no_grad():
        x_target, x_next = b["obs"], b["next_obs"]
        if target_encoder is not None:  # one target-encoder pass over the histories at s and s'
            B = b["obs"].shape[1]
            emb = target_encoder(torch.cat([b["hist"], b["next_hist"]], 1))  # [n, 2B, d]
            x_target, x_next = torch.cat([emb[:, :B], x_target], -1), torch.cat([emb[:, B:], x_next], -1)
        q_target = agents.q_values(x_target, b["actions"], target_q).min(0).values  # [n, B], min per agent before mixing
        q_tot_target = target_q_mixer(q_target, mixer_in_q)  # Q̂_tot [B]
        v_tot_next = agents.v_mixer(agents.v(x_next).squeeze(-1), b["next_states"])
        y = b["rewards"] + args.gamma * (1.0 - b["terminals"]) * v_tot_next
    x = agents.features(b["obs"], b["hist"])
    # V-step: expectile regression of V_tot towards Q̂_tot.
    v_tot = agents.v_mixer(agents.v(x).squeeze(-1), b["states"])
    v_loss = expectile_loss(q_tot_target - v_tot, args.expectile)
    # π-step: team AWR on the sum of the agents' log-probabilities.
    weights = awr_weights(q_tot_target - v_tot.detach(), args.beta, args.max_weight)
    policy_loss = -(weights * agents.log_prob(x, b["actions"]).sum(0)).mean()
    # Q-step: both mixed Q heads regress onto y = r + γ f V_tot(s').
    q_tot = agents.q_mixer(agents.q_values(x, b["actions"]), mixer_in_q)  # [2, B]
    q_loss = (y - q_tot).pow(2).sum(0).mean()
    optimizer.zero_grad(set_to_none=True)
    (v_loss + policy_loss + q_loss).backward()
    grad_norms = None
    if args.grad_clip > 0:  # the norms before clipping, [encoder,] Q, V, π, Q-mixer, V-mixer (logged as critic/*)
        grad_norms = torch.stack([nn.utils.clip_grad_norm_(module.parameters(), args.grad_clip)
                                  for module in agents.modules_to_clip()])
    optimizer.step()
    soft_update(target_q, agents.q, args.tau)
    soft_update(target_q_mixer, agents.q_mixer, args.tau)
    if target_encoder is not None:
        soft_update(target_encoder, agents.encoder, args.tau)
    return dict(v_loss=v_loss, q_loss=q_loss, policy_loss=policy_loss, awr_weights=weights, grad_norms=grad_norms)


CRITIC_EXTRA_COLUMNS = ("v_loss", "policy_loss", "q_mixer_abs_w", "q_mixer_b", "v_mixer_abs_w", "v_mixer_b", "q_i",
                        "q_i_abs_max", "v_i", "q_tot", "v_tot")  # training.csv's columns after envs.CRITIC_COLUMNS


@torch.no_grad()
def critic_diagnostics(learner: dict, b: dict) -> dict:
    """What the mixed critic is made of on minibatch b (logged as critic/* every 1000 steps, and kept in the
    record's loss curve): the mean |w| and b of both mixers and the mean per-agent Q_i and V_i they mix, so a
    diverging critic shows which part grows (docs/diagnosis.md, MAIQL's divergence on Ant)."""
    agents = learner["agents"]
    x = agents.features(b["obs"], b["hist"])
    q_i, v_i = agents.q_values(x, b["actions"]), agents.v(x).squeeze(-1)  # [2, n, B], [n, B]
    out = {}
    for name, mixer, m in (("q", agents.q_mixer, torch.cat([b["states"], b["joint_features"]], dim=1)),
                           ("v", agents.v_mixer, b["states"])):
        w, bias = mixer.weights(m)  # the effective weights (n·softmax under --normalized-mixer-weights)
        out[f"{name}_mixer_abs_w"] = float(w.abs().mean())
        out[f"{name}_mixer_b"] = float(bias.mean())
    out.update(q_i=float(q_i.mean()), q_i_abs_max=float(q_i.abs().max()), v_i=float(v_i.mean()),
               q_tot=float(agents.q_mixer(q_i, torch.cat([b["states"], b["joint_features"]], dim=1)).mean()),
               v_tot=float(agents.v_mixer(v_i, b["states"]).mean()))
    return out


def default_total_steps(env: str, history_len: int) -> int:
    """Gradient steps when --total-steps is not given: 5k on the coordination game (solved or failed for
    good after ~1k; Table 3 needs 30 runs per method), 50k without histories, 10k with the history encoder."""
    if env == "coordination":
        return 5_000
    return 50_000 if history_len == 0 else 10_000


def main(args: Args) -> dict:
    obs_name = envs.check_names(args.env, args.obs, args.dataset)
    dataset = args.dataset or envs.DEFAULT_DATASET[args.env]
    # Every argument is checked before any folder is made or any data is loaded (docs/usage.md, "Run safety").
    envs.check_args(args, at_least_one=("total_steps", "batch_size", "hidden", "history_dim", "eval_episodes",
                                        "populate_every", "rollout_length"),
                    non_negative=("history_len", "eval_every", "checkpoint_every", "online_ratio", "grad_clip"),
                    positive=("learning_rate", "beta", "max_weight", "tau"),
                    between={"gamma": (0.0, 1.0), "expectile": (0.0, 1.0), "tau": (0.0, 1.0)})
    name = pathlib.Path(__file__).stem  # the method its records are filed under: this file's name
    algorithm = f"{name}-ft" if args.finetune else name  # MAIQL-ft: recorded as maiql_ft
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
    if args.env == "coordination":
        history_len = 0  # the round index is the whole state (authors force memory_len = 0 here)
    offline_steps = args.total_steps if args.total_steps is not None else default_total_steps(args.env, history_len)
    total_steps = offline_steps * (2 if args.finetune else 1)
    ck = None
    if args.resume:  # refuse another configuration before any work (the checkpoint records the run's arguments)
        ck = envs.load_checkpoint(ckpt_path, device)
        envs.check_resume(ck["args"], vars(args), "total_steps", ck.get("step", 0), total_steps)
    data = envs.load_dataset(args.env, dataset, obs_name, history_len=max(history_len, 1))
    n, discrete = data.n_agents, args.env == "coordination"
    adims = envs.action_dims(args.env)
    if len(set(adims)) != 1:
        raise envs.MomaError(f"maiql.py needs equal per-agent action dims, got {adims}")
    action_dim = envs.COORDINATION_N_ACTIONS if discrete else adims[0]
    obs_dim, hist_dim = max(envs.obs_dims(args.env, obs_name)), max(envs.history_dims(args.env, obs_name))
    reward_scale = 1.0
    if args.env == "ant" and args.normalize_rewards:
        returns = data.episode_returns()
        reward_scale = float(1000.0 / max(returns.max() - returns.min(), 1e-6))
    capacity = int(math.ceil(args.online_ratio * len(data))) + args.rollout_length if args.finetune else 0
    buffer = ReplayData(data, capacity, obs_dim, hist_dim, history_len, reward_scale, discrete, device)
    joint_action_dim = buffer.joint_features.shape[1]

    learner = make_learner(args, n, obs_dim, action_dim, discrete, data.states.shape[1], joint_action_dim, history_len,
                           hist_dim, device)
    agents, target_q, target_encoder, target_q_mixer, optimizer = (learner[k] for k in ("agents", "target_q", "target_encoder", "target_q_mixer", "optimizer"))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    step, wall_before = 0, 0.0
    if ck is not None:
        if ck.get("dataset_fingerprint", data.fingerprint) != data.fingerprint:
            raise envs.MomaError(f"dataset {data.dataset_id} was rebuilt with other data since checkpoint {ckpt_path} "
                                 f"was written; start a new run without --resume")
        try:
            agents.load_state_dict(ck["agents"])
            target_q.load_state_dict(ck["target_q"])
            target_q_mixer.load_state_dict(ck["target_q_mixer"])
            if target_encoder is not None:
                target_encoder.load_state_dict(ck["target_encoder"])
            optimizer.load_state_dict(ck["optimizer"])
            step, wall_before = ck["step"], ck["wall_s"]
            buffer.load_online(ck["online"])
            generator.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            np.random.set_state(ck["numpy_rng"])
        except Exception as e:
            raise envs.MomaError(f"checkpoint {ckpt_path} does not fit this run ({type(e).__name__}: {str(e)[:200]}); "
                                 f"start a new run without --resume") from None
        envs.check_weights(step, agents, target_q, target_q_mixer, target_encoder, what=f"checkpoint {ckpt_path} holds")
        print(f"resumed {run_dir} at step {step}")
    # Weights, 2 Adam moments and targets; MAIQL-ft's checkpoints also hold the online rows (a share of the buffer).
    online_bytes = sum(t.numel() * t.element_size() for t in vars(buffer).values() if torch.is_tensor(t))
    online_bytes = online_bytes * capacity // (len(data) + capacity + 1)
    envs.check_free_space(run_dir, 4 * envs.tensor_bytes(agents) + online_bytes)
    # The record of this table cell (see envs.py, "Run records"): command, eval curve, fingerprints.
    record = envs.record_name(args.env, obs_name, dataset, algorithm.replace("-", "_"), args.seed)
    envs.check_results_dir(args.results_dir, record, args.budget)
    envs.make_run_dir(run_dir, given_run_dir)  # only now: an argument or data error leaves no folder behind
    code = envs.code_fingerprint(__file__)  # hashed before training: the code that runs, even if edited meanwhile
    envs.write_command(run_dir, args.resume)
    curve = envs.CurveLog(run_dir, step if args.resume else None)
    # training.csv: losses and what the mixed critic is made of every 1000 steps, and the verdict on whether it
    # diverged (envs.CriticLog); q_loss sums the two heads' mean squared TD errors
    critic_log = envs.CriticLog(run_dir, buffer.rewards[:len(data)].cpu().numpy(), args.gamma, td_terms=2,
                                extra_columns=CRITIC_EXTRA_COLUMNS, resume_step=step if args.resume else None)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    t0 = time.time()

    def save_checkpoint():
        # a diverged network is never checkpointed
        envs.check_weights(step, agents, target_q, target_q_mixer, target_encoder)
        envs.save_checkpoint(dict(agents=agents.state_dict(), target_q=target_q.state_dict(),
                                  target_q_mixer=target_q_mixer.state_dict(),
                                  target_encoder=None if target_encoder is None else target_encoder.state_dict(),
                                  optimizer=optimizer.state_dict(), step=step, wall_s=wall_before + time.time() - t0,
                                  online=buffer.online_rows(), populate_rng=rng.bit_generator.state,
                                  generator=generator.get_state(), torch_rng=torch.get_rng_state(),
                                  numpy_rng=np.random.get_state(), args=vars(args),
                                  dataset_fingerprint=data.fingerprint), ckpt_path)

    def policy_inputs(observations, histories):
        obs_t = pad_stack(observations, obs_dim).to(device)
        hist_t = pad_stack(histories, hist_dim).to(device) if history_len > 0 else None
        return agents.features(obs_t, hist_t)

    def greedy_act(observations, histories, agents=agents):  # agents=: another run's team, for cross-play
        with torch.no_grad():
            a = agents.act(policy_inputs(observations, histories), greedy=True).cpu().numpy()
        return list(a)


    def cross_play():  # --cross-play-with: this run's agents in teams with other runs' agents (envs.py, "Cross-play")
        return envs.cross_play(run_dir=run_dir, partners=args.cross_play_with, method=algorithm.replace("-", "_"), env=args.env,
                               obs=obs_name, eval_obs=obs_name, data=data, own_act=greedy_act,
                               partner_act=lambda ck: lambda o, h, team=envs.load_team(agents, ck, "agents"): greedy_act(o, h, team),
                               n_episodes=args.eval_episodes, seed=10101 + 1 + args.seed, history_len=history_len,
                               record=record, results_dir=args.results_dir, budget=args.budget, code=code, device=device)

    if args.cross_play_with and step >= total_steps and (run_dir / "summary.json").exists():
        return cross_play()  # a finished run given with --resume: only the teams are played; its record stays

    # ---- MAIQL-ft: short real-simulator rollouts from dataset states (docs/deviations.md §19.3) ----
    populations = max(1, offline_steps // args.populate_every)
    rollouts_per_population = max(1, int(math.ceil(args.online_ratio * len(data) / (populations * args.rollout_length))))
    sims = [envs.make_env(args.env, obs_name) for _ in range(rollouts_per_population)] if args.finetune else []
    rng = np.random.default_rng(args.seed + 7)  # start states of the rollouts
    if ck is not None:
        rng.bit_generator.state = ck["populate_rng"]
        del ck

    def populate() -> int:
        """Roll the current (sampling) policies out of dataset states; append the steps to the buffer."""
        M, K, N = len(sims), args.rollout_length, len(data)
        starts = rng.integers(0, N, size=M)
        states = data.states[starts].copy()
        for sim, s in zip(sims, states):
            sim.reset(seed=int(rng.integers(2**31)))
            sim.set_state(s)
        ids = torch.full((M, K), buffer.pad_row, dtype=torch.int64, device=device)  # buffer rows of each step
        start_hist = buffer.hist_index[torch.as_tensor(starts, device=device)] if history_len > 0 else None
        alive = np.ones(M, dtype=bool)
        added = 0
        for k in range(K):
            live = np.flatnonzero(alive)
            if len(live) == 0 or buffer.size + len(live) > buffer.pad_row:
                break
            rows = torch.arange(buffer.size, buffer.size + len(live), device=device)
            live_t = torch.as_tensor(live, device=device)
            ids[live_t, k] = rows
            obs_list = envs.split_state(args.env, obs_name, states[live])
            obs_t = pad_stack(obs_list, obs_dim).to(device)
            hist_t, window = None, None
            if history_len > 0:
                window = torch.cat([start_hist[live_t], ids[live_t]], dim=1)  # dataset history, then this rollout
                hist_t = buffer.histories(window[:, k:k + history_len])
            with torch.no_grad():
                actions = agents.act(agents.features(obs_t, hist_t), greedy=False)  # [n, m(, a)]
            act_np = actions.cpu().numpy()
            rewards, terms, nexts = [], [], []
            for j, m in enumerate(live):
                _, nxt, r, term, trunc = sims[m].step([act_np[i, j] for i in range(n)])
                rewards.append(r), terms.append(term), nexts.append(nxt)
                alive[m] = not (term or trunc)  # stop at terminals and at the episode's time limit
            nexts = np.stack(nexts)
            buffer.states[rows] = torch.as_tensor(states[live], device=device)
            buffer.next_states[rows] = torch.as_tensor(nexts, device=device)
            buffer.joint_features[rows] = torch.as_tensor(np.concatenate(
                [envs.history_action_features(args.env, act_np[i]) for i in range(n)], axis=1), device=device)
            buffer.rewards[rows] = torch.as_tensor(np.array(rewards, dtype=np.float32) * reward_scale, device=device)
            buffer.terminals[rows] = torch.as_tensor(np.array(terms, dtype=np.float32), device=device)
            buffer.obs[:, rows] = obs_t
            buffer.next_obs[:, rows] = pad_stack(envs.split_state(args.env, obs_name, nexts), obs_dim).to(device)
            buffer.actions[:, rows] = actions
            if history_len > 0:
                feats = [np.concatenate([obs_list[i], envs.history_action_features(args.env, act_np[i])], axis=1) for i in range(n)]
                buffer.table[:, rows] = pad_stack(feats, hist_dim).to(device)
                buffer.hist_index[rows] = window[:, k:k + history_len]
                buffer.next_hist_index[rows] = window[:, k + 1:k + 1 + history_len]  # includes this step's own row
            states[live] = nexts
            buffer.size += len(live)
            added += len(live)
        return added

    # ---- training loop ----
    agents.train()
    t_last, step_last, sps = time.time(), step, 0.0
    v_loss = q_loss = policy_loss = torch.zeros(())  # a resumed run may have nothing left to train
    # a plain progress line about once a minute (phase, step/total, rate, ETA), in batch logs and terminals alike
    bar = envs.PlainProgress(total=total_steps, initial=step, desc=f"{exp_name} {args.env}/{obs_name}/{dataset}")
    while step < total_steps:
        if args.finetune and step >= offline_steps and (step - offline_steps) % args.populate_every == 0:
            populate()
        b = buffer.sample(args.batch_size, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            losses = update(learner, b, args)
        v_loss, q_loss, policy_loss, weights = (losses[k] for k in ("v_loss", "q_loss", "policy_loss", "awr_weights"))
        step += 1
        bar.update(1)

        if step % 1000 == 0 or step == total_steps:
            sps = (step - step_last) / max(time.time() - t_last, 1e-9)
            t_last, step_last = time.time(), step
            writer.add_scalar("charts/SPS", sps, step)
            writer.add_scalar("losses/v_loss", v_loss.item(), step)
            writer.add_scalar("losses/q_loss", q_loss.item(), step)
            writer.add_scalar("losses/policy_loss", policy_loss.item(), step)
            writer.add_scalar("losses/awr_weight_mean", weights.mean().item(), step)
            writer.add_scalar("charts/online_fraction", (buffer.size - len(data)) / buffer.size, step)
            diagnostics = critic_diagnostics(learner, b)
            for key, value in diagnostics.items():
                writer.add_scalar(f"critic/{key}", value, step)
            critic_log.add(step, td_loss=q_loss.item(), value_mean=diagnostics["q_tot"], v_loss=v_loss.item(),
                           policy_loss=policy_loss.item(), **diagnostics)
            if losses["grad_norms"] is not None:
                for key, value in zip(("encoder",) * (agents.encoder is not None) + ("q", "v", "policy", "q_mixer", "v_mixer"),
                                      losses["grad_norms"].tolist()):
                    writer.add_scalar(f"critic/grad_norm_{key}", value, step)
            envs.check_losses(step, v_loss=v_loss, q_loss=q_loss, policy_loss=policy_loss)
        if args.eval_every > 0 and step % args.eval_every == 0 and step < total_steps:
            envs.check_losses(step, v_loss=v_loss, q_loss=q_loss, policy_loss=policy_loss)
            agents.eval()
            eval_ret = envs.evaluate(args.env, obs_name, greedy_act, 10, seed=10101 + 1000 * step, history_len=history_len)
            agents.train()
            writer.add_scalar("eval/episodic_return", eval_ret.mean(), step)
            eval_score = float(data.normalized_score(eval_ret).mean())
            writer.add_scalar("eval/normalized_score", eval_score, step)
            curve.add(step, step * args.batch_size, wall_before + time.time() - t0, eval_score, len(eval_ret))
            print(f"step {step} | greedy return {eval_ret.mean():.3f} | q_loss {q_loss.item():.4f} | "
                  f"v_loss {v_loss.item():.4f} | SPS {sps:.0f} | online rows {buffer.size - len(data)}", flush=True)
        if args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            save_checkpoint()
    envs.check_losses(step, v_loss=v_loss, q_loss=q_loss, policy_loss=policy_loss)
    bar.close()
    save_checkpoint()  # checks the weights first: a broken policy never reaches the evaluation or a summary

    # ---- final greedy evaluation and summary ----
    agents.eval()
    returns, lengths, conventions = envs.evaluate(args.env, obs_name, greedy_act, args.eval_episodes,
                                                  seed=10101 + 1 + args.seed, history_len=history_len,
                                                  return_lengths=True, return_conventions=True)
    scores = data.normalized_score(returns)
    wall = wall_before + time.time() - t0
    summary = dict(algorithm=algorithm, env=args.env, obs=obs_name,
                   dataset_id=data.dataset_id, seed=args.seed, config=vars(args), eval_episodes=args.eval_episodes,
                   normalized_score_mean=float(scores.mean()), normalized_score_std=float(scores.std()),
                   episode_returns=returns.tolist(), episode_normalized_scores=scores.tolist(),
                   train_steps=step, wall_time_s=wall, git_commit=git_commit())
    summary.update(method=algorithm.replace("-", "_"), **envs.record_fields(code, data, args.budget, lengths, conventions),
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
    for sim in sims:
        sim.close()
    print(f"final normalised score {scores.mean():.3f} +- {scores.std():.3f} over {len(returns)} greedy episodes; "
          f"{step} steps in {wall:.0f}s; online rows {buffer.size - len(data)}; run {run_dir}")
    if summary["critic_diverged"]:
        print(f"warning: the critic diverged ({summary['critic_diverged']['reason']} at step "
              f"{summary['critic_diverged']['step']}): this score is not MAIQL's; results.py leaves it out of the tables")
    return summary


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except envs.MomaError as e:
        raise SystemExit(f"error: {e}")
