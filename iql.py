"""Centralised IQL: one Implicit Q-Learning agent over the global state and the joint action.

The paper's upper bound for strategy agreement (paper §5.1, Tables 3-4): execution is centralised,
one policy π(a | s) picks the joint action a = (a_1, ..., a_n), so there is nothing for the agents
to agree on. IQL (Kostrikov et al. 2021) as in the authors' single-agent learner (docs/deviations.md §19.1):

    V-step:  L_V = E[ |τ - 1(Q̂ < V)| (Q̂ - V(s))² ],       Q̂ = min(Q1', Q2')(s, a) (target networks)
    π-step:  L_π = -E[ min(exp(β (Q̂ - V(s))), 100) log π(a | s) ]
    Q-step:  L_Q = E[ (y - Q1(s, a))² + (y - Q2(s, a))² ],   y = r + γ (1 - terminal) V(s')

then a soft update (τ = 0.005) of the target Q networks (and of the target history encoder).

* The network always sees the global state: `--obs` only names the task in the run folder and the
  summary (centralised IQL has one row per env in Table 4: it is not affected by observability).
  Greedy evaluation runs the fully observable task, where agent 0's observation is the state.
* Continuous actions: tanh-squashed Gaussian with state-dependent log-std in [-6, 0]; greedy action
  tanh(mean). Coordination game: the joint action is one of 4 = 2 x 2 categories, Q(s, ·) has one
  output per joint action, the greedy joint action is the argmax (paper Table 3's IQL).
* Histories: off by default (the state is Markov); `--history-len 10` conditions every network on
  the 10-step (s, a) history with MOMA-PPO's self-attention encoder (as the authors did,
  docs/deviations.md §19.1).
* Ant rewards x 1000 / (max - min dataset episode return), as the authors did for the IQL family
  (docs/deviations.md §18); returns and scores are reported raw. No gradient clipping (as the authors).
* V, π and Q losses are summed and take one backward pass: they touch disjoint heads and every
  target is detached, so this is the three IQL steps with one shared forward pass.

    python iql.py --env coordination --dataset unfavorable --total-steps 2000
    python iql.py --env reacher --total-steps 50000
    python iql.py --env ant --dataset medium --total-steps 50000
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
    """task's observation function (recorded only: centralised IQL always sees the global state)"""
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
    """gradient steps (authors: 1,000,001). None = 5k on the coordination game (solved after ~1k), 50k
    otherwise. Measured on the shared 2-core CPU (1 thread, nets 256-256, batch 256): ~45 steps/s on ant,
    so 50k steps ~ 20 min"""
    batch_size: int = 256
    hidden: int = 256
    """width of the two hidden layers of every MLP"""
    history_len: int = 0
    """history length (0 = none: the global state is Markov)"""
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
# Networks. AgentsMLP / AgentsHistoryEncoder are the per-agent batched modules of maiql.py, used here
# with a single "agent" (n = 1), so the encoder is exactly MOMA-PPO's.
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


class IQLAgent(nn.Module):
    """History encoder, double Q(s, a), V(s) and π(a | s) over the joint action."""

    LOG_STD_MIN, LOG_STD_MAX = -6.0, 0.0

    def __init__(self, state_dim: int, action_dim: int, discrete: bool, hidden: int, history_len: int,
                 history_in: int, history_dim: int):
        super().__init__()
        self.action_dim, self.discrete = action_dim, discrete
        self.encoder = AgentsHistoryEncoder(1, history_in, history_len, history_dim) if history_len > 0 else None
        x_dim = state_dim + (history_dim if history_len > 0 else 0)
        q_in, q_out = (x_dim, action_dim) if discrete else (x_dim + action_dim, 1)
        self.q = AgentsMLP(2, [q_in, hidden, hidden, q_out])  # members Q1, Q2
        self.v = AgentsMLP(1, [x_dim, hidden, hidden, 1])
        self.policy = AgentsMLP(1, [x_dim, hidden, hidden, action_dim if discrete else 2 * action_dim])

    def features(self, states: torch.Tensor, hist: Optional[torch.Tensor], encoder=None) -> torch.Tensor:
        """states [B, S], hist [B, H, d] -> network input [1, B, (emb,) S] (embedding first, docs/deviations.md §6)."""
        encoder = self.encoder if encoder is None else encoder
        if encoder is None:
            return states[None]
        return torch.cat([encoder(hist[None]), states[None]], dim=-1)

    def q_values(self, x: torch.Tensor, actions: torch.Tensor, q_net: Optional[AgentsMLP] = None) -> torch.Tensor:
        """-> [2, B]: Q1, Q2 of the joint actions (ints [B] if discrete, else [B, A])."""
        q_net = self.q if q_net is None else q_net
        if self.discrete:
            return q_net(x.repeat(2, 1, 1)).gather(-1, actions[None, :, None].expand(2, -1, 1)).squeeze(-1)
        return q_net(torch.cat([x, actions[None]], -1).repeat(2, 1, 1)).squeeze(-1)

    def log_prob(self, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log π(a | x) -> [B]; continuous: tanh-squashed Gaussian with the tanh Jacobian (ε = 1e-5)."""
        out = self.policy(x)[0]
        if self.discrete:
            return torch.log_softmax(out, -1).gather(-1, actions[:, None]).squeeze(-1)
        mean, log_std = out.split(self.action_dim, dim=-1)
        a = actions.clamp(-1 + 1e-5, 1 - 1e-5)  # data actions may sit on the bound; atanh(±1) = ±inf
        std = log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX).exp()
        logp = torch.distributions.Normal(mean, std).log_prob(torch.atanh(a)) - torch.log(1 - a.pow(2) + 1e-5)
        return logp.sum(-1)

    def greedy(self, x: torch.Tensor) -> torch.Tensor:
        out = self.policy(x)[0]
        return out.argmax(-1) if self.discrete else torch.tanh(out[:, : self.action_dim])


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """IQL's asymmetric L2: |τ - 1(diff < 0)| diff², diff = Q̂ - V (V is pushed up towards Q̂'s τ-expectile)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


