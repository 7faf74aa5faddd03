"""The world model of MOMA-PPO (paper §3.1): an ensemble of Gaussian dynamics models, batched and fast.

`python world_model.py --env ant --dataset medium` trains, evaluates and saves one ensemble for a dataset;
`moma_ppo.py` calls `load_or_train(env, dataset, seed)` and then `model.step(states, joint_actions)`.

What is modelled (paper §3.1). The agents interact only through this model, so it predicts the
**global state** s' and the shared reward r from (s, a) with a the joint action. It works on the global
state, not on the concatenated per-agent observations as the authors' code does (docs/deviations.md §7:
that duplicates the state per agent and inflates ε_g), so one model serves every observation function
of a dataset. Each of the N_m = 7 members predicts
  * a diagonal Gaussian over [s' - s, r] (the change of state is easier to learn than s'; s is added
    back at inference), trained with the Gaussian negative log-likelihood;
  * a Bernoulli "not terminal" mask f (1 = s' is not absorbing), trained with binary cross-entropy.
Inputs [s, a] and targets [s' - s, r] are standardised with training-set statistics that are saved
with the weights (the authors used absolute next states and no normalisation: docs/deviations.md §8).
Discrete joint actions (the coordination game) are one-hot encoded per agent.

The N = 5 members with the lowest held-out error of their mean prediction on [s' - s, r] (standardised,
so every dimension counts the same) become the elites (paper: "the best N based on their average
validation accuracy across the next states and rewards"; OfflineRL-Kit / MBPO do the same. The authors'
code ranked members by the error of a Gaussian *sample*, docs/deviations.md §9, which adds noise).
The held-out split is whole episodes, so the report can also measure open-loop rollouts on unseen
episodes. Training stops early when no member's held-out error improved by more than
`min_improvement` (relative) for `patience` evaluations, and each member keeps its best weights
(OfflineRL-Kit's per-member snapshots); `max_steps` caps it.

Inference (`WorldModel.step`, vectorised over a batch of states; uses the elites only):
  * next state  ŝ' = the Gaussian *mean* of one elite drawn uniformly per transition (paper: "sampled
                     uniformly amongst each ensemble member's next state"; the authors' code returns that
                     member's mean, docs/deviations.md §10, and so do we: no extra Gaussian noise);
  * reward      r̄  = mean over the elites of their reward means (paper; the authors' code used the
                     drawn member's reward instead, docs/deviations.md §10);
  * terminal        = majority vote of the elites on f < 0.5 (paper; the authors' code thresholded one
                     member, docs/deviations.md §10). A tie (even N) counts as not terminal;
                     **or** the env's own termination rule on ŝ' (`envs.is_terminal_state`: Ant's torso
                     height outside [0.2, 1.0], as MOPO's / OfflineRL-Kit's `termination_fn`). Deviation
                     from the paper (docs/deviations.md §13), measured on ant medium: every dataset
                     terminal is a jump above z = 1 (476 of 1M rows), the head votes terminal on 30% of
                     them while the predicted z > 1 on 89%, and MOMA-PPO learned to jump (it voted
                     terminal on 6% of a policy's real terminations; its greedy episodes ended after
                     15-212 steps). `termination_rule=False`
                     (`moma_ppo.py --no-termination-rule`) gives the paper's head-only model;
  * ε_r = unbiased variance of the elites' rewards; ε_g = Frobenius norm of the unbiased covariance,
    across elites, of the concatenated [ŝ'_m, r̂_m] (paper §3.1), both on the *unclipped* predictions in
    the dataset's units and not capped (MOMA-PPO applies l_ε);
  * aleatoric = max over elites of ||[σ²_s', σ²_r]||_2, MOPO's penalty (for the ablation of §6.3;
    the authors' `model_max_cov_norm`);
  * then r̄ and ŝ' are clipped to the dataset's bounding box (per state dimension, min/max over states
    and next states; reward min/max), as the paper's §3.1 and the authors' `clip_to_dataset`.

Artifact: `artifact_path(env, dataset, seed)`, one torch file in the ignored cache folder, written
atomically: weights, normaliser statistics, elite indices, bounding box, dataset id and shapes, the
training config and the quality report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
from typing import Annotated, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import envs
from envs import MomaError

ARTIFACT_KIND = "moma-ppo world model"
FORMAT_VERSION = 1
INFERENCE_CHUNK = 4096  # rows per forward pass: [4096, 200] activations stay in cache (4096 beat 512-25k here)
ROLLOUT_HORIZONS = (1, 5, 10)

# State dimensions grouped for the quality report (envs.py module docstring lists the layouts).
STATE_GROUPS = {
    "coordination": {"round": [0]},
    "reacher": {"arm_cos_sin": [0, 1, 2, 3], "target": [4, 5], "joint_velocities": [6, 7], "tip_minus_target": [8, 9]},
    "ant": {
        "torso_height_orientation": [0, 1, 2, 3, 4],
        "joint_angles": list(range(5, 13)),
        "torso_velocities": list(range(13, 19)),
        "joint_velocities": list(range(19, 27)),
    },
}


# Per-env training settings: the Args fields below that default to None take these values (resolve). `moma_ppo.py`
# trains a missing ensemble through load_or_train with the same Args, so `python world_model.py --env X` and
# `python moma_ppo.py --env X` make the same model. The game (40 states x 4 joint actions) needs no Ant-sized
# network: 2 x 64, a short training without learning-rate decay.
PRESETS = {
    "coordination": dict(hidden_dim=64, n_hidden_layers=2, max_steps=3000, eval_every=250, lr_decays=0, patience=3),
    "reacher": dict(hidden_dim=200, n_hidden_layers=4, max_steps=60_000, eval_every=1000, lr_decays=2, patience=5),
    "ant": dict(hidden_dim=200, n_hidden_layers=4, max_steps=60_000, eval_every=1000, lr_decays=2, patience=5),
}


def state_groups(env: str, state_dim: int) -> dict:
    """Named groups of state dimensions for the report; one group "state" for data of another shape."""
    if env in STATE_GROUPS and envs.STATE_DIM.get(env) == state_dim:
        return STATE_GROUPS[env]
    return {"state": list(range(state_dim))}


@dataclasses.dataclass
class Args:
    """Train, evaluate and save the world-model ensemble of one dataset."""

    env: envs.EnvName = "ant"
    """benchmark: coordination, reacher or ant"""
    dataset: Optional[str] = None
    """dataset name of the env (None = the env's default: coordination unfavorable, reacher expert-mix, ant medium)"""
    seed: int = 0
    """seed of the held-out split, the initialisation and the minibatches"""
    cuda: bool = False
    """train on the GPU"""
    torch_threads: int = 2
    """torch CPU threads (CLI only; moma_ppo.py trains a missing model with its own setting)"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the TensorBoard run (default: this file's name)"""
    ensemble_size: int = 7
    """N_m, members trained (paper §3.1)"""
    n_elites: int = 5
    """N, members kept (paper §3.1)"""
    hidden_dim: Annotated[Optional[int], envs.per_env_default(PRESETS, "hidden_dim")] = None
    """width of every hidden layer (MBPO / OfflineRL-Kit: 200; the authors: 1024)"""
    n_hidden_layers: Annotated[Optional[int], envs.per_env_default(PRESETS, "n_hidden_layers")] = None
    """hidden layers per member"""
    learning_rate: float = 1e-3
    """Adam learning rate (MBPO / OfflineRL-Kit; the authors used 3e-5 on unnormalised data)"""
    weight_decay: float = 5e-5
    """L2 coefficient on the weights (0.5 * wd * sum w^2), a mild regulariser as in MBPO"""
    logvar_bound_coef: float = 0.01
    """weight of the penalty that tightens the learnable log-variance bounds (MBPO)"""
    batch_size: int = 256
    """transitions per member and step; every member draws its own minibatch (as the authors)"""
    max_steps: Annotated[Optional[int], envs.per_env_default(PRESETS, "max_steps")] = None
    """cap on gradient steps (each step updates all members)"""
    lr_decays: Annotated[Optional[int], envs.per_env_default(PRESETS, "lr_decays")] = None
    """on a held-out plateau (patience evaluations without progress) multiply the learning rate by lr_decay_factor
    and go on, this many times, before stopping: a constant 1e-3 left the Ant model still improving slowly at 40k
    steps (its minibatch noise floor); decaying on plateaus reaches held-out convergence sooner"""
    lr_decay_factor: float = 0.3
    """learning-rate multiplier at each plateau"""
    eval_every: Annotated[Optional[int], envs.per_env_default(PRESETS, "eval_every")] = None
    """gradient steps between held-out evaluations (early stopping, snapshots)"""
    patience: Annotated[Optional[int], envs.per_env_default(PRESETS, "patience")] = None
    """stop after this many evaluations in a row in which no member improved"""
    min_improvement: float = 0.01
    """relative held-out improvement that counts as progress"""
    min_abs_improvement: float = 1e-4
    """... and absolute improvement (standardised MSE), so an almost perfect model stops"""
    holdout_fraction: float = 0.1
    """fraction of episodes held out for early stopping, elite selection and the report"""
    holdout_eval_size: int = 20_000
    """held-out transitions used by the periodic evaluation (the final report uses all of them)"""
    rollout_eval_starts: int = 500
    """start states of the open-loop rollout report per horizon"""
    checkpoint_every: int = 5000
    """gradient steps between resumable training checkpoints"""
    resume: bool = True
    """resume an interrupted training of the same artifact from its checkpoint"""
    force: bool = False
    """(CLI) retrain even if the artifact exists; otherwise the CLI prints the saved report"""


def resolve(args: Args) -> Args:
    """Fill the fields left None with the env's PRESETS values."""
    return dataclasses.replace(args, **{k: v for k, v in PRESETS[args.env].items() if getattr(args, k) is None})


# --------------------------------------------------------------------------------------------------
# Network: all members in one module, weights [members, in, out], one batched matmul per layer.
# --------------------------------------------------------------------------------------------------
class EnsembleLinear(nn.Module):
    """`members` independent linear layers applied with one torch.baddbmm."""

    def __init__(self, members: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(members, 1, out_dim))
        nn.init.trunc_normal_(self.weight, std=1.0 / (2.0 * math.sqrt(in_dim)))  # OfflineRL-Kit's init

    def forward(self, x: torch.Tensor, members: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [E, B, in] per-member inputs (E = all members, or len(members) when members is given)."""
        w, b = (self.weight, self.bias) if members is None else (self.weight[members], self.bias[members])
        return torch.baddbmm(b, x, w)


class EnsembleNetwork(nn.Module):
    """Per member: [s, a] (standardised) -> mean and log-variance of [Δs, r] (standardised), logit of f."""

    def __init__(self, members: int, input_dim: int, target_dim: int, hidden_dim: int, n_hidden_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * n_hidden_layers
        self.hidden = nn.ModuleList(EnsembleLinear(members, i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.head = EnsembleLinear(members, hidden_dim, 2 * target_dim + 1)
        self.target_dim = target_dim
        # Learnable soft bounds of the log-variance (MBPO / OfflineRL-Kit), per member so that each
        # member's best snapshot is self-contained.
        self.max_logvar = nn.Parameter(torch.full((members, 1, target_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((members, 1, target_dim), -10.0))

    def forward(self, x: torch.Tensor, members: Optional[torch.Tensor] = None):
        """x: [E, B, in], or [B, in] shared by all (selected) members. Returns mean, logvar [E,B,D], logit [E,B]."""
        if x.dim() == 2:
            # Shared input (inference, held-out evaluation): member by member, one GEMM per layer, so each
            # member's [B, hidden] activations stay in cache. On the CPU this is 1.6-2.5x faster than one
            # baddbmm over an expanded [E, B, in] input (bench/bench_world_model.py); a handful of
            # iterations over large GEMMs, so the Python loop costs nothing measurable.
            ids = range(self.max_logvar.shape[0]) if members is None else members.tolist()
            outs = []
            for m in ids:
                h = x
                for layer in self.hidden:
                    h = F.silu(torch.addmm(layer.bias[m, 0], h, layer.weight[m]))
                outs.append(torch.addmm(self.head.bias[m, 0], h, self.head.weight[m]))
            out = torch.stack(outs)
        else:
            # Training: every member has its own minibatch; one batched matmul per layer for all members.
            h = x
            for layer in self.hidden:
                h = F.silu(layer(h, members))
            out = self.head(h, members)
        d = self.target_dim
        mean, raw_logvar, logit = out[..., :d], out[..., d : 2 * d], out[..., 2 * d]
        max_lv = self.max_logvar if members is None else self.max_logvar[members]
        min_lv = self.min_logvar if members is None else self.min_logvar[members]
        logvar = max_lv - F.softplus(max_lv - raw_logvar)  # soft clamp, keeps gradients (MBPO)
        logvar = min_lv + F.softplus(logvar - min_lv)
        return mean, logvar, logit

    def weight_l2(self) -> torch.Tensor:
        return sum((layer.weight**2).sum() for layer in [*self.hidden, self.head])


# --------------------------------------------------------------------------------------------------
# The paper's ensemble statistics (§3.1), as pure functions so they can be checked against NumPy.
# --------------------------------------------------------------------------------------------------
def ensemble_statistics(next_states: torch.Tensor, rewards: torch.Tensor, p_not_terminal: torch.Tensor,
                        choice: torch.Tensor, eps_g_scale: Optional[torch.Tensor] = None) -> dict:
    """Combine the elites' predictions of one batch.

    next_states [N, B, S], rewards [N, B], p_not_terminal [N, B] (dataset units, unclipped);
    choice [B] int: the elite whose next state each transition takes; eps_g_scale [S + 1]: divide [ŝ', r̂] by it
    before ε_g (None = the dataset's raw units, as the paper and the authors' code).
    """
    n, batch = rewards.shape
    next_state = next_states[choice, torch.arange(batch, device=choice.device)]  # uniformly drawn elite
    reward_mean = rewards.mean(0)  # r̄
    eps_r = rewards.var(0, unbiased=True)  # Σ_m (r̂_m - r̄)² / (N - 1)
    # ε_g = ||cov(x_i, x_j)||_F with x = [ŝ', r̂]: cov = Xcᵀ Xc / (N-1) (D x D per transition). Its Frobenius
    # norm equals that of the N x N Gram matrix Xc Xcᵀ / (N-1) (same non-zero singular values), far cheaper.
    x = torch.cat([next_states, rewards.unsqueeze(-1)], dim=-1)  # [N, B, S+1]
    if eps_g_scale is not None:
        x = x / eps_g_scale
    xc = x - x.mean(0, keepdim=True)
    gram = torch.einsum("nbd,mbd->bnm", xc, xc)
    eps_g = torch.linalg.matrix_norm(gram, ord="fro") / (n - 1)
    # Majority vote of the elites on "absorbing" (f < 0.5); a tie is not terminal.
    votes = (p_not_terminal < 0.5).sum(0)
    terminals = (2 * votes > n).float()
    return {"next_states": next_state, "rewards": reward_mean, "terminals": terminals, "eps_r": eps_r, "eps_g": eps_g}


def aleatoric_uncertainty(next_state_var: torch.Tensor, reward_var: torch.Tensor) -> torch.Tensor:
    """MOPO's penalty: max over members of the L2 norm of the predicted variance vector [σ²_s', σ²_r]."""
    var = torch.cat([next_state_var, reward_var.unsqueeze(-1)], dim=-1)
    return torch.linalg.vector_norm(var, dim=-1).amax(0)


def select_elites(holdout_mse: torch.Tensor, n_elites: int) -> torch.Tensor:
    """Indices of the n_elites members with the lowest held-out error, best first."""
    return torch.argsort(holdout_mse, stable=True)[:n_elites]


# --------------------------------------------------------------------------------------------------
# The world model used by MOMA-PPO.
# --------------------------------------------------------------------------------------------------
class WorldModel(nn.Module):
    """Ensemble + normalisers + elites + dataset bounding box. Use `step` (inference) or `member_predictions`."""

    def __init__(self, env: str, dataset_id: str, state_dim: int, joint_action_dim: int, ensemble_size: int = 7,
                 n_elites: int = 5, hidden_dim: int = 200, n_hidden_layers: int = 4):
        super().__init__()
        if not 2 <= n_elites <= ensemble_size:
            raise MomaError(f"need 2 <= n_elites <= ensemble_size (the variances need 2 elites), got "
                            f"{n_elites} elites of {ensemble_size}")
        self.env = env
        self.dataset_id = dataset_id
        self.state_dim = state_dim
        self.joint_action_dim = joint_action_dim
        self.discrete = env == "coordination"
        # Coordination: each agent's action in {0, 1} becomes a one-hot pair.
        self.input_dim = state_dim + (joint_action_dim * envs.COORDINATION_N_ACTIONS if self.discrete else joint_action_dim)
        self.target_dim = state_dim + 1
        self.hyper = dict(ensemble_size=ensemble_size, n_elites=n_elites, hidden_dim=hidden_dim,
                          n_hidden_layers=n_hidden_layers)
        self.network = EnsembleNetwork(ensemble_size, self.input_dim, self.target_dim, hidden_dim, n_hidden_layers)
        self.register_buffer("input_mean", torch.zeros(self.input_dim))
        self.register_buffer("input_std", torch.ones(self.input_dim))
        self.register_buffer("target_mean", torch.zeros(self.target_dim))
        self.register_buffer("target_std", torch.ones(self.target_dim))
        self.register_buffer("state_min", torch.full((state_dim,), -float("inf")))
        self.register_buffer("state_max", torch.full((state_dim,), float("inf")))
        self.register_buffer("reward_bounds", torch.tensor([-float("inf"), float("inf")]))
        self.register_buffer("elites", torch.arange(n_elites, dtype=torch.long))
        # 0 when the dataset holds no terminal transition (Reacher, the coordination game: episodes only
        # time out). The Bernoulli head has then only seen "not terminal" and its extrapolation off the data
        # is arbitrary; because every Reacher reward is negative, an absorbing state is a reward the agents
        # can farm (MOMA-PPO on reacher drove its rollouts into predicted terminals: mean length 9.9 -> 8.8
        # in 37 iterations). Such an env never terminates, so neither does its model.
        self.register_buffer("can_terminate", torch.ones(()))

    @property
    def reward_min(self) -> float:
        return float(self.reward_bounds[0])

    @property
    def reward_max(self) -> float:
        return float(self.reward_bounds[1])

    @property
    def device(self) -> torch.device:
        return self.input_mean.device

    def encode_inputs(self, states: torch.Tensor, joint_actions: torch.Tensor) -> torch.Tensor:
        """Raw [s, a] -> standardised model input [B, input_dim]."""
        states = torch.as_tensor(states, dtype=torch.float32, device=self.device)
        joint_actions = torch.as_tensor(joint_actions, device=self.device)
        if states.dim() != 2 or states.shape[1] != self.state_dim:
            raise MomaError(f"world model of {self.env} expects states [B, {self.state_dim}], got {tuple(states.shape)}")
        if joint_actions.shape[0] != states.shape[0] or joint_actions.shape[1] != self.joint_action_dim:
            raise MomaError(f"world model of {self.env} expects joint actions [B, {self.joint_action_dim}] "
                            f"matching {states.shape[0]} states, got {tuple(joint_actions.shape)}")
        if self.discrete:
            a = joint_actions.round().long() if joint_actions.is_floating_point() else joint_actions.long()
            actions = F.one_hot(a.clamp(0, envs.COORDINATION_N_ACTIONS - 1), envs.COORDINATION_N_ACTIONS)
            actions = actions.reshape(a.shape[0], -1).float()
        else:
            actions = joint_actions.float().clamp(-1.0, 1.0)  # the env executes clipped actions
        return (torch.cat([states, actions], dim=1) - self.input_mean) / self.input_std

    def member_predictions(self, states, joint_actions, members: Optional[torch.Tensor] = None) -> dict:
        """Every (selected) member's prediction in dataset units, unclipped: next_states, next_state_var
        [M, B, S], rewards, reward_var, p_not_terminal [M, B]."""
        states = torch.as_tensor(states, dtype=torch.float32, device=self.device)
        with torch.autocast(self.device.type, enabled=False):  # fp32 even inside MOMA-PPO's --bf16 rollouts
            mean, logvar, logit = self.network(self.encode_inputs(states, joint_actions), members)
        mean = mean * self.target_std + self.target_mean
        var = logvar.exp() * self.target_std**2
        s = self.state_dim
        return {"next_states": states + mean[..., :s], "next_state_var": var[..., :s], "rewards": mean[..., s],
                "reward_var": var[..., s], "p_not_terminal": torch.sigmoid(logit)}

    @torch.no_grad()
    def step(self, states, joint_actions, clip: bool = True, generator: Optional[torch.Generator] = None,
             termination_rule: bool = True, eps_g_units: str = "raw") -> dict:
        """One model step for a batch (see the module docstring). states [B, S] float; joint_actions [B, A]
        float in [-1, 1] (clamped here) or int [B, 2] for the coordination game. Returns tensors on the
        model's device: next_states [B, S], rewards, terminals, eps_r, eps_g, aleatoric, elite [B].
        termination_rule=False leaves the terminal flag to the learned head alone (the paper's model).
        eps_g_units="standardised" measures ε_g on [ŝ', r̂] divided by the dataset's std of each state dimension and
        of the reward (an ablation: in raw units Ant's joint velocities carry ~92% of the disagreement and the torso
        height that ends episodes almost none)."""
        if eps_g_units not in ("raw", "standardised"):
            raise MomaError(f"eps_g_units must be raw or standardised, got {eps_g_units!r}")
        scale = torch.cat([self.input_std[: self.state_dim], self.target_std[-1:]]) if eps_g_units == "standardised" else None
        states = torch.as_tensor(states, dtype=torch.float32, device=self.device)
        joint_actions = torch.as_tensor(joint_actions, device=self.device)
        outs = []
        for start in range(0, states.shape[0], INFERENCE_CHUNK):
            rows = slice(start, start + INFERENCE_CHUNK)
            pred = self.member_predictions(states[rows], joint_actions[rows], self.elites)
            n, batch = pred["rewards"].shape
            choice = torch.randint(n, (batch,), device=self.device, generator=generator)
            out = ensemble_statistics(pred["next_states"], pred["rewards"], pred["p_not_terminal"], choice, scale)
            out["terminals"] = out["terminals"] * self.can_terminate
            if termination_rule:  # the env's rule on the unclipped drawn next state backs up the rare-class head
                out["terminals"] = torch.maximum(out["terminals"], envs.is_terminal_state(self.env, out["next_states"]).float())
            out["aleatoric"] = aleatoric_uncertainty(pred["next_state_var"], pred["reward_var"])
            out["elite"] = self.elites[choice]
            if clip:  # after the uncertainties, which use the unclipped predictions (docs/deviations.md §11)
                out["next_states"] = torch.maximum(torch.minimum(out["next_states"], self.state_max), self.state_min)
                out["rewards"] = out["rewards"].clamp(self.reward_min, self.reward_max)
            outs.append(out)
        if len(outs) == 1:
            return outs[0]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


# --------------------------------------------------------------------------------------------------
# Artifact: path, save, load.
# --------------------------------------------------------------------------------------------------
def artifact_path(env: str, dataset: Optional[str] = None, seed: int = 0) -> pathlib.Path:
    """Where the ensemble of (env, dataset, seed) lives: <cache>/world_models/<env>__<dataset>__seed<seed>.pt."""
    dataset = envs.DEFAULT_DATASET[env] if dataset is None and env in envs.ENVS else dataset
    envs.check_names(env, None, dataset)
    return envs.CACHE_DIR / "world_models" / f"{env}__{dataset.replace('/', '__')}__seed{seed}.pt"


def _atomic_torch_save(obj, path: pathlib.Path) -> None:
    """torch.save under a name no other process uses, then renamed into place; a failed write (a full disk: torch's
    zip writer reports it as RuntimeError) removes its partial file and leaves the previous file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise MomaError(f"could not write {path} ({type(e).__name__}: {e}); free some disk space (or set "
                        f"MOMA_CACHE_DIR to another disk) and run again") from None


def _non_finite_entries(state_dict: dict) -> list[str]:
    """Entries with NaN anywhere, or ±inf in the network (an unset bounding box is legitimately ±inf)."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and
            (torch.isnan(v).any() or (k.startswith("network.") and torch.isinf(v).any()))]


def save(model: WorldModel, path: pathlib.Path, seed: int, config: dict, metrics: dict) -> None:
    broken = _non_finite_entries(model.state_dict())
    if broken:  # never cache a broken model: every later run would load it
        raise MomaError(f"the trained world model has non-finite values in {broken[:3]}; not saved to {path}")
    payload = {
        "kind": ARTIFACT_KIND,
        "format_version": FORMAT_VERSION,
        "env": model.env,
        "dataset_id": model.dataset_id,
        "seed": int(seed),
        "state_dim": model.state_dim,
        "joint_action_dim": model.joint_action_dim,
        "hyper": dict(model.hyper),
        "elites": [int(i) for i in model.elites],
        "state_min": model.state_min.cpu().tolist(),
        "state_max": model.state_max.cpu().tolist(),
        "reward_min": model.reward_min,
        "reward_max": model.reward_max,
        # the content hash of the training data: a rebuilt dataset makes this model stale (see load)
        "dataset_fingerprint": getattr(model, "dataset_fingerprint", None),
        "config": config,
        "metrics": metrics,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    _atomic_torch_save(payload, pathlib.Path(path))


def _read_payload(path: pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.exists():
        raise MomaError(f"no world model at {path}; train one with `python world_model.py --env <env> --dataset <dataset>`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MomaError(f"world model file {path} is corrupt or not a world model ({type(e).__name__}); "
                        f"delete it and retrain with `python world_model.py ... --force`") from None
    if not isinstance(payload, dict) or payload.get("kind") != ARTIFACT_KIND:
        raise MomaError(f"{path} is not a moma-ppo world model; delete it and retrain with `python world_model.py`")
    if payload.get("format_version") != FORMAT_VERSION:
        raise MomaError(f"world model {path} has format version {payload.get('format_version')}, this code reads "
                        f"{FORMAT_VERSION}; retrain it with `python world_model.py --env {payload.get('env')} --force`")
    return payload


def _check_identity(payload: dict, path: pathlib.Path, env: Optional[str], dataset: Optional[str],
                    seed: Optional[int]) -> None:
    """MomaError if the file holds the model of another seed, env or dataset (a file copied or swapped in): checked
    before staleness, so such a file is named for what it is, never called stale and silently retrained over."""
    if seed is not None and payload.get("seed") != seed:
        raise MomaError(f"world model {path} was trained with seed {payload.get('seed')}, not {seed} (a file copied "
                        f"from another seed?); delete it and retrain with `python world_model.py --seed {seed} --force`")
    if env is not None and payload.get("env") != env:
        raise MomaError(f"world model {path} was trained on env {payload.get('env')!r}, not {env!r} (a file copied "
                        f"from another model?); delete it or train one with `python world_model.py --env {env}`")
    if dataset is not None:
        wanted = envs.dataset_id(env or payload["env"], dataset)
        if payload.get("dataset_id") != wanted:
            raise MomaError(f"world model {path} was trained on dataset {payload.get('dataset_id')}, not {wanted} (a "
                            f"file copied from another model?); delete it or train one with `python world_model.py "
                            f"--env {env or payload['env']} --dataset {dataset}`")


# Settings that say how a model is trained, not what is trained: a cached model made with other values of these is
# still the model asked for.
HOW_NOT_WHAT = ("resume", "force", "torch_threads", "cuda", "checkpoint_every", "exp_name")


def _stale_reason(payload: dict, env: str, dataset: str, wanted: Optional[dict] = None) -> Optional[str]:
    """Why a saved model no longer fits the local dataset (it was rebuilt since) or, given the training settings
    `wanted` (dataclasses.asdict of resolved Args), the settings it is asked for (a preset or an override changed
    since it was cached); None if it fits. Models saved before fingerprints (or configs) existed, and datasets that
    are not local, cannot be checked and pass."""
    trained_with = payload.get("config") or {}
    # a model trained further by bench/continue_world_model.py stands in for the cached one on purpose (its own
    # cache folder, MOMA_CACHE_DIR): its settings differ by design (more steps, another schedule)
    continued = bool((payload.get("metrics") or {}).get("continued_from"))
    if wanted is not None and trained_with and not continued:
        changed = sorted(k for k in wanted if k not in HOW_NOT_WHAT and trained_with.get(k) != wanted[k])
        if changed:
            return ("it was trained with other settings (" + ", ".join(
                f"{k} {trained_with.get(k)!r}, now {wanted[k]!r}" for k in changed[:4]) + ")")
    trained_on = payload.get("dataset_fingerprint")
    if not trained_on:
        return None
    now = envs.dataset_fingerprint(env, dataset)
    if now is None or now == trained_on:
        return None
    return (f"it was trained on an earlier build of dataset {envs.dataset_id(env, dataset)} (content fingerprint "
            f"{trained_on}, the local dataset's is now {now})")


def load(path, env: Optional[str] = None, dataset: Optional[str] = None, device="cpu",
         seed: Optional[int] = None) -> WorldModel:
    """Load a saved ensemble (eval mode, on `device`). MomaError if it belongs to another env/dataset/seed, was
    trained on an earlier build of the dataset, or is corrupt (non-finite weights included)."""
    path = pathlib.Path(path)
    payload = _read_payload(path)
    _check_identity(payload, path, env, dataset, seed)
    if dataset is not None:
        stale = _stale_reason(payload, env or payload["env"], dataset)
        if stale:
            raise MomaError(f"world model {path} is stale: {stale}; retrain it with `python world_model.py --env "
                            f"{env or payload['env']} --dataset {dataset} --force` (moma_ppo.py retrains it by itself)")
    try:
        # The weights come from the file, but constructing the network draws a random initialisation: from a forked
        # generator, so that loading a model leaves the caller's global one as training it does (MOMA-PPO seeds it
        # before the world model is ready: a run that loaded the model drew its agents from another state than one
        # that trained it, 0.5 vs 1.0 on the neutral coordination game).
        with torch.random.fork_rng(devices=[]):
            model = WorldModel(payload["env"], payload["dataset_id"], payload["state_dim"], payload["joint_action_dim"],
                               **payload["hyper"])
        state_dict = dict(payload["state_dict"])
        # Artifacts written before `can_terminate` existed: the terminal head decided alone, as before.
        state_dict.setdefault("can_terminate", torch.ones(()))
        model.load_state_dict(state_dict, strict=True)
        broken = _non_finite_entries(state_dict)
        if broken:
            raise MomaError(f"world model {path} has non-finite values in {broken[:3]}; delete it and retrain with "
                            f"`python world_model.py --env {payload['env']} --force`")
    except MomaError:
        raise
    except Exception as e:
        raise MomaError(f"world model file {path} is corrupt ({type(e).__name__}: {e}); delete it and retrain "
                        f"with `python world_model.py --env {payload.get('env')} --force`") from None
    model.metrics = payload.get("metrics", {})
    model.dataset_fingerprint = payload.get("dataset_fingerprint")
    model.config = payload.get("config", {})
    model.path, model.seed = str(path), payload.get("seed")
    return model.to(device).eval()


def provenance(model: WorldModel) -> dict:
    """What a MOMA-PPO record says of the world model it trained in: the file, its seed, its training and its held-out
    error, so that two records made with different models (a longer-trained one, another cache) can be told apart."""
    metrics = getattr(model, "metrics", {}) or {}
    return {"path": getattr(model, "path", None), "seed": getattr(model, "seed", None),
            "dataset_fingerprint": getattr(model, "dataset_fingerprint", None),
            "train_steps": metrics.get("train_steps"), "stopped_early": metrics.get("stopped_early"),
            "holdout_mse": metrics.get("holdout_mse"), "elites": metrics.get("elites")}


def load_or_train(env: str, dataset: Optional[str] = None, seed: int = 0, device="cpu", **train_overrides) -> WorldModel:
    """The ensemble of (env, dataset, seed): loaded from the cache, or trained (progress bar) and saved first."""
    dataset = envs.DEFAULT_DATASET[env] if dataset is None and env in envs.ENVS else dataset
    envs.check_names(env, None, dataset)
    fields = {f.name for f in dataclasses.fields(Args)}
    unknown = sorted(set(train_overrides) - fields)
    if unknown:
        raise MomaError(f"unknown world-model training options {unknown}; valid: {sorted(fields)}")
    path = artifact_path(env, dataset, seed)
    args = Args(env=env, dataset=dataset, seed=seed, **train_overrides)
    check_args(resolve(args))
    wanted = dataclasses.asdict(resolve(args))  # a cached model trained with other settings is retrained
    # A current model is loaded without the lock (saves are atomic renames, so a file that exists is whole): a run
    # that only needs the cached model never queues behind another process's training of another dataset's model.
    if path.exists():
        payload = _read_payload(path)
        _check_identity(payload, path, env, dataset, seed)
        if _stale_reason(payload, env, dataset, wanted) is None:
            return load(path, env, dataset, device, seed=seed)
    # Under the model's lock: of two processes that find it missing (or stale), one trains it and the other waits,
    # then loads it (they would otherwise both train it, sharing one training checkpoint file).
    with training_lock(path):
        if path.exists():
            payload = _read_payload(path)
            _check_identity(payload, path, env, dataset, seed)  # another model's file is refused, not called stale
            stale = _stale_reason(payload, env, dataset, wanted)
            if stale is None:
                return load(path, env, dataset, device, seed=seed)
            print(f"world model {path}: {stale}; training a new one")
        envs.check_free_space(path.parent, 0)  # fail now, not after the training
        model, metrics = train_and_save(args, torch.device(device))
    model.metrics, model.path, model.seed = metrics, str(path), seed  # as load() sets them (provenance)
    return model.eval()


def training_lock(path: pathlib.Path):
    """The lock a world model is trained under (next to it in the cache)."""
    return envs.file_lock(path.with_name(path.name + ".lock"), f"training world model {path.name}")


# --------------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------------
def holdout_split(episode_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out rows: a random `fraction` of whole episodes (at least one, never all)."""
    episodes = np.unique(episode_ids)
    rng = np.random.default_rng(seed)
    if len(episodes) < 2:  # a single episode: hold out its last transitions instead
        mask = np.zeros(len(episode_ids), dtype=bool)
        mask[int(len(mask) * (1 - fraction)):] = True
        return mask
    n_hold = int(np.clip(round(fraction * len(episodes)), 1, len(episodes) - 1))
    held = rng.choice(episodes, size=n_hold, replace=False)
    return np.isin(episode_ids, held)


def _standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = x.mean(0), x.std(0)
    return mean, torch.where(std < 1e-6, torch.ones_like(std), std)  # constant dims stay as they are


def gaussian_nll(mean, logvar, target) -> torch.Tensor:
    """Per-member Gaussian NLL averaged over batch and dims, without the constant: [E]."""
    return 0.5 * (((mean - target) ** 2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2))


@torch.no_grad()
def evaluate_members(model: WorldModel, inputs, targets, not_terminal, chunk: int = INFERENCE_CHUNK) -> dict:
    """Held-out metrics of every member on standardised inputs/targets: mse (standardised, mean over the
    D dims) [E], nll (Gaussian, with the constant, per dim) [E], per-dim squared error in dataset units
    [E, D], terminal accuracy [E]."""
    e = model.network.max_logvar.shape[0]
    sq = torch.zeros(e, model.target_dim, device=inputs.device, dtype=torch.float64)
    nll = torch.zeros(e, device=inputs.device, dtype=torch.float64)
    correct = torch.zeros(e, device=inputs.device, dtype=torch.float64)
    caught = torch.zeros(e, device=inputs.device, dtype=torch.float64)  # real terminals the head flags
    for start in range(0, len(inputs), chunk):
        rows = slice(start, start + chunk)
        mean, logvar, logit = model.network(inputs[rows])
        err2 = (mean - targets[rows]) ** 2
        sq += err2.sum(1).double()
        nll += (0.5 * (err2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))).mean(2).sum(1).double()
        correct += ((logit > 0).float() == not_terminal[rows]).sum(1).double()
        caught += ((logit <= 0) & (not_terminal[rows] == 0)).sum(1).double()
    n = len(inputs)
    n_terminals = float((not_terminal == 0).sum())
    per_dim_mse = sq / n
    # Terminals are rare (Ant medium: ~0.05% of rows), so accuracy hides a head that never fires: report recall.
    return {"mse": per_dim_mse.mean(1).float(), "nll": (nll / n).float(),
            "per_dim_mse_units": (per_dim_mse * model.target_std.double() ** 2).float(),
            "terminal_accuracy": (correct / n).float(), "n_terminals": int(n_terminals),
            "terminal_recall": (caught / n_terminals).float() if n_terminals else torch.full((e,), float("nan"))}


@torch.no_grad()
def open_loop_rollout_error(model: WorldModel, data, holdout_rows: np.ndarray, n_starts: int, seed: int,
                            horizons=ROLLOUT_HORIZONS) -> dict:
    """Roll the model open-loop (dataset actions, a random elite per step, clipped, as MOMA-PPO uses it)
    from held-out states and compare with the held-out episode h steps later: RMSE per state group (dataset
    units and in units of the dataset's state std) and absolute reward error at step h."""
    rng = np.random.default_rng(seed + 1)
    gen = torch.Generator(device=model.device).manual_seed(seed + 1)
    ep = data.episode_ids
    n = len(ep)
    # steps left in the episode from each row (the row itself included)
    end = np.empty(n, dtype=np.int64)
    boundary = np.flatnonzero(np.r_[ep[1:] != ep[:-1], True])
    end[:] = np.repeat(boundary, np.diff(np.r_[-1, boundary]))
    remaining = end - np.arange(n) + 1
    state_std = np.maximum(data.states.std(0), 1e-6)
    groups = state_groups(model.env, model.state_dim)
    report = {}
    for h in horizons:
        candidates = holdout_rows[remaining[holdout_rows] >= h]
        if len(candidates) == 0:
            continue
        starts = rng.choice(candidates, size=min(n_starts, len(candidates)), replace=False)
        s = torch.as_tensor(data.states[starts], device=model.device)
        for j in range(h):
            out = model.step(s, torch.as_tensor(data.joint_actions[starts + j], device=model.device), clip=True,
                             generator=gen)
            s = out["next_states"]
        err = s.cpu().numpy() - data.next_states[starts + h - 1]
        row = {"starts": int(len(starts)),
               "reward_abs_error": float(np.abs(out["rewards"].cpu().numpy() - data.rewards[starts + h - 1]).mean()),
               "state_rmse_std_units": float(np.sqrt(((err / state_std) ** 2).mean()))}
        for name, ix in groups.items():
            row[f"{name}_rmse"] = float(np.sqrt((err[:, ix] ** 2).mean()))
        report[f"h{h}"] = row
    return report


def _dataset_tensors(model: WorldModel, data, device):
    states = torch.as_tensor(data.states, dtype=torch.float32, device=device)
    next_states = torch.as_tensor(data.next_states, dtype=torch.float32, device=device)
    rewards = torch.as_tensor(data.rewards, dtype=torch.float32, device=device)
    raw_inputs = model.encode_inputs(states, torch.as_tensor(data.joint_actions, device=device))  # identity stats yet
    targets = torch.cat([next_states - states, rewards[:, None]], dim=1)
    not_terminal = 1.0 - torch.as_tensor(data.terminals, dtype=torch.float32, device=device)
    return raw_inputs, targets, not_terminal


def train(data, args: Args, device=torch.device("cpu"), writer=None, progress: bool = True,
          checkpoint_path: Optional[pathlib.Path] = None) -> tuple[WorldModel, dict]:
    """Train an ensemble on `data` (an envs.OfflineData, or any object with env, dataset_id, states,
    next_states, joint_actions, rewards, terminals, episode_ids). Returns the model and its metrics."""
    t0 = time.time()
    args = resolve(args)
    env = data.env
    state_dim = data.states.shape[1]
    joint_action_dim = data.joint_actions.shape[1]
    if len(data.states) < 2:
        raise MomaError(f"dataset {data.dataset_id} has {len(data.states)} transitions; a world model needs more")
    # The initialisation is seeded by args.seed without touching the caller's global generator (MOMA-PPO seeds it
    # first: re-seeding it here made a run that trains its model differ from every rerun that loads it).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = WorldModel(env, data.dataset_id, state_dim, joint_action_dim, args.ensemble_size, args.n_elites,
                           args.hidden_dim, args.n_hidden_layers).to(device)
    model.dataset_fingerprint = getattr(data, "fingerprint", None) or None
    holdout = holdout_split(np.asarray(data.episode_ids), args.holdout_fraction, args.seed)
    train_rows = torch.as_tensor(np.flatnonzero(~holdout), device=device)
    holdout_rows_np = np.flatnonzero(holdout)
    holdout_rows = torch.as_tensor(holdout_rows_np, device=device)

    # Normalisers from the training rows; bounding box from the whole dataset (paper §3.1: "the offline dataset").
    raw_inputs, targets_units, not_terminal = _dataset_tensors(model, data, device)
    model.input_mean, model.input_std = _standardiser(raw_inputs[train_rows])
    model.target_mean, model.target_std = _standardiser(targets_units[train_rows])
    all_states = torch.cat([torch.as_tensor(data.states), torch.as_tensor(data.next_states)]).float()
    model.state_min, model.state_max = all_states.min(0).values.to(device), all_states.max(0).values.to(device)
    model.reward_bounds = torch.tensor([float(data.rewards.min()), float(data.rewards.max())], device=device)
    model.can_terminate = torch.tensor(float(np.asarray(data.terminals).any()), device=device)
    inputs = (raw_inputs - model.input_mean) / model.input_std
    targets = (targets_units - model.target_mean) / model.target_std
    del raw_inputs

    gen = torch.Generator(device=device).manual_seed(args.seed)
    eval_gen = np.random.default_rng(args.seed + 2)
    eval_rows = holdout_rows[torch.as_tensor(np.sort(eval_gen.choice(len(holdout_rows), min(len(holdout_rows),
                                                     args.holdout_eval_size), replace=False)), device=device)]
    net = model.network
    optimizer = torch.optim.Adam(net.parameters(), lr=args.learning_rate, fused=True)
    e, n_train = args.ensemble_size, len(train_rows)
    best_mse = torch.full((e,), float("inf"), device=device)
    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    evals_without_progress, step, history, lr_decays_done = 0, 0, [], 0
    time_before_resume = 0.0  # training time of the segments before this one (a resumed run reports the sum)

    if checkpoint_path is not None and args.resume and checkpoint_path.exists():
        try:
            ck = torch.load(checkpoint_path, map_location=device, weights_only=True)
            # How a model is trained may change between a run and its resume (threads, checkpoint interval), not
            # what is trained: a checkpoint of other settings or data belongs to another artifact (the cache holds
            # the model of the current settings), so training starts over, and says why.
            same = {k: v for k, v in dataclasses.asdict(args).items() if k not in HOW_NOT_WHAT}
            saved = {k: v for k, v in ck["config"].items() if k not in HOW_NOT_WHAT}
            same_data = ck.get("dataset_fingerprint") == model.dataset_fingerprint
            diffs = [f"--{k.replace('_', '-')} {saved.get(k)!r} in the checkpoint, {same.get(k)!r} now"
                     for k in sorted(set(saved) | set(same)) if saved.get(k) != same.get(k)]
            if not same_data:
                diffs.append("the dataset was rebuilt since")
            if diffs:
                print(f"not resuming {checkpoint_path}: it trained another model ({'; '.join(diffs)}); "
                      f"training this one from step 0")
            else:
                net.load_state_dict(ck["network"])
                optimizer.load_state_dict(ck["optimizer"])
                best_state, best_mse = ck["best_state"], ck["best_mse"]
                step, evals_without_progress, history = ck["step"], ck["evals_without_progress"], ck["history"]
                lr_decays_done = ck.get("lr_decays_done", 0)  # the optimizer state carries the decayed lr
                time_before_resume = float(ck.get("train_time_s", 0.0))
                gen.set_state(ck["generator"].cpu())
                print(f"resuming world-model training from step {step} ({checkpoint_path})")
        except Exception as exc:  # an unreadable checkpoint only costs the time it saved
            print(f"ignoring unreadable checkpoint {checkpoint_path} ({type(exc).__name__})")

    bar = envs.progress_bar(total=args.max_steps, initial=step, desc=f"world model {data.dataset_id}",
                            disable=True if not progress else None, dynamic_ncols=True)
    sps_t, sps_step = time.time(), step
    stopped_early = False
    while step < args.max_steps:
        # Every member draws its own minibatch from the training rows (the authors' scheme).
        idx = train_rows[torch.randint(n_train, (e, args.batch_size), device=device, generator=gen)]
        mean, logvar, logit = net(inputs[idx])
        nll = gaussian_nll(mean, logvar, targets[idx])  # [E]
        bce = F.binary_cross_entropy_with_logits(logit, not_terminal[idx], reduction="none").mean(1)  # [E]
        # Members are independent, so summing their losses trains each on its own.
        loss = (nll + bce).sum() + 0.5 * args.weight_decay * net.weight_l2() \
            + args.logvar_bound_coef * (net.max_logvar.sum() - net.min_logvar.sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)

        if step % args.eval_every == 0 or step == args.max_steps:
            if not torch.isfinite(loss):
                raise MomaError(f"world-model training of {data.dataset_id} diverged at step {step} (loss {loss.item()}); "
                                f"check the dataset for extreme values or lower --learning-rate")
            net.eval()
            mse = evaluate_members(model, inputs[eval_rows], targets[eval_rows], not_terminal[eval_rows])["mse"]
            net.train()
            improved = (mse < best_mse * (1 - args.min_improvement)) & (mse < best_mse - args.min_abs_improvement)
            if improved.any():  # per-member snapshots of the best weights (OfflineRL-Kit)
                for k, v in net.state_dict().items():
                    best_state[k][improved] = v[improved]
                best_mse = torch.where(improved, mse, best_mse)
                evals_without_progress = 0
            else:
                evals_without_progress += 1
            sps = (step - sps_step) / max(time.time() - sps_t, 1e-9)
            sps_t, sps_step = time.time(), step
            history.append({"step": step, "holdout_mse": mse.tolist(), "train_nll": nll.mean().item(),
                            "train_bce": bce.mean().item(), "sps": sps})
            bar.set_postfix(holdout_mse=f"{float(mse.min()):.4f}", sps=f"{sps:.0f}")
            if writer is not None:
                writer.add_scalar("losses/train_nll", history[-1]["train_nll"], step)
                writer.add_scalar("losses/train_bce", history[-1]["train_bce"], step)
                writer.add_scalar("holdout/best_member_mse", float(mse.min()), step)
                writer.add_scalar("holdout/mean_member_mse", float(mse.mean()), step)
                writer.add_scalar("charts/SPS", sps, step)
            if evals_without_progress >= args.patience:
                if lr_decays_done < args.lr_decays:
                    lr_decays_done += 1
                    evals_without_progress = 0
                    for group in optimizer.param_groups:
                        group["lr"] *= args.lr_decay_factor
                    history[-1]["lr_decayed_to"] = optimizer.param_groups[0]["lr"]
                else:
                    stopped_early = True
                    break
        if checkpoint_path is not None and step % args.checkpoint_every == 0 and step < args.max_steps:
            envs.check_weights(step, net, what="world-model training produced")  # never checkpoint a NaN model
            _atomic_torch_save({"config": dataclasses.asdict(args), "network": net.state_dict(),
                                "optimizer": optimizer.state_dict(), "best_state": best_state, "best_mse": best_mse,
                                "step": step, "evals_without_progress": evals_without_progress, "history": history,
                                "lr_decays_done": lr_decays_done,
                                "generator": gen.get_state(), "dataset_fingerprint": model.dataset_fingerprint,
                                "train_time_s": time_before_resume + time.time() - t0},
                               checkpoint_path)
    bar.close()
    train_time = time_before_resume + time.time() - t0  # every segment of a resumed training, not only the last

    # Each member's best snapshot, then elites by the error on the whole held-out split.
    net.load_state_dict(best_state)
    model.eval()
    final = evaluate_members(model, inputs[holdout_rows], targets[holdout_rows], not_terminal[holdout_rows])
    model.elites = select_elites(final["mse"], args.n_elites).to(device)
    rollout = open_loop_rollout_error(model, data, holdout_rows_np, args.rollout_eval_starts, args.seed)
    # Recall of the model as MOMA-PPO uses it (the elites' vote, and the vote or the env's termination rule on the
    # predicted next state) on the held-out split's real terminal transitions.
    terminal_rows = holdout_rows_np[np.asarray(data.terminals)[holdout_rows_np] > 0]
    recall = {}
    if len(terminal_rows):
        s_t = torch.as_tensor(data.states[terminal_rows], device=device)
        a_t = torch.as_tensor(data.joint_actions[terminal_rows], device=device)
        for name, rule in (("vote", False), ("vote_or_rule", True)):
            out = model.step(s_t, a_t, clip=True, generator=torch.Generator(device=device).manual_seed(args.seed),
                             termination_rule=rule)
            recall[name] = float(out["terminals"].float().mean())
    s = state_dim
    groups = state_groups(env, s)
    elites = model.elites.tolist()
    member_units = final["per_dim_mse_units"].cpu()
    metrics = {
        "train_steps": step,
        "stopped_early": stopped_early,
        "train_time_s": train_time,
        "train_steps_per_s": float(np.mean([h["sps"] for h in history])) if history else float("nan"),
        "n_transitions": len(data.states),
        "n_train": n_train,
        "n_holdout": len(holdout_rows_np),
        "holdout_mse": final["mse"].tolist(),  # standardised [Δs, r], per member
        "holdout_nll": final["nll"].tolist(),
        "holdout_terminal_accuracy": final["terminal_accuracy"].tolist(),
        "holdout_terminals": final["n_terminals"],
        "holdout_terminal_recall": final["terminal_recall"].tolist(),  # per member, the head alone
        "holdout_terminal_recall_model": recall,  # the elites as MOMA-PPO steps them
        "elites": elites,
        "elite_reward_rmse": float(member_units[elites, s].mean().sqrt()),
        "elite_state_rmse": {name: float(member_units[elites][:, ix].mean().sqrt()) for name, ix in groups.items()},
        "rollout": rollout,
        "history": history,
    }
    return model, metrics


def format_report(metrics: dict, dataset_id: str) -> str:
    lines = [f"World model of {dataset_id}: {metrics['train_steps']} steps in {metrics['train_time_s']:.0f} s "
             f"({metrics['train_steps_per_s']:.1f} steps/s), {'early stop' if metrics['stopped_early'] else 'step cap'}; "
             f"{metrics['n_train']} train / {metrics['n_holdout']} held-out transitions",
             "member  holdout_mse(std.)  holdout_nll  terminal_acc  terminal_recall  elite"]
    recalls = metrics.get("holdout_terminal_recall", [float("nan")] * len(metrics["holdout_mse"]))
    for i, (m, nll, acc, rec) in enumerate(zip(metrics["holdout_mse"], metrics["holdout_nll"],
                                               metrics["holdout_terminal_accuracy"], recalls)):
        lines.append(f"{i:6d}  {m:17.5f}  {nll:11.4f}  {acc:12.4f}  {rec:15.3f}  {'*' if i in metrics['elites'] else ''}")
    if metrics.get("holdout_terminal_recall_model"):
        lines.append(f"{metrics['holdout_terminals']} held-out terminal transitions; recall of the model's step: " +
                     ", ".join(f"{k} {v:.3f}" for k, v in metrics["holdout_terminal_recall_model"].items()))
    lines.append(f"elites {metrics['elites']}; one-step RMSE of the elites' means (dataset units): reward "
                 f"{metrics['elite_reward_rmse']:.4f}, " +
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics["elite_state_rmse"].items()))
    lines.append("open-loop rollouts on held-out episodes (dataset actions, random elite per step, clipped):")
    for h, row in metrics["rollout"].items():
        groups = ", ".join(f"{k[:-5]} {v:.4f}" for k, v in row.items() if k.endswith("_rmse"))
        lines.append(f"  {h:>3} ({row['starts']} starts): state RMSE/std {row['state_rmse_std_units']:.4f}; RMSE "
                     f"{groups}; |reward error| {row['reward_abs_error']:.4f}")
    return "\n".join(lines)


def train_and_save(args: Args, device: torch.device, progress: bool = True) -> tuple[WorldModel, dict]:
    """Load the dataset, train (TensorBoard in ./runs/, as every script), print the report and save the artifact
    atomically."""
    from torch.utils.tensorboard import SummaryWriter

    dataset = envs.DEFAULT_DATASET[args.env] if args.dataset is None else args.dataset
    args = resolve(dataclasses.replace(args, dataset=dataset))
    data = envs.load_dataset(args.env, dataset)
    path = artifact_path(args.env, dataset, args.seed)
    # TensorBoard folder named as every script's runs ("state": the model sees the global state, not an obs function)
    writer = SummaryWriter(str(envs.default_run_dir(args.env, "state", dataset, args.exp_name, args.seed)))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))
    ckpt = path.with_name(path.name + ".ckpt")
    model, metrics = train(data, args, device, writer, progress, checkpoint_path=ckpt)
    report = format_report(metrics, data.dataset_id)
    print(report)
    writer.add_text("world_model/report", "```\n" + report + "\n```")
    for i, (m, nll) in enumerate(zip(metrics["holdout_mse"], metrics["holdout_nll"])):
        writer.add_scalar(f"holdout/member{i}_mse", m, metrics["train_steps"])
        writer.add_scalar(f"holdout/member{i}_nll", nll, metrics["train_steps"])
    for h, row in metrics["rollout"].items():
        for k, v in row.items():
            writer.add_scalar(f"rollout_{h}/{k}", v, metrics["train_steps"])
    writer.close()
    save(model, path, args.seed, dataclasses.asdict(args), metrics)
    ckpt.unlink(missing_ok=True)
    print(f"saved {path}")
    return model, metrics


