"""MOMA-PPO: Model-based Offline Multi-Agent PPO (Barde et al., AAMAS 2024, Algorithm 1).

    python moma_ppo.py --env ant --obs partial
    python moma_ppo.py --env coordination --dataset unfavorable

1. Load the offline dataset (built locally if missing) and the world-model ensemble of that dataset
   (`world_model.py`; trained and cached if missing). The world model works on the global state, so one
   model serves every observation function of a dataset.
2. Every iteration, generate synthetic data (Algorithm 1): b start states drawn uniformly from the
   dataset, each with its real 10-step per-agent histories; k steps of the current decentralised policies
   inside the world model; reward r~ = r_bar - λ_r ε_r - λ_g ε_g; timeout ζ = 0 at the last step or where
   the *unclamped* ε_g ≥ l_ε (the authors' code clamped ε_g first, so its adaptive rollout length never fired:
   docs/deviations.md §12); rollouts stop at predicted terminals f = 0.
3. Train MAPPO on that data: per-agent policies and values (no parameter sharing), a QMIX-mixed team value
   V(s) = Σ_i w_i(s) V_i(h_i) + b(s) with w_i ≥ 0 (paper §3.2; the authors' mixer left w_i unconstrained,
   docs/deviations.md §14), per-agent clipped ratios with the shared advantage (MAPPO; the authors used one
   joint ratio, docs/deviations.md §15).

All agents are evaluated in one batched network: per-agent weights are stacked [n_agents, in, out] and
applied with one bmm per layer; observations are zero-padded to a common width. Everything in the rollout
is a tensor over [agents, rollouts]: there is no Python loop over agents or rollouts on the hot path.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import random
import subprocess
import time
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import envs
from envs import MomaError

# Per-env defaults chosen for a 2-core CPU. k = rollout horizon, λ_r / λ_g = penalty weights, l_ε = uncertainty
# threshold (paper §3). λ and l_ε are the authors' code defaults (docs/deviations.md §16); per-task values
# were not released. The coordination game follows the authors' toy settings (docs/deviations.md §17): k = 1,
# no history, no clipping, no penalty. Each Args field that defaults to None takes its env's value here (resolve;
# `--help` shows them). A missing world model is trained with world_model.py's own per-env settings (its PRESETS).
# Ant's minibatch of 1,024 makes ~80 updates per iteration of ~20k synthetic transitions (5 epochs): with 4,096
# (20 updates) the critic grew too slowly to value walking within the budget (docs/diagnosis.md, row c).
# 80 iterations: the learning curves are flat from about iteration 50 on; runs extended to 240 iterations scored
# the same (docs/diagnosis.md, row c).
# Reacher: 800 iterations. At 400, leader-only stopped on a rising curve (its follower still learning to read the
# elbow angle from its partner's motion): seeds 1-2 scored 0.90 / 0.89 on the paper's scale at 400 (seed 3's 0.966
# on ours was below both), and seeds 1-3 0.967 / 0.977 / 0.924 at 800 (docs/diagnosis.md point 22). Its evaluations
# use 100 episodes: the 20 before were the easiest 20 of the final 100 targets and read 0.01 high, which hid that
# curve. Reacher episodes are cheap (100 in ~2 s).
# Ant's terminal_height_margin 0.1: a predicted torso height above 0.9 m ends a model rollout as a terminal. The world
# model misses the run-up to the policy's own jumps (from 10 steps out it predicts a 0.75 m peak where the torso
# reaches 1.02 m), so without it the full-observability policies learn gaits that jump in the simulator and not in the
# model. Three seeds of every Table 4b cell with and without it: docs/diagnosis.md point 24, docs/deviations.md §13.
PRESETS = {
    "coordination": dict(rollout_horizon=1, rollout_batch=2048, iterations=20, lambda_r=0.0, lambda_g=0.0,
                         uncertainty_threshold=float("inf"), uncertainty_cut="timeout", clip_to_dataset=False, minibatch_size=1024,
                         terminal_height_margin=0.0,
                         learning_rate=3e-3, hidden_dim=64, eval_every=10, eval_episodes_during=10),
    "reacher": dict(rollout_horizon=10, rollout_batch=1000, iterations=800, lambda_r=0.05, lambda_g=0.1,
                    uncertainty_threshold=2.0, uncertainty_cut="timeout", clip_to_dataset=True, minibatch_size=2048, learning_rate=3e-4,
                    hidden_dim=256, eval_every=20, eval_episodes_during=100, terminal_height_margin=0.0),
    "ant": dict(rollout_horizon=10, rollout_batch=2000, iterations=80, lambda_r=0.05, lambda_g=0.1,
                uncertainty_threshold=2.0, uncertainty_cut="terminal", clip_to_dataset=True, minibatch_size=1024, learning_rate=3e-4,
                hidden_dim=256, eval_every=10, eval_episodes_during=5, terminal_height_margin=0.1),
}


@dataclasses.dataclass
class Args:
    env: envs.EnvName = "ant"
    """benchmark: coordination, reacher or ant"""
    obs: Optional[envs.ObsName] = None
    """observation function (None = the env's fully observable one: coordination full, reacher all-observant, ant full)"""
    dataset: Optional[str] = None
    """dataset name (None = the env's default: coordination unfavorable, reacher expert-mix, ant medium)"""
    seed: int = 1
    """seed of the agents, the rollouts and the evaluation"""
    cuda: bool = False
    """run on the GPU"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the run (default: this file's name, CleanRL's convention); its records are filed under the
    file's name, so a copy of the script never mixes its results with the original's"""
    run_dir: Optional[str] = None
    """run folder (default runs/<env>__<obs>__<dataset>__<exp_name>__<seed>__<time>); give it to --resume"""
    resume: bool = False
    """resume the run in --run-dir from its last checkpoint"""
    cross_play_with: tuple[str, ...] = ()
    """run folders of other finished runs of this method and task (e.g. the other seeds): after the final evaluation
    (at once, for a finished run given with --resume), play teams stitched from this run's agents and each one's
    and write cross_play.json (envs.py, "Cross-play"; off by default, as in the authors' evaluation code)"""
    results_dir: Optional[str] = None
    """when the run finishes, copy its small record (summary.json, curve.csv, command.txt; no checkpoints) to
    <results-dir>/<env>__<obs>__<dataset>__<method>__<seed>/ (run_all.sh passes results/<table>)"""
    budget: Optional[str] = None
    """name of the budget the run belongs to (run_all.sh's BUDGET); recorded in summary.json"""
    torch_threads: int = 2
    """torch CPU threads (2 on this 2-core machine: the batched rollouts and large minibatches use both)"""
    bf16: bool = False
    """the agents' matrix products in bfloat16 (torch.autocast), in the rollouts and the PPO updates; the networks'
    output layers, the world model, the losses, the weights and Adam stay fp32. 1.4-1.7x the synthetic steps/s on PO
    Ant with this CPU's AVX512-BF16 (docs/benchmarks.md, "bfloat16"); off by default: the tables are fp32"""

    # Synthetic rollouts (Algorithm 1); None = the env's preset.
    iterations: Annotated[Optional[int], envs.per_env_default(PRESETS, "iterations")] = None
    """PPO iterations (each: one batch of synthetic rollouts, then the updates)"""
    rollout_batch: Annotated[Optional[int], envs.per_env_default(PRESETS, "rollout_batch")] = None
    """b, rollouts started from dataset states per iteration"""
    rollout_horizon: Annotated[Optional[int], envs.per_env_default(PRESETS, "rollout_horizon")] = None
    """k, maximum model steps per rollout"""
    lambda_r: Annotated[Optional[float], envs.per_env_default(PRESETS, "lambda_r")] = None
    """λ_r, weight of the reward-variance penalty ε_r"""
    lambda_g: Annotated[Optional[float], envs.per_env_default(PRESETS, "lambda_g")] = None
    """λ_g, weight of the ensemble-covariance penalty ε_g"""
    uncertainty_threshold: Annotated[Optional[float], envs.per_env_default(PRESETS, "uncertainty_threshold")] = None
    """l_ε: penalties are capped at it, and a rollout times out where the unclamped ε_g ≥ l_ε"""
    continue_rollouts: float = 0.0
    """share of each iteration's b rollouts that continue from where the previous iteration's rollouts reached
    the horizon alive (no predicted terminal, no uncertainty cut), with their histories, instead of starting from a
    dataset state; the rest start from the dataset. Chains of rollouts then reach the states the policy visits after
    many of its own steps, where full-replay's jumps happen (docs/diagnosis.md points 10 and 23); the uncertainty
    cut still ends a chain that leaves the model's support. 0 = the paper (every rollout starts from the dataset)"""
    world_model_seed: int = 0
    """which cached ensemble to use (one per dataset and seed, shared by MOMA-PPO seeds as the authors did)"""

    # Ablations of §6.3.
    penalty: Literal["epistemic", "aleatoric"] = "epistemic"
    """epistemic: λ_r ε_r + λ_g ε_g (paper); aleatoric: MOPO's λ_a max_m ||σ²_m||"""
    lambda_aleatoric: float = 1.0
    """λ_a of the aleatoric ablation (MOPO's search used 1 and 5)"""
    clip_to_dataset: Annotated[Optional[bool], envs.per_env_default(PRESETS, "clip_to_dataset")] = None
    """clip next states and rewards to the dataset's bounding box (paper §3.1)"""
    adaptive_rollout: bool = True
    """end rollouts early where ε_g ≥ l_ε (paper §3.2)"""
    uncertainty_cut: Annotated[Optional[Literal["timeout", "terminal"]], envs.per_env_default(PRESETS, "uncertainty_cut")] = None
    """how a rollout cut by ε_g ≥ l_ε ends: a timeout that bootstraps from V at the uncertain predicted state (paper
    §3.2: ζ = 0), or a terminal without bootstrap, as MOReL's absorbing HALT state (the uncertain step keeps its
    reward; the value beyond it is lost, so reaching model uncertainty costs what falling costs). None = the env's
    preset: terminal on Ant (docs/diagnosis.md: the timeout lets the critic's extrapolation at uncertain states drive
    the policy, 0.02 vs 0.73 with full observability), timeout on Reacher (its rewards are <= 0, so a terminal's
    zero future would reward reaching uncertainty) and on the coordination game (no cut: l_ε = inf)"""
    bound_values: bool = False
    """clip the critic's values, where rollouts bootstrap from them, to the discounted returns the rewards can reach:
    [(min r - penalty cap) / (1 - γ), max r / (1 - γ)] with the dataset's reward range (the model's rewards are
    clipped to it). A value above it promises more than the best reward forever: the critic's extrapolation at
    uncertain states, which on Reacher (every reward <= 0) made the λ-returns positive (docs/diagnosis.md)"""
    eps_g_units: Literal["raw", "standardised"] = "raw"
    """units of ε_g: the dataset's raw state units (paper, authors' code) or each state dimension divided by its
    dataset std (an ablation: in raw Ant units the joint velocities dominate ε_g)"""
    ground_truth: bool = False
    """use the real simulator from the dataset states instead of the world model (slow)"""
    terminal_height_margin: Annotated[Optional[float], envs.per_env_default(PRESETS, "terminal_height_margin")] = None
    """Ant: a predicted next state whose torso height is within this margin of the healthy range's top (z > 1.0 - m)
    ends the model rollout as a terminal, as if the env's rule had fired there. The world model misses the run-up to
    the policy's own jumps: from 10 steps before one it predicts a peak of 0.75 m where the torso reaches 1.02 m, and
    neither its terminal nor the uncertainty cut fires (docs/diagnosis.md point 23); a margin charges the jump where
    the model's height first nears the limit. Every terminal in the Ant datasets is a jump (point 10), so only the top
    of the range gets one. 0 = the env's own rule (the paper's); Ant's preset 0.1, 0 elsewhere and under --ground-truth
    (the simulator's heights need no correction)"""
    termination_rule: bool = True
    """end model rollouts where the predicted next state breaks the env's termination rule (Ant: torso height
    outside [0.2, 1.0]) as well as where the learned terminal head votes so; False = the paper's head alone,
    which on ant medium missed most jumps above z = 1 and let the policy learn to jump (world_model.py)"""

    # Agents and PPO.
    use_history: Optional[bool] = None
    """condition on the 10-step history encoder (default: only for partially observable tasks)"""
    start_history: Literal["dataset", "policy", "zeros"] = "dataset"
    """histories that training rollouts start from: the dataset's (paper: the behaviour policy's actions), the
    dataset's observations with the current policy's mean actions (what a greedy agent's history holds in a real
    episode), or zero padding (as at an episode start)"""
    history_actions: Literal["sampled", "mean"] = "sampled"
    """actions appended to the histories during training rollouts: the sampled ones (paper), or the policy's mean,
    as in the greedy evaluation's histories"""
    hidden_dim: Annotated[Optional[int], envs.per_env_default(PRESETS, "hidden_dim")] = None
    """width of the 2 hidden layers of every policy, value and the mixer"""
    embed_dim: int = 64
    """width of the self-attention history encoder (the authors: 128)"""
    learning_rate: Annotated[Optional[float], envs.per_env_default(PRESETS, "learning_rate")] = None
    """Adam learning rate of every network"""
    anneal_lr: bool = False
    """anneal the learning rate linearly to 0 over the run's iterations (CleanRL's PPO default; not in the paper)"""
    update_epochs: int = 5
    """PPO epochs per iteration (the authors: 5)"""
    minibatch_size: Annotated[Optional[int], envs.per_env_default(PRESETS, "minibatch_size")] = None
    """transitions per minibatch"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE λ"""
    clip_coef: float = 0.2
    """PPO ratio clipping"""
    ent_coef: float = 0.0
    """entropy bonus"""
    vf_coef: float = 0.5
    """value loss weight"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    init_log_std: float = -0.5
    """initial log standard deviation of the Gaussian policies (actor_std=parameter)"""
    actor_std: Literal["parameter", "state"] = "parameter"
    """log σ of each agent's Gaussian: one learned parameter per action dimension (CleanRL), or the authors' head on
    the state, clamped to [-6, 0] (σ starts at 1)"""
    entropy_target: Optional[float] = None
    """the authors' adaptive entropy term: α += entropy_step (target - H) per minibatch (α >= 0), loss -α H with H
    the joint entropy of the team's policy; the authors' target is -2. None = off"""
    entropy_step: float = 0.001
    """step size of α in the adaptive entropy term"""
    action_penalty: float = 0.0
    """the authors' action-bound penalty Σ (1 - |μ|)² 1[|μ| > 1] on the mean actions (their weight: 1.0)"""

    # Evaluation and checkpoints.
    eval_every: Annotated[Optional[int], envs.per_env_default(PRESETS, "eval_every")] = None
    """iterations between greedy evaluations in the real environment"""
    eval_episodes_during: Annotated[Optional[int], envs.per_env_default(PRESETS, "eval_episodes_during")] = None
    """episodes of each evaluation during training"""
    eval_episodes: int = 100
    """greedy episodes of the final evaluation (paper: 100)"""
    checkpoint_every: int = 25
    """iterations between checkpoints"""


def resolve(args: Args) -> Args:
    """Fill the preset values and validate names."""
    obs = envs.check_names(args.env, args.obs, args.dataset)
    dataset = envs.DEFAULT_DATASET[args.env] if args.dataset is None else args.dataset
    preset = PRESETS[args.env]
    filled = {k: preset[k] for k in preset if getattr(args, k) is None}
    if args.ground_truth and args.terminal_height_margin is None:  # the margin corrects the model's heights only
        filled["terminal_height_margin"] = 0.0
    if args.use_history is None:  # the state is Markov under full observability: histories only cost time
        filled["use_history"] = (args.env, obs) in envs.PARTIALLY_OBSERVABLE
    if args.env == "coordination" and (args.use_history or filled.get("use_history")):
        raise MomaError("the coordination game runs without histories (docs/deviations.md §17); drop --use-history")
    if args.ground_truth and args.env == "coordination":
        raise MomaError("--ground-truth needs a MuJoCo env (reacher or ant)")
    return dataclasses.replace(args, obs=obs, dataset=dataset, **filled)


def method_name(args: Args) -> str:
    """The run's method as the tables name it: moma_ppo, or moma_ppo with its §6.3 ablation switches appended
    (e.g. moma_ppo-aleatoric-no_adaptive_rollout), so an ablation's record never lands in a MOMA-PPO cell."""
    parts = [pathlib.Path(__file__).stem]  # this file's name: a copy of the script files its records under its own name
    if args.penalty == "aleatoric":  # MOPO's search tried λ_a = 1 and 5: a λ_a other than 1 is its own method
        parts.append("aleatoric" if args.lambda_aleatoric == 1.0 else f"aleatoric_{args.lambda_aleatoric:g}")
    if not args.adaptive_rollout:
        parts.append("no_adaptive_rollout")
    if args.clip_to_dataset != PRESETS[args.env]["clip_to_dataset"]:
        parts.append("clip" if args.clip_to_dataset else "no_clip")
    if args.ground_truth:
        parts.append("ground_truth")
    if not args.termination_rule and args.env == "ant":  # the rule changes nothing where nothing terminates
        parts.append("no_termination_rule")
    # Every other algorithmic setting that differs from the env's preset or the default is named too (key=value),
    # so a diagnosis run never lands in the MOMA-PPO cell. The budget (iterations) is the record's budget instead.
    defaults = {f.name: f.default for f in dataclasses.fields(Args)}
    for key in ALGORITHMIC_SETTINGS:
        value, default = getattr(args, key), PRESETS[args.env].get(key, defaults[key])
        if key == "use_history":
            default = (args.env, args.obs) in envs.PARTIALLY_OBSERVABLE
        if key == "uncertainty_cut" and (not args.adaptive_rollout or args.ground_truth):
            continue  # no cut is ever made (no adaptive rollouts; the simulator's ε_g is 0): the same run either way
        if key == "terminal_height_margin" and args.ground_truth:
            continue  # resolve sets it to 0 there: the simulator's own heights
        if value != default:
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return "-".join(parts)


def method_name_from_argv(argv: list) -> str:
    """The record name of the run these command-line flags would make (run_all.sh asks, so both name cells alike)."""
    import tyro

    return method_name(resolve(tyro.cli(Args, args=argv)))


# Columns of training.csv (one row per iteration, kept in the run's record): the rollout statistics of
# collect_rollouts, the λ-return, the last minibatch's losses and policy spread, and the in-training evaluations.
TRAINING_COLUMNS = ("iteration", "synthetic_steps", "wall_time_s", "sps", "mean_length", "timeouts_by_uncertainty",
                    "terminals", "eps_g", "eps_g_at_terminals_over_threshold", "penalised_reward", "lambda_return",
                    "policy_loss", "value_loss", "entropy", "clipfrac", "action_std", "action_mean_abs",
                    "eval_score", "eval_mean_length", "eval_full_length_share", "continued", "start_age")


# Settings that change what MOMA-PPO learns (method_name spells out the ones a run changes).
ALGORITHMIC_SETTINGS = ("rollout_batch", "rollout_horizon", "continue_rollouts", "terminal_height_margin", "lambda_r",
                        "lambda_g", "uncertainty_threshold", "uncertainty_cut", "bound_values", "eps_g_units", "use_history", "start_history", "history_actions", "hidden_dim", "embed_dim",
                        "learning_rate", "anneal_lr", "update_epochs", "minibatch_size", "gamma", "gae_lambda", "clip_coef",
                        "ent_coef", "vf_coef", "max_grad_norm", "init_log_std", "actor_std", "entropy_target",
                        "entropy_step", "action_penalty", "world_model_seed", "bf16")


# --------------------------------------------------------------------------------------------------
# Networks: every layer holds one weight per agent, [n_agents, in, out], applied with one bmm.
# --------------------------------------------------------------------------------------------------
class AgentLinear(nn.Module):
    def __init__(self, n_agents: int, in_dim: int, out_dim: int, std: float = math.sqrt(2), bias: bool = True,
                 output: bool = False):
        super().__init__()
        self.output = output  # a network's output layer: fp32 even under --bf16's autocast
        w = torch.empty(n_agents, out_dim, in_dim)
        for i in range(n_agents):
            nn.init.orthogonal_(w[i], std)  # CleanRL's PPO initialisation, per agent
        self.weight = nn.Parameter(w.transpose(1, 2).contiguous())
        self.bias = nn.Parameter(torch.zeros(n_agents, 1, out_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [n, B, in] -> [n, B, out]
        if self.output:  # action means, log σ and values in bfloat16 (3 significant digits) would blur the PPO ratio
            with torch.autocast(x.device.type, enabled=False):
                x = x.to(self.weight.dtype)
                return torch.bmm(x, self.weight) if self.bias is None else torch.baddbmm(self.bias, x, self.weight)
        return torch.bmm(x, self.weight) if self.bias is None else torch.baddbmm(self.bias, x, self.weight)


class OutputLinear(nn.Linear):
    """nn.Linear that stays fp32 under --bf16's autocast (the mixer's output layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


def agent_mlp(n_agents: int, in_dim: int, hidden: int, out_dim: int, out_std: float) -> nn.Sequential:
    return nn.Sequential(AgentLinear(n_agents, in_dim, hidden), nn.Tanh(), AgentLinear(n_agents, hidden, hidden),
                         nn.Tanh(), AgentLinear(n_agents, hidden, out_dim, std=out_std, output=True))


class HistoryEncoder(nn.Module):
    """Paper §3.2: one self-attention layer, then soft-attention pooling, over the 10-step history.

    Per agent (docs/deviations.md §6): embed each (o, a) pair, add a sinusoidal position code (0 = oldest), one
    single-head self-attention with a residual and LayerNorm, then pool with scores q·tanh(W_k h_s).
    """

    def __init__(self, n_agents: int, in_dim: int, dim: int, length: int):
        super().__init__()
        self.dim = dim
        self.embed = AgentLinear(n_agents, in_dim, dim, std=1.0)
        self.qkv = AgentLinear(n_agents, dim, 3 * dim, std=1.0)
        self.norm_weight = nn.Parameter(torch.ones(n_agents, 1, 1, dim))
        self.norm_bias = nn.Parameter(torch.zeros(n_agents, 1, 1, dim))
        self.pool_key = AgentLinear(n_agents, dim, dim, std=1.0, bias=False)
        self.pool_query = nn.Parameter(torch.randn(n_agents, 1, 1, dim) / math.sqrt(dim))
        position = torch.arange(length, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(length, dim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq)
        self.register_buffer("position_code", pe)

    def forward(self, history: torch.Tensor) -> torch.Tensor:  # [n, B, H, d] -> [n, B, dim]
        n, b, h, d = history.shape
        history = history.reshape(n, b * h, d)
        x = self.embed(history).view(n, b, h, self.dim) + self.position_code
        # qkv(x) = history (W_e W_qkv) + ((b_e + pos) W_qkv + b_qkv): the same function with the two linear maps
        # multiplied first, so each step is projected from its (o, a) pair (17 wide on PO Ant) instead of from the
        # `dim`-wide embedding: ~7x fewer FLOPs in the encoder's largest GEMM (docs/benchmarks.md)
        per_position = torch.baddbmm(self.qkv.bias, self.embed.bias + self.position_code, self.qkv.weight)  # [n, H, 3dim]
        qkv = torch.bmm(history, torch.bmm(self.embed.weight, self.qkv.weight)).view(n, b, h, 3 * self.dim)
        q, k, v = (qkv + per_position[:, None]).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dim), dim=-1)
        x = F.layer_norm(x + attention @ v, (self.dim,)) * self.norm_weight + self.norm_bias
        keys = torch.tanh(self.pool_key(x.view(n, b * h, self.dim))).view(n, b, h, self.dim)
        weights = torch.softmax((keys * self.pool_query).sum(-1), dim=-1)  # [n, B, H]
        return (weights.unsqueeze(-1) * x).sum(2)


class Agents(nn.Module):
    """The n decentralised policies π_i(a_i | h_i), values V_i(h_i) and the QMIX mixer over the state."""

    def __init__(self, n_agents: int, obs_dim: int, action_dim: int, discrete: bool, state_dim: int,
                 hidden: int, use_history: bool, history_dim: int, embed_dim: int, init_log_std: float,
                 obs_mean: torch.Tensor, obs_std: torch.Tensor, state_mean: torch.Tensor, state_std: torch.Tensor,
                 actor_std: str = "parameter"):
        super().__init__()
        self.n_agents, self.obs_dim, self.action_dim, self.discrete = n_agents, obs_dim, action_dim, discrete
        self.use_history = use_history
        self.state_std_head = actor_std == "state" and not discrete
        in_dim = obs_dim + (embed_dim if use_history else 0)
        self.encoder = HistoryEncoder(n_agents, history_dim, embed_dim, envs.HISTORY_LEN) if use_history else None
        # With a state-dependent σ the actor outputs [mean, log σ]; its small last layer starts log σ near 0.
        self.actor = agent_mlp(n_agents, in_dim, hidden, action_dim * (2 if self.state_std_head else 1), out_std=0.01)
        self.log_std = None if discrete or self.state_std_head else \
            nn.Parameter(torch.full((n_agents, 1, action_dim), init_log_std))
        self.register_buffer("entropy_alpha", torch.zeros(()))  # α of the adaptive entropy term (checkpointed)
        self.critic = agent_mlp(n_agents, in_dim, hidden, 1, out_std=1.0)
        # QMIX-style mixer: non-negative weights w_i(s) and a bias b(s) from the global state.
        self.mixer = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                   OutputLinear(hidden, n_agents + 1))
        # Fixed input normalisers from the dataset (padded dims have mean 0, std 1).
        self.register_buffer("obs_mean", obs_mean)  # [n, 1, obs_dim]
        self.register_buffer("obs_std", obs_std)
        self.register_buffer("state_mean", state_mean)
        self.register_buffer("state_std", state_std)
        # Running statistics of the value targets: the critic predicts normalised values (MAPPO's ValueNorm), so
        # returns of hundreds (Ant) do not swamp the policy gradient under the global gradient clip.
        self.register_buffer("return_mean", torch.zeros(()))
        self.register_buffer("return_std", torch.ones(()))
        self.register_buffer("return_stats_ready", torch.zeros(()))

    def update_return_stats(self, returns: torch.Tensor, momentum: float = 0.9) -> None:
        mean, std = returns.mean(), returns.std().clamp(min=1e-2) if returns.numel() > 1 else torch.ones(())
        if self.return_stats_ready == 0:
            self.return_mean.copy_(mean), self.return_std.copy_(std), self.return_stats_ready.fill_(1)
        else:
            self.return_mean.mul_(momentum).add_((1 - momentum) * mean)
            self.return_std.mul_(momentum).add_((1 - momentum) * std)

    def denormalise(self, normalised_value: torch.Tensor) -> torch.Tensor:
        return normalised_value * self.return_std + self.return_mean

    def features(self, obs: torch.Tensor, history: Optional[torch.Tensor]) -> torch.Tensor:
        """obs [n, B, obs_dim] (raw, zero-padded), history [n, B, H, history_dim] -> network input."""
        x = (obs - self.obs_mean) / self.obs_std
        if not self.use_history:
            return x
        # Normalise the observation part of every history element; all-zero padding rows stay zero.
        hist_obs = (history[..., : self.obs_dim] - self.obs_mean.unsqueeze(2)) / self.obs_std.unsqueeze(2)
        real = (history.abs().sum(-1, keepdim=True) > 0).float()
        history = torch.cat([hist_obs * real, history[..., self.obs_dim:]], dim=-1)
        return torch.cat([self.encoder(history), x], dim=-1)

    def distribution(self, feats: torch.Tensor):
        out = self.actor(feats)
        if self.discrete:
            return torch.distributions.Categorical(logits=out)
        if self.state_std_head:  # the authors' GaussianPolicy: log σ clamped to [-6, 0]
            mean, log_std = out.chunk(2, dim=-1)
            return torch.distributions.Normal(mean, log_std.clamp(-6.0, 0.0).exp())
        return torch.distributions.Normal(out, self.log_std.exp().expand_as(out))

    def log_prob(self, dist, actions: torch.Tensor) -> torch.Tensor:  # -> [n, B]
        return dist.log_prob(actions) if self.discrete else dist.log_prob(actions).sum(-1)

    def entropy(self, dist) -> torch.Tensor:
        return dist.entropy() if self.discrete else dist.entropy().sum(-1)

    def team_value(self, feats: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """V(s) = Σ_i w_i(s) V_i(h_i) + b(s), w_i = |.| ≥ 0 (QMIX monotonicity), in normalised units. -> [B]"""
        agent_values = self.critic(feats).squeeze(-1)  # [n, B]
        mix = self.mixer((states - self.state_mean) / self.state_std)  # [B, n + 1]
        return (mix[:, :-1].abs() * agent_values.T).sum(-1) + mix[:, -1]

    def greedy(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.actor(feats)
        if self.discrete:
            return out.argmax(-1)
        return out[..., : self.action_dim].clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# GAE with terminal masks f and timeout masks ζ over [k, b] rollouts.
# --------------------------------------------------------------------------------------------------
def compute_gae(rewards, values, not_terminal, not_timeout, gamma: float, gae_lambda: float):
    """Advantages and value targets of k-step rollouts (all tensors [k, b]; values [k + 1, b]).

    For t = k-1 .. 0, with f_t = 1 - terminal and ζ_t = 0 at a timeout (last step or uncertainty cut):
        δ_t = r_t + γ f_t V(s_{t+1}) - V(s_t)            (bootstraps from V at timeouts, 0 at terminals)
        A_t = δ_t + γ λ f_t ζ_t A_{t+1}                   (nothing flows across a rollout's end)
        G_t = A_t + V(s_t)                                 (λ-return target of the value)
    Steps after a rollout's end are garbage but never leak into valid ones: the end step has f ζ = 0, and the
    masks select (torch.where) instead of multiplying, so a non-finite garbage value (a diverged model state
    after a terminal, reachable without clipping) cannot turn a valid advantage into NaN (0 * inf = NaN).
    (The authors regressed V on a Monte-Carlo return bootstrapped only at timeouts, docs/deviations.md §15; we use
    the standard λ-return, which has lower variance.)
    """
    k = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[0])
    zero = torch.zeros_like(rewards[0])
    for t in reversed(range(k)):
        bootstrap = torch.where(not_terminal[t] > 0, values[t + 1], zero)
        delta = rewards[t] + gamma * bootstrap - values[t]
        carried = torch.where(not_terminal[t] * not_timeout[t] > 0, next_advantage, zero)
        next_advantage = delta + gamma * gae_lambda * carried
        advantages[t] = next_advantage
    return advantages, advantages + values[:-1]


# --------------------------------------------------------------------------------------------------
# Models of the environment used for the rollouts.
# --------------------------------------------------------------------------------------------------
class GroundTruthSimulator:
    """Ablation of §6.3: the real simulator, restarted from each dataset state (no uncertainty; it terminates
    by the env's own rule, so `termination_rule` changes nothing here)."""

    def __init__(self, env: str, device):
        self.env, self.device, self.sims = env, device, []

    @torch.no_grad()
    def step(self, states, joint_actions, clip=True, generator=None, termination_rule=True, restart: bool = False,
             eps_g_units: str = "raw") -> dict:
        b = states.shape[0]
        while len(self.sims) < b:
            sim = envs.make_env(self.env)
            sim.reset(seed=len(self.sims))
            self.sims.append(sim)
        s_np, a_np = states.cpu().numpy(), joint_actions.clamp(-1, 1).cpu().numpy()
        out = np.zeros((b, s_np.shape[1]), dtype=np.float32)
        rewards, terminals = np.zeros(b, dtype=np.float32), np.zeros(b, dtype=np.float32)
        for j in range(b):  # a Python loop over simulators: this ablation is about fidelity, not speed
            sim = self.sims[j]
            if restart or sim._state is None or not np.array_equal(sim._state, s_np[j]):
                sim.set_state(s_np[j])
            _, out[j], rewards[j], term, _ = sim.step(envs.split_actions(self.env, a_np[j]))
            terminals[j] = term
        z = torch.zeros(b, device=self.device)
        t = lambda x: torch.as_tensor(x, device=self.device)  # noqa: E731
        return {"next_states": t(out), "rewards": t(rewards), "terminals": t(terminals), "eps_r": z, "eps_g": z,
                "aleatoric": z}


def penalised_reward(out: dict, args: Args) -> torch.Tensor:
    """r~ = r_bar - λ_r min(ε_r, l_ε) - λ_g min(ε_g, l_ε) (paper §3.2; uncertainties capped at l_ε, §3.1)."""
    cap = args.uncertainty_threshold
    if args.penalty == "aleatoric":
        return out["rewards"] - args.lambda_aleatoric * out["aleatoric"].clamp(max=cap)
    return out["rewards"] - args.lambda_r * out["eps_r"].clamp(max=cap) - args.lambda_g * out["eps_g"].clamp(max=cap)


# --------------------------------------------------------------------------------------------------
# Helpers shared by rollouts, updates and evaluation.
# --------------------------------------------------------------------------------------------------
class Layout:
    """Padding of per-agent observations, actions and histories to common widths, as index maps."""

    def __init__(self, env: str, obs: str, device):
        self.env = env
        self.n = envs.N_AGENTS[env]
        self.discrete = env == "coordination"
        self.obs_dims = envs.obs_dims(env, obs)
        self.obs_dim = max(self.obs_dims)
        act = envs.action_dims(env)
        if len(set(act)) != 1:
            raise MomaError(f"{env}: agents with different action sizes are not supported")
        self.action_dim = envs.COORDINATION_N_ACTIONS if self.discrete else act[0]
        self.history_dim = self.obs_dim + self.action_dim
        # state index of every padded observation slot; padded slots read a zero column appended to the state
        state_dim = envs.STATE_DIM[env]
        index = torch.full((self.n, self.obs_dim), state_dim, dtype=torch.long)
        for i, ix in enumerate(envs.obs_indices(env, obs)):
            index[i, : len(ix)] = torch.as_tensor(ix)
        self.obs_index = index.to(device)
        self.action_index = torch.as_tensor(envs.ACTION_INDICES[env], device=device)  # [n, a]
        self.joint_action_dim = envs.JOINT_ACTION_DIM[env]

    def observe(self, states: torch.Tensor) -> torch.Tensor:  # [B, S] -> [n, B, obs_dim]
        padded = torch.cat([states, torch.zeros_like(states[:, :1])], dim=1)
        return padded[:, self.obs_index].permute(1, 0, 2)

    def joint(self, actions: torch.Tensor) -> torch.Tensor:
        """Per-agent actions [n, B, a] (or ints [n, B]) -> joint action [B, A] in the env's order."""
        if self.discrete:
            return actions.T
        b = actions.shape[1]
        joint = actions.new_zeros(b, self.joint_action_dim)
        joint[:, self.action_index.reshape(-1)] = actions.permute(1, 0, 2).reshape(b, -1)
        return joint

    def history_step(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """One history element per agent [n, B, history_dim]: (o, a) with a clipped (or one-hot)."""
        a = F.one_hot(actions, self.action_dim).float() if self.discrete else actions.clamp(-1.0, 1.0)
        return torch.cat([obs, a], dim=-1)

    def pad_histories(self, histories: list) -> torch.Tensor:
        """envs' per-agent [B, H, o_i + a_i] histories -> [n, B, H, history_dim] in this layout."""
        b, h = histories[0].shape[:2]
        out = np.zeros((self.n, b, h, self.history_dim), dtype=np.float32)
        for i, (hist, o) in enumerate(zip(histories, self.obs_dims)):
            out[i, :, :, :o] = hist[..., :o]
            out[i, :, :, self.obs_dim:] = hist[..., o:]
        return torch.as_tensor(out, device=self.obs_index.device)

    def dataset_history_table(self, data: envs.OfflineData) -> torch.Tensor:
        """[n, N + 1, history_dim] table; row N is the zero padding (see envs.OfflineData)."""
        tables = [data.history_table(i)[:, None] for i in range(self.n)]
        return self.pad_histories(tables)[:, :, 0]


def greedy_policy(agents: Agents, layout: Layout, device):
    """The act() function envs.evaluate expects: greedy (mean / argmax) decentralised actions."""

    @torch.no_grad()
    def act(observations, histories):
        b = observations[0].shape[0]
        obs = torch.zeros(layout.n, b, layout.obs_dim, device=device)
        for i, o in enumerate(observations):
            obs[i, :, : o.shape[1]] = torch.as_tensor(o, device=device)
        hist = layout.pad_histories(histories) if agents.use_history else None
        actions = agents.greedy(agents.features(obs, hist)).cpu().numpy()
        return [actions[i] for i in range(layout.n)]

    return act


@torch.no_grad()
def start_histories(agents: Agents, layout: Layout, history_table: torch.Tensor, history_index: torch.Tensor,
                    rows: torch.Tensor, source: str) -> torch.Tensor:
    """The [n, b, H, d] histories of dataset rows `rows` that rollouts start from (see Args.start_history)."""
    index = history_index[rows]  # [b, H]; the value N (the table's last row) is padding
    if source == "dataset":
        return history_table[:, index]
    n, b, h = layout.n, *index.shape
    if source == "zeros":
        return history_table.new_zeros(n, b, h, history_table.shape[-1])
    # "policy": each history row keeps its dataset observation; its action becomes the current policy's mean action
    # there, computed from that row's own dataset history (one batched forward over the b x H rows)
    flat = index.reshape(-1)
    real = flat < history_table.shape[1] - 1
    obs = history_table[:, flat, : layout.obs_dim]
    mean_action = agents.greedy(agents.features(obs, history_table[:, history_index[flat.clamp(max=len(history_index) - 1)]]))
    entries = layout.history_step(obs, mean_action) * real[None, :, None]
    return entries.view(n, b, h, -1)


def value_range(rewards: np.ndarray, args: Args) -> tuple[float, float]:
    """[lowest, highest] discounted return of rewards in the dataset's range, less the capped penalties (Args.bound_values)."""
    lambdas = (args.lambda_aleatoric,) if args.penalty == "aleatoric" else (args.lambda_r, args.lambda_g)
    penalty_cap = sum(lam * args.uncertainty_threshold for lam in lambdas if lam > 0)  # inf where l_ε = inf
    return (float(rewards.min()) - penalty_cap) / (1.0 - args.gamma), float(rewards.max()) / (1.0 - args.gamma)


@torch.no_grad()
def collect_rollouts(agents: Agents, model, layout: Layout, states_all: torch.Tensor, history_table, history_index,
                     args: Args, generator: torch.Generator, values_between: Optional[tuple[float, float]] = None,
                     pool: Optional[dict] = None):
    """Algorithm 1's inner loops, vectorised over the b rollouts and the n agents. Returns the valid
    transitions flattened for PPO (per-agent tensors lead with the agent axis), rollout statistics, and the pool of
    rollouts that reached the horizon alive (their next states, histories and ages in model steps since a dataset
    state), from which Args.continue_rollouts starts the next iteration's rollouts."""
    device = states_all.device
    k, b = args.rollout_horizon, args.rollout_batch
    n_pool = 0 if pool is None else len(pool["states"])
    n_continued = min(int(round(args.continue_rollouts * b)), n_pool)
    rows = torch.randint(len(states_all), (b - n_continued,), device=device, generator=generator)
    state = states_all[rows]
    hist = start_histories(agents, layout, history_table, history_index, rows, args.start_history) \
        if args.use_history else None  # [n, b, H, d]
    age = torch.zeros(b - n_continued, device=device)  # model steps since the chain left the dataset
    if n_continued > 0:  # Args.continue_rollouts: a random subset of last iteration's survivors carries on
        picked = torch.randperm(n_pool, device=device, generator=generator)[:n_continued]
        state = torch.cat([pool["states"][picked], state])
        age = torch.cat([pool["age"][picked], age])
        if args.use_history:
            hist = torch.cat([pool["hist"][:, picked], hist], dim=1)
    start_age = float(age.mean())
    buf = {key: [] for key in ("obs", "hist", "actions", "logp", "values", "rewards", "f", "zeta", "states",
                               "eps_g", "cut", "terminal")}
    alive = torch.ones(b, device=device)  # 1 while the rollout has not ended
    valid = []
    for j in range(k):
        obs = layout.observe(state)
        feats = agents.features(obs, hist)
        dist = agents.distribution(feats)
        actions = dist.sample()
        logp = agents.log_prob(dist, actions)
        value = agents.denormalise(agents.team_value(feats, state))
        joint = layout.joint(actions)
        out = model.step(state, joint if layout.discrete else joint.clamp(-1.0, 1.0),
                         clip=args.clip_to_dataset, generator=generator, termination_rule=args.termination_rule,
                         eps_g_units=args.eps_g_units)
        reward = penalised_reward(out, args)
        predicted_terminal = out["terminals"]
        if args.terminal_height_margin > 0:  # Args.terminal_height_margin: the rule moved down by the margin
            near_top = out["next_states"][:, 0] > envs.ANT_HEALTHY_Z[1] - args.terminal_height_margin
            predicted_terminal = torch.maximum(predicted_terminal, near_top.to(predicted_terminal.dtype))
        not_terminal = 1.0 - predicted_terminal
        # ζ = 0 at the last step, or where the unclamped ε_g reaches l_ε (adaptive rollout length); with
        # uncertainty_cut="terminal" the cut ends the rollout as a terminal instead (f = 0: no bootstrap)
        zeta = torch.ones(b, device=device) if j < k - 1 else torch.zeros(b, device=device)
        cut = (out["eps_g"] >= args.uncertainty_threshold).float() if args.adaptive_rollout else torch.zeros(b, device=device)
        if args.uncertainty_cut == "terminal":
            not_terminal = not_terminal * (1.0 - cut)
        else:
            zeta = zeta * (1.0 - cut)
        for key, value_ in (("obs", obs), ("hist", hist), ("actions", actions), ("logp", logp),
                            ("values", value), ("rewards", reward), ("f", not_terminal), ("zeta", zeta),
                            ("states", state), ("eps_g", out["eps_g"]), ("cut", cut), ("terminal", predicted_terminal)):
            buf[key].append(value_)
        valid.append(alive.clone())
        alive = alive * not_terminal * zeta
        if args.use_history:  # h_{j+1}: drop the oldest pair, append (o_j, a_j)
            in_history = dist.mean if args.history_actions == "mean" and not layout.discrete else actions
            hist = torch.cat([hist[:, :, 1:], layout.history_step(obs, in_history).unsqueeze(2)], dim=2)
        # A rollout valid at this step moves to its predicted next state (a timeout bootstraps from V there);
        # one that had already ended stays where it was, as does a non-finite prediction (possible without
        # clipping; it is a terminal by the termination rule), so garbage steps stay finite.
        moves = (valid[-1] > 0) & torch.isfinite(out["next_states"]).all(1)
        state = torch.where(moves[:, None], out["next_states"], state)
        if j == k - 1:  # alive through the horizon: neither a predicted terminal nor an uncertainty cut
            survived = moves & (predicted_terminal == 0) & (cut == 0)
    last_value = agents.denormalise(agents.team_value(agents.features(layout.observe(state), hist), state))
    values = torch.stack(buf["values"] + [last_value])
    if values_between is not None:  # Args.bound_values
        values = values.clamp(*values_between)
    advantages, returns = compute_gae(torch.stack(buf["rewards"]), values, torch.stack(buf["f"]),
                                      torch.stack(buf["zeta"]), args.gamma, args.gae_lambda)
    valid = torch.stack(valid).bool()  # [k, b]
    flat = valid.reshape(-1)
    n_valid = int(flat.sum())
    batch = {
        "obs": torch.stack(buf["obs"], 1).reshape(layout.n, k * b, -1)[:, flat],
        "actions": torch.stack(buf["actions"], 1).reshape(layout.n, k * b, *buf["actions"][0].shape[2:])[:, flat],
        "logp": torch.stack(buf["logp"], 1).reshape(layout.n, k * b)[:, flat],
        "states": torch.stack(buf["states"]).reshape(k * b, -1)[flat],
        "advantages": advantages.reshape(-1)[flat],
        "returns": returns.reshape(-1)[flat],
    }
    if args.use_history:
        batch["hist"] = torch.stack(buf["hist"], 1).reshape(layout.n, k * b, envs.HISTORY_LEN, -1)[:, flat]
    agents.update_return_stats(batch["returns"])
    batch["value_targets"] = (batch["returns"] - agents.return_mean) / agents.return_std
    eps_g = torch.stack(buf["eps_g"])
    terminal_steps = (torch.stack(buf["terminal"]) > 0) & valid  # the model's terminals, not uncertainty cuts
    stats = {"mean_length": n_valid / b, "penalised_reward": float(torch.stack(buf["rewards"])[valid].mean()),
             "eps_g": float(eps_g[valid].mean()),
             # share of rollouts cut by the uncertainty before the horizon, and ended by a predicted terminal
             "timeouts_by_uncertainty": float(((torch.stack(buf["cut"]) > 0) & valid)[:-1].sum()) / b,
             "terminals": float(terminal_steps.sum()) / b,
             # where terminals fall relative to the cut: ε_g / l_ε at terminal steps (< 1: the cut did not see them)
             "eps_g_at_terminals_over_threshold": float(eps_g[terminal_steps].mean() / args.uncertainty_threshold)
             if terminal_steps.any() else float("nan")}
    if args.continue_rollouts > 0:
        stats.update(continued=n_continued / b, start_age=start_age)
        survivors = {"states": state[survived], "age": age[survived] + k}
        if args.use_history:
            survivors["hist"] = hist[:, survived]
        return batch, stats, survivors
    return batch, stats, None


def evaluate(args: Args, act, n_episodes: int, seed: int, **returns):
    """Greedy episodes in the real env. One thread: a batch of <= 100 observations is too small to split, and
    two threads spinning on tiny ops cost 10x more on a busy machine (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return envs.evaluate(args.env, args.obs, act, n_episodes, seed=seed, **returns)  # return_lengths, ..._conventions
    finally:
        torch.set_num_threads(threads)


def build_agents(args: Args, layout: Layout, states_all: torch.Tensor) -> Agents:
    """The agents of a run, with their fixed input normalisers from the dataset's states (padded dims: 0, 1)."""
    obs_all = layout.observe(states_all)  # [n, N, obs_dim]
    obs_mean, obs_std = obs_all.mean(1, keepdim=True), obs_all.std(1, keepdim=True)
    obs_std = torch.where(obs_std < 1e-6, torch.ones_like(obs_std), obs_std)
    state_std = states_all.std(0)
    state_std = torch.where(state_std < 1e-6, torch.ones_like(state_std), state_std)
    return Agents(layout.n, layout.obs_dim, layout.action_dim, layout.discrete, envs.STATE_DIM[args.env],
                  args.hidden_dim, args.use_history, layout.history_dim, args.embed_dim, args.init_log_std,
                  obs_mean, obs_std, states_all.mean(0), state_std, actor_std=args.actor_std)


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=envs.REPO_DIR, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def main(args: Args) -> dict:
    # glibc would mmap (and page-fault in anew) every minibatch and rollout tensor above 32 MB: keep them in the heap
    envs.keep_large_allocations_in_the_heap()
    args = resolve(args)
    # Every argument is checked before any folder is made or any data is loaded (docs/usage.md, "Run safety").
    envs.check_args(args, at_least_one=("iterations", "rollout_batch", "rollout_horizon", "minibatch_size", "hidden_dim",
                                        "embed_dim", "update_epochs", "eval_every", "eval_episodes_during",
                                        "eval_episodes", "checkpoint_every"),
                    non_negative=("terminal_height_margin", "lambda_r", "lambda_g", "lambda_aleatoric", "ent_coef",
                                  "vf_coef", "entropy_step", "action_penalty", "world_model_seed"),
                    positive=("learning_rate", "clip_coef", "max_grad_norm"), finite=("init_log_std", "entropy_target"),
                    between={"gamma": (0.0, 1.0), "gae_lambda": (0.0, 1.0), "continue_rollouts": (0.0, 1.0)},
                    examples=PRESETS[args.env])
    if not args.uncertainty_threshold > 0:  # inf is allowed: no cut (the coordination game's preset)
        raise MomaError(f"--uncertainty-threshold must be > 0 (inf for no cut), got {args.uncertainty_threshold!r} "
                        f"(e.g. --uncertainty-threshold 2)")
    if args.terminal_height_margin > 0 and args.env != "ant":
        raise MomaError(f"--terminal-height-margin moves Ant's torso-height rule; {args.env} has no such rule "
                        f"(drop it)")
    if args.terminal_height_margin > 0 and args.ground_truth:
        raise MomaError("--terminal-height-margin corrects the world model's heights; --ground-truth runs the real "
                        "simulator (drop one)")
    if args.cuda and not torch.cuda.is_available():
        raise MomaError("--cuda was given but torch sees no GPU; drop --cuda to run on the CPU")
    device = torch.device("cuda" if args.cuda else "cpu")
    torch.set_num_threads(args.torch_threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = True
    start_time = time.time()

    given_run_dir = args.run_dir is not None
    run_dir = pathlib.Path(args.run_dir) if given_run_dir else envs.default_run_dir(
        args.env, args.obs, args.dataset, args.exp_name, args.seed)
    checkpoint_path = run_dir / "checkpoint.pt"
    if args.resume and not checkpoint_path.exists():
        raise MomaError(f"nothing to resume: {checkpoint_path} does not exist")
    envs.check_cross_play_partners(args.cross_play_with, run_dir)  # a wrong path fails now, not after training
    ck = None
    if args.resume:  # refuse another configuration before any work (the checkpoint records the run's arguments)
        ck = envs.load_checkpoint(checkpoint_path, device)
        envs.check_resume(ck["args"], dataclasses.asdict(args), "iterations", ck.get("iteration", 0), args.iterations)
    method = method_name(args)
    record = envs.record_name(args.env, args.obs, args.dataset, method, args.seed)
    envs.check_results_dir(args.results_dir, record, args.budget)
    code = envs.code_fingerprint(__file__, extra=("world_model.py",))  # hashed before training: the code that runs
    envs.check_free_space(run_dir, 0)  # before the world model, whose training may take half an hour

    # ---------------------------------------------------------------- data and world model
    data = envs.load_dataset(args.env, args.dataset, args.obs)
    if ck is not None and ck.get("dataset_fingerprint", data.fingerprint) != data.fingerprint:
        raise MomaError(f"dataset {data.dataset_id} was rebuilt with other data since checkpoint {checkpoint_path} "
                        f"was written; start a new run without --resume")
    if args.ground_truth:
        model = GroundTruthSimulator(args.env, device)
    else:
        import world_model

        model = world_model.load_or_train(args.env, args.dataset, seed=args.world_model_seed, device=device)
    model_record = None if args.ground_truth else world_model.provenance(model)
    if ck is not None and ck.get("world_model") is not None and model_record is not None:
        # A resume continues in the model the run trained in: a cache retrained in between (other settings, a
        # rebuilt dataset) would silently change the rollouts under the policy. The file's place may move.
        changed = [k for k in ck["world_model"] if k != "path" and ck["world_model"][k] != model_record.get(k)]
        if changed:
            raise MomaError(f"the world model changed since checkpoint {checkpoint_path} was written ({', '.join(changed)} "
                            f"differ: the cached model was retrained); start a new run without --resume")
    layout = Layout(args.env, args.obs, device)
    states_all = torch.as_tensor(data.states, device=device)
    history_table = layout.dataset_history_table(data) if args.use_history else None
    history_index = torch.as_tensor(data.history_index, device=device) if args.use_history else None

    agents = build_agents(args, layout, states_all).to(device)
    optimizer = torch.optim.Adam(agents.parameters(), lr=args.learning_rate, eps=1e-5)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    start_iteration, synthetic_steps, wall_before = 0, 0, 0.0  # wall_before: wall time of the earlier parts of a resumed run
    rollout_pool = None  # Args.continue_rollouts: the rollouts that reached the horizon alive last iteration
    if ck is not None:
        try:
            agents.load_state_dict(ck["agents"])
            optimizer.load_state_dict(ck["optimizer"])
            generator.set_state(ck["generator"].cpu() if device.type == "cpu" else ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            start_iteration, synthetic_steps = ck["iteration"], ck["synthetic_steps"]
            rollout_pool = ck.get("rollout_pool")  # Args.continue_rollouts: where the last rollouts stopped
            wall_before = ck.get("wall_s", 0.0)  # checkpoints from before the run records have no wall time
        except Exception as e:
            raise MomaError(f"checkpoint {checkpoint_path} is corrupt or from another configuration "
                            f"({type(e).__name__}: {e}); start a new run without --resume") from None
        envs.check_weights(start_iteration, agents, what=f"checkpoint {checkpoint_path} holds")
        del ck
        print(f"resuming {run_dir} at iteration {start_iteration}")
    envs.check_free_space(run_dir, 3 * envs.tensor_bytes(agents))  # weights and 2 Adam moments
    envs.make_run_dir(run_dir, given_run_dir)  # only now: an argument, data or model error leaves no folder behind

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))
    # The record of this table cell (see envs.py, "Run records"): command, eval curve, fingerprints.
    envs.write_command(run_dir, args.resume)
    curve = envs.CurveLog(run_dir, start_iteration if args.resume else None)
    training_log = envs.TableLog(run_dir / "training.csv", TRAINING_COLUMNS, start_iteration if args.resume else None)

    act = greedy_policy(agents, layout, device)
    eval_seed = 10101 + 1 + args.seed
    k, b = args.rollout_horizon, args.rollout_batch
    values_between = value_range(data.rewards, args) if args.bound_values else None

    def cross_play():  # --cross-play-with: this run's agents in teams with other runs' agents (envs.py, "Cross-play")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as evaluate(): batches of <= 100 observations
        try:
            return envs.cross_play(run_dir=run_dir, partners=args.cross_play_with, method=method, env=args.env,
                                   obs=args.obs, data=data, own_act=act,
                                   partner_act=lambda ck: greedy_policy(envs.load_team(agents, ck), layout, device),
                                   n_episodes=args.eval_episodes, seed=eval_seed, history_len=envs.HISTORY_LEN,
                                   record=record, results_dir=args.results_dir, budget=args.budget, code=code,
                                   device=device)
        finally:
            torch.set_num_threads(threads)

    if args.cross_play_with and start_iteration >= args.iterations and (run_dir / "summary.json").exists():
        return cross_play()  # a finished run given with --resume: only the teams are played; its record stays

    def save_checkpoint(iteration: int) -> None:
        envs.check_weights(iteration, agents)  # a diverged network is never checkpointed
        envs.save_checkpoint({"agents": agents.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
                              "synthetic_steps": synthetic_steps, "generator": generator.get_state(),
                              "wall_s": wall_before + time.time() - start_time, "torch_rng": torch.get_rng_state(),
                              "args": dataclasses.asdict(args), "dataset_fingerprint": data.fingerprint,
                              "world_model": model_record, "rollout_pool": rollout_pool}, checkpoint_path)

    bar = envs.progress_bar(range(start_iteration, args.iterations), initial=start_iteration, total=args.iterations,
                            desc=f"MOMA-PPO {args.env}/{args.obs}/{args.dataset}", dynamic_ncols=True)
    for iteration in bar:
        t_iter = time.time()
        if args.anneal_lr:  # CleanRL's linear schedule: the full rate at the first iteration, -> 0 at the last
            optimizer.param_groups[0]["lr"] = (1.0 - iteration / args.iterations) * args.learning_rate
        # ------------------------------------------------------------ synthetic rollouts (Algorithm 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):  # the world model stays fp32
            batch, stats, rollout_pool = collect_rollouts(agents, model, layout, states_all, history_table,
                                                          history_index, args, generator, values_between, rollout_pool)
        n_valid = len(batch["returns"])
        synthetic_steps += n_valid
        t_rollout = time.time() - t_iter

        # ------------------------------------------------------------ MAPPO update
        mb = min(args.minibatch_size, n_valid)
        clip_fractions = []
        for _ in range(args.update_epochs):
            perm = torch.randperm(n_valid, device=device, generator=generator)
            for start in range(0, n_valid - mb + 1, mb):
                idx = perm[start:start + mb]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):  # backward follows it
                    feats = agents.features(batch["obs"][:, idx], batch["hist"][:, idx] if args.use_history else None)
                    dist = agents.distribution(feats)
                    values = agents.team_value(feats, batch["states"][idx])
                new_logp = agents.log_prob(dist, batch["actions"][:, idx])  # [n, mb]
                adv = batch["advantages"][idx]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                ratio = (new_logp - batch["logp"][:, idx]).exp()  # one ratio per agent (MAPPO)
                pg_loss = -torch.min(ratio * adv, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * adv).mean()
                v_loss = 0.5 * (values - batch["value_targets"][idx]).pow(2).mean()
                entropy = agents.entropy(dist).mean()
                loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy
                if args.entropy_target is not None:  # the authors' adaptive α on the team's joint entropy
                    joint_entropy = agents.entropy(dist).sum(0).mean()
                    agents.entropy_alpha.add_(args.entropy_step * (args.entropy_target - joint_entropy.detach())).clamp_(min=0)
                    loss = loss - agents.entropy_alpha * joint_entropy
                if args.action_penalty > 0 and not layout.discrete:  # the authors' action-bound penalty on |μ| > 1
                    over = (dist.mean.abs() - 1).clamp(min=0)
                    loss = loss + args.action_penalty * over.pow(2).sum((0, 2)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(agents.parameters(), args.max_grad_norm)
                optimizer.step()
                clip_fractions.append(((ratio - 1).abs() > args.clip_coef).float().mean().item())
        sps = n_valid / max(time.time() - t_iter, 1e-9)
        step = iteration + 1
        writer.add_scalar("charts/SPS", sps, step)
        writer.add_scalar("charts/synthetic_steps", synthetic_steps, step)
        writer.add_scalar("charts/rollout_time_s", t_rollout, step)
        for key, value in stats.items():
            writer.add_scalar(f"rollouts/{key}", value, step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), step)
        writer.add_scalar("losses/value_loss", v_loss.item(), step)
        writer.add_scalar("losses/entropy", entropy.item(), step)
        writer.add_scalar("losses/clipfrac", float(np.mean(clip_fractions)), step)
        envs.check_losses(step, policy_loss=pg_loss, value_loss=v_loss, entropy=entropy)
        postfix = dict(sps=f"{sps:.0f}", len=f"{n_valid / b:.1f}", r=f"{float(batch['returns'].mean()):.3f}")
        row = dict(iteration=step, synthetic_steps=synthetic_steps, sps=sps, lambda_return=float(batch["returns"].mean()),
                   policy_loss=pg_loss.item(), value_loss=v_loss.item(), entropy=entropy.item(),
                   clipfrac=float(np.mean(clip_fractions)), action_std=dist.stddev.detach().mean().item() if not layout.discrete
                   else float("nan"), action_mean_abs=dist.mean.detach().abs().mean().item() if not layout.discrete else float("nan"),
                   **stats)

        if step % args.eval_every == 0 or step == args.iterations:
            returns_eval, lengths_eval = evaluate(args, act, args.eval_episodes_during, eval_seed, return_lengths=True)
            score = float(data.normalized_score(returns_eval).mean())
            row.update(eval_score=score, eval_mean_length=float(lengths_eval.mean()),
                       eval_full_length_share=float(np.mean(lengths_eval >= envs.EPISODE_STEPS[args.env])))
            writer.add_scalar("eval/episodic_return", float(returns_eval.mean()), step)
            writer.add_scalar("eval/normalized_score", score, step)
            curve.add(step, synthetic_steps, wall_before + time.time() - start_time, score, len(returns_eval))
            postfix["score"] = f"{score:.3f}"
        training_log.add(dict(row, wall_time_s=wall_before + time.time() - start_time))
        bar.set_postfix(postfix)
        if step % args.checkpoint_every == 0 or step == args.iterations:
            save_checkpoint(step)
    bar.close()
    envs.check_weights(args.iterations, agents)  # a broken policy never reaches a summary

    # ---------------------------------------------------------------- final evaluation (paper: 100 greedy episodes)
    returns_eval, lengths, conventions = evaluate(args, act, args.eval_episodes, eval_seed, return_lengths=True,
                                                  return_conventions=True)
    scores = data.normalized_score(returns_eval)
    summary = {
        "algorithm": pathlib.Path(__file__).stem, "env": args.env, "obs": args.obs, "dataset_id": data.dataset_id, "seed": args.seed,
        "config": dataclasses.asdict(args), "eval_episodes": args.eval_episodes,
        "normalized_score_mean": float(scores.mean()), "normalized_score_std": float(scores.std()),
        "episode_returns": returns_eval.tolist(), "episode_normalized_scores": scores.tolist(),
        "train_steps": int(synthetic_steps), "wall_time_s": wall_before + time.time() - start_time,
        "git_commit": git_commit(), "method": method, **envs.record_fields(code, data, args.budget, lengths, conventions),
        # the model the policy trained in (None: --ground-truth, the real simulator)
        "world_model": model_record,
    }
    curve.add(args.iterations, synthetic_steps, summary["wall_time_s"], summary["normalized_score_mean"], len(returns_eval))
    writer.add_scalar("eval/final_normalized_score", summary["normalized_score_mean"], args.iterations)
    writer.close()
    envs.write_summary(run_dir, summary)
    if args.results_dir is not None:
        print(f"record of this cell: {envs.save_record(run_dir, args.results_dir, record)}")
    if args.cross_play_with:
        cross_play()
    print(f"{data.dataset_id} {args.obs} seed {args.seed}: normalised score {summary['normalized_score_mean']:.3f} "
          f"± {summary['normalized_score_std']:.3f} over {args.eval_episodes} greedy episodes; "
          f"{synthetic_steps} synthetic steps in {summary['wall_time_s']:.0f} s -> {run_dir}")
    return summary


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except MomaError as e:
        raise SystemExit(f"error: {e}")