def awr_weights(advantage: torch.Tensor, beta: float, max_weight: float = 100.0) -> torch.Tensor:
    """Advantage-weighted regression weights min(exp(β A), max_weight) (IQL; docs/deviations.md §19.1)."""
    return torch.exp(beta * advantage).clamp(max=max_weight)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters()):
            t.lerp_(s, tau)


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).parent,
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return "unknown"


def main(args: Args) -> dict:
    obs_name = envs.check_names(args.env, args.obs, args.dataset)
    dataset = args.dataset or envs.DEFAULT_DATASET[args.env]
    if args.total_steps is None:
        args = dataclasses.replace(args, total_steps=5_000 if args.env == "coordination" else 50_000)
    # Every argument is checked before any folder is made or any data is loaded (docs/usage.md, "Run safety").
    envs.check_args(args, at_least_one=("total_steps", "batch_size", "hidden", "history_dim", "eval_episodes"),
                    non_negative=("history_len", "eval_every", "checkpoint_every", "gamma"),
                    positive=("learning_rate", "beta", "max_weight", "tau"),
                    between={"gamma": (0.0, 1.0), "expectile": (0.0, 1.0), "tau": (0.0, 1.0)})
    algorithm = pathlib.Path(__file__).stem  # the method its records are filed under: this file's name
    given_run_dir = args.run_dir is not None
    run_dir = pathlib.Path(args.run_dir) if given_run_dir else envs.default_run_dir(
        args.env, obs_name, dataset, args.exp_name, args.seed)
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

    ck = None
    if args.resume:  # refuse another configuration before any work (the checkpoint records the run's arguments)
        ck = envs.load_checkpoint(ckpt_path, device)
        envs.check_resume(ck["args"], vars(args), "total_steps", ck.get("step", 0), args.total_steps)

    # Centralised: load the fully observable split, whose agent-0 observation is the global state.
    full_obs = envs.DEFAULT_OBS[args.env]
    history_len = 0 if args.env == "coordination" else args.history_len  # the round index is the whole state
    data = envs.load_dataset(args.env, dataset, full_obs, history_len=max(history_len, 1))
    discrete, N, S = args.env == "coordination", len(data), data.states.shape[1]
    n = data.n_agents
    action_dim = envs.COORDINATION_N_ACTIONS ** n if discrete else data.joint_actions.shape[1]
    reward_scale = 1.0
    if args.env == "ant" and args.normalize_rewards:
        returns = data.episode_returns()
        reward_scale = float(1000.0 / max(returns.max() - returns.min(), 1e-6))

    def joint_index(actions: np.ndarray) -> np.ndarray:
        """Coordination: per-agent ints [..., n] -> joint category Σ_i a_i 2^(n-1-i)."""
        return (actions * (envs.COORDINATION_N_ACTIONS ** np.arange(n - 1, -1, -1))).sum(-1)

    def tensor(a, dtype=torch.float32):
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)

    states, next_states = tensor(data.states), tensor(data.next_states)
    rewards, terminals = tensor(data.rewards) * reward_scale, tensor(data.terminals)
    actions = tensor(joint_index(data.joint_actions), torch.int64) if discrete else tensor(data.joint_actions)
    # Joint history table: row t = (s_t, joint action features of every agent); row N = zero padding.
    action_features = np.concatenate([envs.history_action_features(args.env, a) for a in data.actions], axis=1)
    table = tensor(np.concatenate([np.concatenate([data.states, action_features], 1), np.zeros((1, S + action_features.shape[1]))]))
    hist_index, next_hist_index = tensor(data.history_index, torch.int64), tensor(data.next_history_index, torch.int64)

    agent = IQLAgent(S, action_dim, discrete, args.hidden, history_len, table.shape[1], args.history_dim).to(device)
    target_q = copy.deepcopy(agent.q).requires_grad_(False)
    target_encoder = copy.deepcopy(agent.encoder).requires_grad_(False) if agent.encoder is not None else None
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    step, wall_before = 0, 0.0
    if ck is not None:
        if ck.get("dataset_fingerprint", data.fingerprint) != data.fingerprint:
            raise envs.MomaError(f"dataset {data.dataset_id} was rebuilt with other data since checkpoint {ckpt_path} "
                                 f"was written; start a new run without --resume")
        try:
            agent.load_state_dict(ck["agent"])
            target_q.load_state_dict(ck["target_q"])
            if target_encoder is not None:
                target_encoder.load_state_dict(ck["target_encoder"])
            optimizer.load_state_dict(ck["optimizer"])
            step, wall_before = ck["step"], ck["wall_s"]
            generator.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            np.random.set_state(ck["numpy_rng"])
        except Exception as e:
            raise envs.MomaError(f"checkpoint {ckpt_path} does not fit this run ({type(e).__name__}: {str(e)[:200]}); "
                                 f"start a new run without --resume") from None
        envs.check_weights(step, agent, target_q, target_encoder, what=f"checkpoint {ckpt_path} holds")
        del ck
        print(f"resumed {run_dir} at step {step}")
    envs.check_free_space(run_dir, 4 * envs.tensor_bytes(agent))  # weights, 2 Adam moments, targets
    # The record of this table cell (see envs.py, "Run records"): command, eval curve, fingerprints.
    record = envs.record_name(args.env, obs_name, dataset, algorithm, args.seed)
    envs.check_results_dir(args.results_dir, record, args.budget)
    envs.make_run_dir(run_dir, given_run_dir)  # only now: an argument or data error leaves no folder behind
    code = envs.code_fingerprint(__file__)  # hashed before training: the code that runs, even if edited meanwhile
    envs.write_command(run_dir, args.resume)
    curve = envs.CurveLog(run_dir, step if args.resume else None)
    # training.csv: losses and the critic's mean value every 1000 steps, and whether it diverged (envs.CriticLog);
    # q_loss sums the two heads' mean squared TD errors
    critic_log = envs.CriticLog(run_dir, rewards.cpu().numpy(), args.gamma, td_terms=2,
                                extra_columns=("v_loss", "policy_loss"), resume_step=step if args.resume else None)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    t0 = time.time()

    def save_checkpoint():
        envs.check_weights(step, agent, target_q, target_encoder)  # a diverged network is never checkpointed
        envs.save_checkpoint(dict(agent=agent.state_dict(), target_q=target_q.state_dict(),
                                  target_encoder=None if target_encoder is None else target_encoder.state_dict(),
                                  optimizer=optimizer.state_dict(), step=step, wall_s=wall_before + time.time() - t0,
                                  generator=generator.get_state(), torch_rng=torch.get_rng_state(),
                                  numpy_rng=np.random.get_state(), args=vars(args),
                                  dataset_fingerprint=data.fingerprint), ckpt_path)

    def greedy_act(observations, histories, agent=agent):  # agent=: another run's team, for cross-play
        """Fully observable task: agent 0 sees the state; the joint history is agent 0's (s, a_0) history
        plus the other agents' action features."""
        with torch.no_grad():
            hist = None
            if history_len > 0:
                parts = [histories[0]] + [h[..., o.shape[-1]:] for h, o in zip(histories[1:], observations[1:])]
                hist = tensor(np.concatenate(parts, -1))
            a = agent.greedy(agent.features(tensor(observations[0]), hist)).cpu().numpy()
        if discrete:  # joint category -> per-agent ints
            return [(a // envs.COORDINATION_N_ACTIONS ** (n - 1 - i)) % envs.COORDINATION_N_ACTIONS for i in range(n)]
        return envs.split_actions(args.env, a)


    def cross_play():  # --cross-play-with: this run's agents in teams with other runs' agents (envs.py, "Cross-play")
        return envs.cross_play(run_dir=run_dir, partners=args.cross_play_with, method=algorithm, env=args.env,
                               obs=obs_name, eval_obs=full_obs, data=data, own_act=greedy_act,
                               partner_act=lambda ck: lambda o, h, team=envs.load_team(agent, ck, "agent"): greedy_act(o, h, team),
                               n_episodes=args.eval_episodes, seed=10101 + 1 + args.seed, history_len=history_len,
                               record=record, results_dir=args.results_dir, budget=args.budget, code=code, device=device)

    if args.cross_play_with and step >= args.total_steps and (run_dir / "summary.json").exists():
        return cross_play()  # a finished run given with --resume: only the teams are played; its record stays

    # ---- training loop ----
    t_last, step_last, sps = time.time(), step, 0.0
    v_loss = q_loss = policy_loss = torch.zeros(())  # a resumed run may have nothing left to train
    # a plain progress line about once a minute (phase, step/total, rate, ETA), in batch logs and terminals alike
    bar = envs.PlainProgress(total=args.total_steps, initial=step, desc=f"IQL {args.env}/{obs_name}/{dataset}")
    while step < args.total_steps:
        rows = torch.randint(0, N, (args.batch_size,), device=device, generator=generator)
        hist = table[hist_index[rows]] if history_len > 0 else None
        next_hist = table[next_hist_index[rows]] if history_len > 0 else None
        a = actions[rows]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):  # --bf16; backward outside
            with torch.no_grad():
                x_target = agent.features(states[rows], hist, target_encoder)
                q_target = agent.q_values(x_target, a, target_q).min(0).values  # Q̂ = min(Q1', Q2')
                x_next = agent.features(next_states[rows], next_hist, target_encoder)
                y = rewards[rows] + args.gamma * (1.0 - terminals[rows]) * agent.v(x_next)[0, :, 0]
            x = agent.features(states[rows], hist)
            v = agent.v(x)[0, :, 0]
            v_loss = expectile_loss(q_target - v, args.expectile)  # V-step
            weights = awr_weights(q_target - v.detach(), args.beta, args.max_weight)
            policy_loss = -(weights * agent.log_prob(x, a)).mean()  # π-step (AWR)
            q_loss = (y - agent.q_values(x, a)).pow(2).sum(0).mean()  # Q-step
        optimizer.zero_grad(set_to_none=True)
        (v_loss + policy_loss + q_loss).backward()
        optimizer.step()
        soft_update(target_q, agent.q, args.tau)
        if target_encoder is not None:
            soft_update(target_encoder, agent.encoder, args.tau)
        step += 1
        bar.update(1)

        if step % 1000 == 0 or step == args.total_steps:
            sps = (step - step_last) / max(time.time() - t_last, 1e-9)
            t_last, step_last = time.time(), step
            writer.add_scalar("charts/SPS", sps, step)
            writer.add_scalar("losses/v_loss", v_loss.item(), step)
            writer.add_scalar("losses/q_loss", q_loss.item(), step)
            writer.add_scalar("losses/policy_loss", policy_loss.item(), step)
            writer.add_scalar("losses/awr_weight_mean", weights.mean().item(), step)
            writer.add_scalar("losses/q_mean", q_target.mean().item(), step)
            critic_log.add(step, td_loss=q_loss.item(), value_mean=q_target.mean().item(), v_loss=v_loss.item(),
                           policy_loss=policy_loss.item())
            envs.check_losses(step, v_loss=v_loss, q_loss=q_loss, policy_loss=policy_loss)
        if args.eval_every > 0 and step % args.eval_every == 0 and step < args.total_steps:
            envs.check_losses(step, v_loss=v_loss, q_loss=q_loss, policy_loss=policy_loss)
            eval_ret = envs.evaluate(args.env, full_obs, greedy_act, 10, seed=10101 + 1000 * step, history_len=history_len)
            writer.add_scalar("eval/episodic_return", eval_ret.mean(), step)
            eval_score = float(data.normalized_score(eval_ret).mean())
            writer.add_scalar("eval/normalized_score", eval_score, step)
            curve.add(step, step * args.batch_size, wall_before + time.time() - t0, eval_score, len(eval_ret))
            print(f"step {step} | greedy return {eval_ret.mean():.3f} | q_loss {q_loss.item():.4f} | "
                  f"v_loss {v_loss.item():.4f} | SPS {sps:.0f}", flush=True)
        if args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            save_checkpoint()
    envs.check_losses(step, v_loss=v_loss, q_loss=q_loss, policy_loss=policy_loss)
    bar.close()
    save_checkpoint()  # checks the weights first: a broken policy never reaches the evaluation or a summary

    # ---- final greedy evaluation and summary ----
    returns, lengths, conventions = envs.evaluate(args.env, full_obs, greedy_act, args.eval_episodes,
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