def check_args(args: Args) -> None:
    """Every argument checked before any data, lock or file is touched (MomaError naming the flag)."""
    # (--resume here continues the cached model's own training checkpoint: it needs no --run-dir)
    envs.check_args(dataclasses.replace(args, resume=False), at_least_one=("ensemble_size", "n_elites", "n_hidden_layers", "hidden_dim", "batch_size",
                                        "max_steps", "eval_every", "checkpoint_every", "rollout_eval_starts",
                                        "holdout_eval_size"),
                    positive=("learning_rate",),
                    non_negative=("weight_decay", "logvar_bound_coef", "lr_decays", "patience", "min_improvement",
                                  "min_abs_improvement"),
                    between={"holdout_fraction": (0.001, 0.9), "lr_decay_factor": (1e-6, 1.0)})
    if args.n_elites is not None and args.ensemble_size is not None and args.n_elites > args.ensemble_size:
        raise MomaError(f"--n-elites ({args.n_elites}) must be at most --ensemble-size ({args.ensemble_size})")


def main(args: Args) -> None:
    check_args(args)
    torch.set_num_threads(args.torch_threads)
    torch.backends.cudnn.deterministic = True
    if args.cuda and not torch.cuda.is_available():
        raise MomaError("--cuda was given but torch sees no GPU; drop --cuda to train on the CPU")
    device = torch.device("cuda" if args.cuda else "cpu")
    dataset = envs.DEFAULT_DATASET[args.env] if args.dataset is None else args.dataset
    envs.check_names(args.env, None, dataset)
    path = artifact_path(args.env, dataset, args.seed)
    with training_lock(path):
        if path.exists() and not args.force:
            model = load(path, args.env, dataset, seed=args.seed)
            print(format_report(model.metrics, model.dataset_id))
            print(f"{path} exists; pass --force to retrain")
            return
        envs.check_free_space(path.parent, 0)  # fail now, not after the training
        train_and_save(args, device)


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except MomaError as e:
        raise SystemExit(f"error: {e}")
