"""The MuJoCo datasets of moma-ppo (paper §5.3, Table 2), made here from small behaviour policies.

    python make_datasets.py                                              # build all five MuJoCo datasets
    python make_datasets.py build --only ant/medium --n-transitions 100000
    python make_datasets.py cards                                        # only regenerate docs/datasets.md
    python make_datasets.py update-refs                                  # new reference scores into the metadata

Neither the authors' reacher dataset nor D4RL's ant datasets can be downloaded on the project
machines, so the project makes its own, the way the paper and D4RL did (docs/deviations.md §4):

* reacher `expert-mix` (all-observant two-agent Reacher-v5): two experts that reach with opposite
  elbow-bend conventions, 500k sampled-action transitions each -> 1M transitions, 20k episodes of 50
  steps (as the authors' mix). One is a MAPPO team (`mappo.py`) trained to bend counter-clockwise
  (θ2 >= 0, via a training-only penalty on θ2 < 0); the other is its exact mirror image (see
  REACHER_MIRROR_SIGNS), which bends clockwise. Why not two seeds: our unshaped MAPPO experts choose the
  bend from the target's side (58% / 42%), so seeds need not disagree and mirroring such an expert
  changes nothing; a one-convention expert and its mirror give the two conventions in equal shares,
  with equal skill.
* ant `random` / `medium` / `full-replay` / `expert` (Ant-v5, 27-dim state): uniform random actions; a
  snapshot of the behaviour learner at 1/3-1/2 of the expert's return; every transition the learner
  collected on its way to the expert (re-enacted from its shipped snapshots, whole episodes, to 1M); the
  final policy. The learner is single-agent TD3 on the joint action, `td3_ant.py`.

Reference scores (stored in each dataset's Minari metadata): ref_min = mean return of the uniform
random policy, ref_max = mean greedy return of the expert, 100 episodes each, so normalised scores
are fractions as in the paper.

The small behaviour policies are shipped in `behaviour_policies/` (made by `mappo.py` and `td3_ant.py`:
docs/usage.md) and read here (load_policy) without importing the scripts that trained them.
`envs.build_dataset` (and so every algorithm script) calls `build(env, dataset, n_transitions, seed)`
when a dataset is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import string
import time
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.nn as nn

import envs

REPO_DIR = pathlib.Path(__file__).resolve().parent
POLICY_DIR = REPO_DIR / "behaviour_policies"
# Training state (resumable checkpoints, replay chunks, snapshots) lives in the ignored data/ folder.
TRAIN_DIR = pathlib.Path(os.environ.get("MOMA_BEHAVIOUR_DIR", str(REPO_DIR / "data" / "behaviour")))
ANT_TRAIN_DIR = TRAIN_DIR / "ant_td3"  # td3_ant.py's run; `build --full-replay-source buffer` reads its replay
CARD_TEMPLATE = REPO_DIR / "docs" / "datasets.md.tmpl"  # the text of docs/datasets.md; dataset_cards fills it in


# ==================================================================================================
# The shipped behaviour policies' file formats, read without importing the scripts that trained them
# ==================================================================================================


def _layer(i, o, std=np.sqrt(2), bias=0.0):
    layer = nn.Linear(i, o)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class GaussianMLPPolicy(nn.Module):
    """Tanh MLP mean with a state-independent log-std (CleanRL); inputs are normalised, clipped states.

    This is also the format of the shipped Ant policies: `obs_mean`/`obs_var` buffers travel with it.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, activation: str = "tanh", squash: bool = False):
        super().__init__()
        if activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be tanh or relu, got {activation!r}")
        act = nn.Tanh if activation == "tanh" else nn.ReLU
        self.activation, self.squash = activation, squash  # PPO: tanh, unsquashed; TD3: relu, tanh-squashed
        self.mean_net = nn.Sequential(_layer(obs_dim, hidden), act(), _layer(hidden, hidden), act(),
                                      _layer(hidden, act_dim, std=0.01))
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_var", torch.ones(obs_dim))

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return ((obs - self.obs_mean) / torch.sqrt(self.obs_var + 1e-8)).clamp(-10.0, 10.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:  # raw state -> action mean
        mean = self.mean_net(self.normalize(obs))
        return torch.tanh(mean) if self.squash else mean

    def act(self, obs: np.ndarray, greedy: bool, generator: Optional[torch.Generator] = None) -> np.ndarray:
        """Raw states [n, S] -> executed (clipped) joint actions [n, A]."""
        with torch.no_grad():
            mean = self(torch.as_tensor(obs, dtype=torch.float32))
            if not greedy:
                mean = mean + self.log_std.exp() * torch.randn(mean.shape, generator=generator)
        return mean.clamp(-1.0, 1.0).numpy()


def episode_returns(policy, env: str, n_episodes: int, seed: int, greedy: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(returns, lengths) of a raw-state policy (greedy = mean action, else its own sampled actions, as
    when it collects a dataset), lockstep over n_episodes environments; episode j is reset with seed + j."""
    sims = [envs.make_single_agent_env(env) for _ in range(n_episodes)]
    obs = np.stack([s.reset(seed=seed + j)[0] for j, s in enumerate(sims)]).astype(np.float32)
    gen = torch.Generator().manual_seed(seed)
    returns, lengths = np.zeros(n_episodes), np.zeros(n_episodes, dtype=np.int64)
    alive = np.ones(n_episodes, dtype=bool)
    while alive.any():
        act = policy.act(obs, greedy=greedy, generator=gen)
        for j in np.flatnonzero(alive):
            o, r, term, trunc, _ = sims[j].step(act[j])
            returns[j] += r
            lengths[j] += 1
            obs[j] = o
            if term or trunc:
                alive[j] = False
    return returns, lengths


def export_gaussian_policy(actor: GaussianMLPPolicy, meta: dict) -> dict:
    """A small, self-describing policy file (float32 weights + obs normaliser + how it was made)."""
    return dict(kind="gaussian_mlp", obs_dim=actor.obs_mean.numel(), act_dim=actor.log_std.numel(),
                hidden=actor.mean_net[0].out_features, activation=actor.activation, squash=actor.squash,
                state_dict={k: v.detach().clone() for k, v in actor.state_dict().items()}, meta=meta)


def load_gaussian_policy(blob: dict) -> GaussianMLPPolicy:
    policy = GaussianMLPPolicy(blob["obs_dim"], blob["act_dim"], blob["hidden"], blob.get("activation", "tanh"),
                               blob.get("squash", False))
    policy.load_state_dict(blob["state_dict"])
    policy.eval()
    return policy


class MAPPOTeamPolicy:
    """A MAPPO team saved by `mappo.py` (file kind "mappo", mappo.save_policy_file: the reacher expert), read here
    without importing the training script: per-agent MLPs stacked as [n, in, out] weights (ReLU, one bmm per
    layer) on each agent's observation, normalised with the saved state statistics, clipped to [-10, 10] and
    zero-padded to the widest; head = [mean, raw], log σ = max(-softplus(-(raw + 2)), -6), as mappo.MAPPOAgents.
    `act(states [B, S], greedy, generator)` -> joint actions [B, A] (clipped to [-1, 1])."""

    LOG_STD_MIN = -6.0

    def __init__(self, blob: dict):
        self.env, self.obs, self.action_dim = blob["env"], blob["obs"], blob["action_dim"]
        self.max_obs = max(blob["obs_dims"])
        state = blob["policy_state"]
        self.weights = [state[f"weights.{k}"].float() for k in range(3)]
        self.biases = [state[f"biases.{k}"].float() for k in range(3)]
        S = envs.STATE_DIM[self.env]
        self.state_mean = blob["state_mean"].float() if "state_mean" in blob else torch.zeros(S)
        self.state_var = blob["state_var"].float() if "state_var" in blob else torch.ones(S)
        self.obs_index = envs.obs_indices(self.env, self.obs)
        self.meta = blob.get("meta", {})

    def act(self, states: np.ndarray, greedy: bool, generator: Optional[torch.Generator] = None) -> np.ndarray:
        with torch.no_grad():
            std = torch.sqrt(self.state_var + 1e-8)
            x = torch.stack([
                nn.functional.pad(((torch.as_tensor(o, dtype=torch.float32) - self.state_mean[ix]) / std[ix])
                                  .clamp(-10.0, 10.0), (0, self.max_obs - o.shape[-1]))
                for o, ix in zip(envs.split_state(self.env, self.obs, np.asarray(states, np.float32)), self.obs_index)])
            for k, (w, b) in enumerate(zip(self.weights, self.biases)):
                x = torch.baddbmm(b, x, w)
                if k < len(self.weights) - 1:
                    x = torch.relu(x)
            mean, raw = x[..., : self.action_dim], x[..., self.action_dim:]
            log_std = (-nn.functional.softplus(-(raw + 2.0))).clamp(min=self.LOG_STD_MIN)
            a = mean if greedy else mean + log_std.exp() * torch.randn(mean.shape, generator=generator)
        per_agent = [a[i].numpy() for i in range(a.shape[0])]
        return np.clip(envs.join_actions(self.env, per_agent), -1.0, 1.0)


# ==================================================================================================
# Reacher: arm-bend conventions and the mirror map
# ==================================================================================================
# Reflecting the plane across the x-axis (y -> -y) maps Reacher onto itself: the arm lies along x at
# θ1 = θ2 = 0, joint0 is unlimited, joint1's range [-3, 3] is symmetric, the arena and the target
# distribution (uniform in a disc) are symmetric, and torques about z change sign. In Reacher-v5's state
# (0 cos θ1, 1 cos θ2, 2 sin θ1, 3 sin θ2, 4 target x, 5 target y, 6 θ1', 7 θ2', 8-9 fingertip - target)
# the reflection is θ1 -> -θ1, θ2 -> -θ2, target y -> -y, i.e. a sign flip of entries 2, 3, 5, 6, 7, 9,
# and both torques flip sign. tests/test_make_datasets.py checks it step by step against the simulator.
REACHER_MIRROR_SIGNS = np.array([1, 1, -1, -1, 1, -1, -1, -1, 1, -1], dtype=np.float32)


def mirror_reacher_states(states: np.ndarray) -> np.ndarray:
    return np.asarray(states) * REACHER_MIRROR_SIGNS


def mirror_reacher_actions(actions: np.ndarray) -> np.ndarray:
    return -np.asarray(actions)


# ==================================================================================================
# Policies as "raw states [n, S] -> clipped joint actions [n, A]"
# ==================================================================================================
def load_policy(path: pathlib.Path):
    """A shipped policy file (behaviour_policies/*.pt) -> object with act(states, greedy, generator); no training
    script is imported."""
    path = pathlib.Path(path)
    if not path.exists():
        raise envs.MomaError(f"behaviour policy {path} is missing; restore it from git (`git checkout "
                             f"behaviour_policies/{path.name}`) or retrain it (docs/usage.md, \"Behaviour policies\")")
    blob = torch.load(path, weights_only=True)  # tensors, dicts and numbers only: no code is unpickled
    if blob["kind"] == "mappo":  # the reacher expert is a MAPPO team
        return MAPPOTeamPolicy(blob)
    policy = load_gaussian_policy({**blob, "state_dict": {k: v.float() for k, v in blob["state_dict"].items()}})
    policy.meta = blob.get("meta", {})
    return policy


class MirroredPolicy:
    """π_mirror(s) = -π(M s): the same expert acting in the reflected world (opposite arm bend)."""

    def __init__(self, policy):
        self.policy = policy

    def act(self, states, greedy, generator=None):
        return mirror_reacher_actions(self.policy.act(mirror_reacher_states(states), greedy, generator))


class ZeroPolicy:
    def __init__(self, action_dim: int):
        self.action_dim = action_dim

    def act(self, states, greedy=True, generator=None):
        return np.zeros((len(states), self.action_dim), np.float32)


class UniformRandomPolicy:
    def __init__(self, action_dim: int, seed: int):
        self.action_dim, self.rng = action_dim, np.random.default_rng(seed)

    def act(self, states, greedy=False, generator=None):
        return self.rng.uniform(-1.0, 1.0, (len(states), self.action_dim)).astype(np.float32)


def policy_returns(env: str, policy, n_episodes: int = 100, seed: int = 10101, greedy: bool = True,
                   lean: bool = True) -> np.ndarray:
    """Returns as envs.evaluate gives them (the same evaluation every algorithm script uses; with `lean`, its loop
    on the lean steps); the policies here act on the global state, which every agent sees under the env's default
    observation."""
    obs = envs.DEFAULT_OBS[env]

    def act(observations, histories):
        joint = policy.act(observations[0], greedy=greedy)
        return envs.split_actions(env, joint)

    if not lean or env not in LEAN_STEPS:
        return envs.evaluate(env, obs, act, n_episodes, seed=seed)
    # envs.evaluate's loop, step for step (batches of up to 100 episodes in lockstep, the policy queried on every
    # row, finished rows keeping their last observation, actions cast and clipped as MultiAgentEnv.step does), with
    # the bit-identical lean step: the same returns (tests compare them), a third less CPU.
    returns = np.zeros(n_episodes)
    # a plain line a minute in a log (about a minute of Ant steps per 100 episodes, otherwise silent)
    bar = envs.progress_bar(total=n_episodes * envs.EPISODE_STEPS[env], desc=f"reference episodes {env}", leave=False)
    for start in range(0, n_episodes, 100):
        n = min(100, n_episodes - start)
        sims = [envs.make_single_agent_env(env) for _ in range(n)]
        steppers = [LEAN_STEPS[env](sim) for sim in sims]
        states = np.stack([np.asarray(sim.reset(seed=seed + start + j)[0], dtype=np.float32)
                           for j, sim in enumerate(sims)])
        observations = envs.split_state(env, obs, states)  # per-agent [n, o_i] copies, updated row by row
        steps, alive = np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
        while alive.any():
            actions = [np.asarray(a) for a in act(observations, None)]
            bar.update(int(alive.sum()))
            for j in np.flatnonzero(alive):
                acts = [np.asarray(a[j], dtype=np.float32).reshape(d) for a, d in zip(actions, envs.action_dims(env))]
                o, r, term = steppers[j].step(np.clip(envs.join_actions(env, acts), -1.0, 1.0))
                steps[j] += 1
                returns[start + j] += float(r)
                for i, o_i in enumerate(envs.split_state(env, obs, np.asarray(o, dtype=np.float32))):
                    observations[i][j] = o_i
                alive[j] = not (term or steps[j] >= envs.EPISODE_STEPS[env])
        bar.update(int(envs.EPISODE_STEPS[env] * n - steps.sum()))  # episodes that ended early count as done
        for sim in sims:
            sim.close()
    bar.close()
    return returns


# ==================================================================================================
# Collection: many environments in lockstep, one batched policy call per step
# ==================================================================================================
class LeanAntStep:
    """gymnasium Ant-v5's step (include_cfrc_ext_in_observation=False) without its per-step layers (TimeLimit,
    OrderEnforcing, PassiveEnvChecker, named-body lookups, the info dict): the same MuJoCo calls and the same numpy
    expressions on the same dtypes, so observations, rewards and terminals are bit-identical to `sim.step`
    (tests/test_make_datasets.py checks it over thousands of steps, falls included). Those layers were about a
    fifth of a dataset build's CPU time per transition (536 -> 417 µs, docs/benchmarks.md, "Dataset builds").
    Resets still go through gymnasium; the caller counts steps for the 1,000-step time limit."""

    def __init__(self, sim):
        import mujoco

        ant = sim.unwrapped
        self.mj_step, self.mj_rne_post_constraint = mujoco.mj_step, mujoco.mj_rnePostConstraint
        self.model, self.data = ant.model, ant.data
        self.main_body = ant.data.body(ant._main_body).id
        self.dt, self.frame_skip = ant.dt, ant.frame_skip
        self.forward_weight, self.healthy_reward = ant._forward_reward_weight, ant._healthy_reward
        self.ctrl_cost_weight, self.contact_cost_weight = ant._ctrl_cost_weight, ant._contact_cost_weight
        self.contact_force_range, self.healthy_z_range = ant._contact_force_range, ant._healthy_z_range
        self.terminate_when_unhealthy = ant._terminate_when_unhealthy
        if not ant._exclude_current_positions_from_observation or ant._include_cfrc_ext_in_observation:
            raise ValueError("LeanAntStep reproduces the project's Ant-v5 (27-dim state) only")

    def step(self, action):
        """(observation, reward, terminated) as AntEnv.step returns them (gymnasium 1.x, Ant-v5)."""
        data = self.data
        xy_position_before = data.xpos[self.main_body, :2].copy()
        data.ctrl[:] = action  # MujocoEnv.do_simulation
        self.mj_step(self.model, data, nstep=self.frame_skip)
        self.mj_rne_post_constraint(self.model, data)
        xy_position_after = data.xpos[self.main_body, :2].copy()
        x_velocity = ((xy_position_after - xy_position_before) / self.dt)[0]
        observation = np.concatenate((data.qpos.flatten()[2:], data.qvel.flatten()))
        state = np.concatenate([data.qpos.flat, data.qvel.flat])  # MujocoEnv.state_vector
        min_z, max_z = self.healthy_z_range
        is_healthy = np.isfinite(state).all() and min_z <= state[2] <= max_z
        rewards = x_velocity * self.forward_weight + is_healthy * self.healthy_reward
        ctrl_cost = self.ctrl_cost_weight * np.sum(np.square(action))
        contact_cost = self.contact_cost_weight * np.sum(np.square(np.clip(data.cfrc_ext, *self.contact_force_range)))
        reward = rewards - (ctrl_cost + contact_cost)
        return observation, reward, (not is_healthy) and self.terminate_when_unhealthy


class LeanReacherStep:
    """gymnasium Reacher-v5's step without its per-step layers, bit-identical like LeanAntStep (Reacher's physics is
    cheap, so those layers were about half of its step). Reacher never terminates; the caller counts the 50 steps."""

    def __init__(self, sim):
        import mujoco

        reacher = sim.unwrapped
        self.mj_step, self.mj_rne_post_constraint = mujoco.mj_step, mujoco.mj_rnePostConstraint
        self.model, self.data, self.frame_skip = reacher.model, reacher.data, reacher.frame_skip
        self.fingertip, self.target = reacher.data.body("fingertip").id, reacher.data.body("target").id
        self.dist_weight, self.control_weight = reacher._reward_dist_weight, reacher._reward_control_weight

    def step(self, action):
        """(observation, reward, terminated) as ReacherEnv.step returns them (gymnasium 1.x, Reacher-v5)."""
        data = self.data
        data.ctrl[:] = action  # MujocoEnv.do_simulation
        self.mj_step(self.model, data, nstep=self.frame_skip)
        self.mj_rne_post_constraint(self.model, data)
        qpos = data.qpos.flatten()
        vec = data.xpos[self.fingertip] - data.xpos[self.target]
        observation = np.concatenate([np.cos(qpos[:2]), np.sin(qpos[:2]), qpos[2:], data.qvel.flatten()[:2], vec[:2]])
        reward = -np.linalg.norm(vec) * self.dist_weight + -np.square(action).sum() * self.control_weight
        return observation, reward, False


LEAN_STEPS = {"ant": LeanAntStep, "reacher": LeanReacherStep}


def collect_episodes(env: str, policy, n_transitions: int, seed: int, greedy: bool = False, n_envs: int = 50,
                     desc: str = "collecting", lean: bool = True) -> list[dict]:
    """Episodes of `policy` (sampled actions unless greedy) totalling exactly n_transitions; the last
    episode is cut (marked truncated) to make the count exact, as D4RL's 1M-transition sets.

    Episodes run n_envs at a time in lockstep (one batched policy call per step). Episode k is reset
    with seed `seed * 1_000_003 + k` and the dataset is the prefix of episodes in k order, so short
    episodes (which finish first) are not over-represented and the result does not depend on n_envs. MuJoCo envs
    step through LEAN_STEPS (bit-identical, faster) unless `lean` is False (bench/bench_datasets.py compares).

    Episodes that cannot be in the prefix are not simulated: episode k is needed only while the episodes before it
    may total fewer than n_transitions (their lengths so far are lower bounds). The policy is still called on every
    slot, so each needed episode draws the noise it drew when every slot stepped: the dataset is the same, and
    the tail of each call (up to n_envs unneeded episodes) costs nothing; full-replay makes one call per snapshot."""
    gen = torch.Generator().manual_seed(seed)
    max_steps = envs.EPISODE_STEPS[env]
    n_envs = max(1, min(n_envs, -(-n_transitions // max_steps) + 1))
    sims = [envs.make_single_agent_env(env) for _ in range(n_envs)]
    stepper = [LEAN_STEPS[env](sim) for sim in sims] if env in LEAN_STEPS and lean else None  # bit-identical
    steps = np.zeros(n_envs, dtype=np.int64)  # steps of each slot's episode (the time limit, where `lean` steps)
    state = np.zeros((n_envs, envs.STATE_DIM[env]), np.float32)
    done_eps: dict[int, dict] = {}
    slot_ep = np.zeros(n_envs, dtype=np.int64)  # episode index each slot is running
    next_ep = 0
    bufs = [None] * n_envs

    def start(j):
        nonlocal next_ep
        slot_ep[j] = next_ep
        state[j] = sims[j].reset(seed=seed * 1_000_003 + next_ep)[0]
        steps[j] = 0
        bufs[j] = dict(obs=[state[j].copy()], act=[], rew=[], term=[], trunc=[])
        next_ep += 1

    for j in range(n_envs):
        start(j)
    prefix_len, prefix_steps = 0, 0  # completed episodes 0..prefix_len-1 and their total length
    bar = envs.progress_bar(total=n_transitions, desc=desc, unit="step", unit_scale=True, mininterval=2.0)
    running = np.ones(n_envs, dtype=bool)
    def lower_bounds():
        """(running slots, for each the least total length of the episodes before its own, episodes that would
        start next: the same for index next_ep)."""
        slots = np.flatnonzero(running)
        index = np.concatenate([slot_ep[slots], [k for k in done_eps if k >= prefix_len]]).astype(np.int64)
        length = np.concatenate([steps[slots], [len(done_eps[k]["rew"]) for k in done_eps if k >= prefix_len]])
        order = np.argsort(index, kind="stable")
        before = prefix_steps + np.cumsum(length[order]) - length[order]
        per_slot = np.empty(len(index), np.int64)
        per_slot[order] = before
        return slots, per_slot[: len(slots)], prefix_steps + int(length.sum())

    while prefix_steps < n_transitions:
        actions = policy.act(state, greedy=greedy, generator=gen)
        near_the_end = prefix_steps + n_envs * max_steps >= n_transitions  # skipping is safe to check rarely
        if near_the_end:
            slots, before, _ = lower_bounds()
            running[slots[before >= n_transitions]] = False  # episodes the prefix cannot reach
        for j in np.flatnonzero(running):
            steps[j] += 1
            if stepper is None:
                o, r, term, trunc, _ = sims[j].step(actions[j])
            else:
                o, r, term = stepper[j].step(actions[j])
                trunc = steps[j] >= max_steps  # gymnasium's TimeLimit
            b = bufs[j]
            b["act"].append(np.asarray(actions[j], np.float32))
            b["rew"].append(float(r))
            b["term"].append(bool(term))
            b["trunc"].append(bool(trunc))
            b["obs"].append(np.asarray(o, np.float32))
            state[j] = o
            if term or trunc:
                done_eps[int(slot_ep[j])] = b
                while prefix_len in done_eps and prefix_steps < n_transitions:
                    add = len(done_eps[prefix_len]["rew"])
                    bar.update(min(add, n_transitions - prefix_steps))
                    prefix_steps += add
                    prefix_len += 1
                # start another episode only if the prefix may still need it
                running[j] = False
                if prefix_steps < n_transitions and not (near_the_end and lower_bounds()[2] >= n_transitions):
                    start(j)
                    running[j] = True
    bar.close()
    episodes, total = [], 0
    for k in range(prefix_len):
        b = done_eps[k]
        keep = min(len(b["rew"]), n_transitions - total)
        truncs, terms = np.array(b["trunc"][:keep]), np.array(b["term"][:keep])
        if keep < len(b["rew"]):
            truncs[-1] = True
        episodes.append(dict(observations=np.stack(b["obs"][:keep + 1]), actions=np.stack(b["act"][:keep]),
                             rewards=np.array(b["rew"][:keep]), terminations=terms, truncations=truncs))
        total += keep
    return episodes


def replay_episodes(out_dir: pathlib.Path, up_to_step: int, n_transitions: int) -> list[dict]:
    """Every episode the Ant learner collected up to `up_to_step`, rebuilt per environment stream from
    the replay chunks; whole episodes evenly subsampled (by collection order) down to n_transitions."""
    files = sorted((out_dir / "replay").glob("chunk_*.npz"))
    files = [f for f in files if int(f.stem.split("_")[1]) <= up_to_step]
    if not files:
        raise envs.MomaError(f"no replay chunks in {out_dir / 'replay'}")
    episodes: list[dict] = []
    open_eps: dict[int, dict] = {}
    prev_last = None
    for f in files:
        z = np.load(f)
        obs, act, rew, term, trunc = z["obs"], z["act"], z["rew"], z["term"], z["trunc"]
        finals = {(int(t), int(j)): fo for (t, j), fo in zip(z["final_idx"], z["final_obs"])}
        T, E = rew.shape
        for j in range(E):
            ep = open_eps.get(j)
            if ep is not None and not np.array_equal(prev_last[j], obs[0, j]):
                # a resume restarted the environments: the open episode ends here, cut (not terminal)
                ep["trunc"][-1] = ep["trunc"][-1].copy()
                ep["trunc"][-1][-1] = True
                ep["next_last"] = prev_last[j]
                episodes.append(ep)
                ep = None
            start = 0
            for t in range(T):
                if term[t, j] or trunc[t, j]:
                    piece = slice(start, t + 1)
                    o = obs[piece, j]
                    nxt = finals[(t, j)]
                    if ep is None:
                        ep = dict(obs=[], act=[], rew=[], term=[], trunc=[])
                    ep["obs"].append(o), ep["act"].append(act[piece, j]), ep["rew"].append(rew[piece, j])
                    ep["term"].append(term[piece, j]), ep["trunc"].append(trunc[piece, j])
                    ep["next_last"] = nxt
                    episodes.append(ep)
                    ep, start = None, t + 1
            if start < T:
                if ep is None:
                    ep = dict(obs=[], act=[], rew=[], term=[], trunc=[])
                piece = slice(start, T)
                ep["obs"].append(obs[piece, j]), ep["act"].append(act[piece, j]), ep["rew"].append(rew[piece, j])
                ep["term"].append(term[piece, j]), ep["trunc"].append(trunc[piece, j])
            open_eps[j] = ep
        prev_last = z["obs_last"]
    # finish: concatenate pieces
    done = []
    for ep in episodes:
        if isinstance(ep["obs"], list):
            o = np.concatenate(ep["obs"])
            done.append(dict(observations=np.concatenate([o, ep["next_last"][None]]), actions=np.concatenate(ep["act"]),
                             rewards=np.concatenate(ep["rew"]).astype(np.float64), terminations=np.concatenate(ep["term"]),
                             truncations=np.concatenate(ep["trunc"])))
    lengths = np.array([len(e["rewards"]) for e in done])
    if lengths.sum() > n_transitions:  # keep every k-th episode (k fractional), in collection order
        n_keep = max(1, min(len(done), int(round(len(done) * n_transitions / lengths.sum()))))
        keep = np.unique(np.linspace(0, len(done) - 1, n_keep).round().astype(int))
        done = [done[k] for k in keep]
        total = 0
        for k, e in enumerate(done):
            if total + len(e["rewards"]) >= n_transitions:
                cut = n_transitions - total
                e = dict(observations=e["observations"][:cut + 1], actions=e["actions"][:cut], rewards=e["rewards"][:cut],
                         terminations=e["terminations"][:cut], truncations=e["truncations"][:cut].copy())
                if cut > 0:
                    e["truncations"][-1] = e["truncations"][-1] or not e["terminations"][-1]
                done = done[:k] + ([e] if cut > 0 else [])
                break
            total += len(e["rewards"])
    return done


# ==================================================================================================
# Reference scores and the datasets
# ==================================================================================================
SHIPPED = dict(
    reacher_expert=POLICY_DIR / "reacher_expert.pt",
    ant_expert=POLICY_DIR / "ant_expert.pt",
    ant_medium=POLICY_DIR / "ant_medium.pt",
)
ANT_REPLAY_SNAPSHOTS = POLICY_DIR / "ant_replay_snapshots.pt"  # float16 learner snapshots for full-replay
REF_EPISODES = 100


def _file_key(path: pathlib.Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


REFERENCE_PARTS = ("expert", "zero", "random")  # the episodes behind reference_scores, the longest first


def reference_returns(env: str, seed: int, part: str) -> np.ndarray:
    """The returns of one part of reference_scores: 100 uniform-random episodes (ref_min), 100 greedy expert episodes
    (ref_max), or 100 zero-torque episodes (the standing team). Each draws only from its own generators, so the
    parts can run in separate processes (make_datasets.py build --workers 2 does) and give the same numbers."""
    torch.set_num_threads(1)
    if part == "random":
        return policy_returns(env, UniformRandomPolicy(envs.JOINT_ACTION_DIM[env], seed), REF_EPISODES,
                              seed=20202 + seed, greedy=False)
    if part == "expert":
        return policy_returns(env, load_policy(SHIPPED[f"{env}_expert"]), REF_EPISODES, seed=30303 + seed, greedy=True)
    # A team that applies zero torque: on Ant it stands still and collects the healthy reward (where walking
    # starts on our scale); on reacher it is about the paper's "random" return (see the cards).
    return policy_returns(env, ZeroPolicy(envs.JOINT_ACTION_DIM[env]), REF_EPISODES, seed=20202 + seed)


def reference_scores_cached(env: str, seed: int = 0) -> bool:
    cache = envs.CACHE_DIR / "reference_scores.json"
    key = f"{env}:{_file_key(SHIPPED[f'{env}_expert'])}:{seed}:{REF_EPISODES}"
    return cache.exists() and key in json.loads(cache.read_text())


def reference_scores(env: str, seed: int = 0, parts: Optional[dict] = None) -> tuple[float, float]:
    """(ref_min, ref_max) = mean return of 100 uniform-random episodes and of 100 greedy expert episodes.
    Cached under envs.CACHE_DIR, keyed by the expert file's hash. `parts`: reference_returns already computed
    (e.g. in parallel), by part name."""
    expert_path = SHIPPED[f"{env}_expert"]
    key = f"{env}:{_file_key(expert_path)}:{seed}:{REF_EPISODES}"
    cache = envs.CACHE_DIR / "reference_scores.json"
    table = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in table:
        parts = parts or {}
        random_ret, expert_ret, zero = (parts[p] if p in parts else reference_returns(env, seed, p)
                                        for p in ("random", "expert", "zero"))
        table[key] = dict(ref_min=float(random_ret.mean()), ref_max=float(expert_ret.mean()),
                          ref_min_std=float(random_ret.std()), ref_max_std=float(expert_ret.std()))
        table[key]["zero_action"] = float(zero.mean())
        cache.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own: two builds of different datasets (e.g. run_all.sh --slurm's prepare tasks) may both
        # compute the scores at once; they write the same entry, and neither may move the other's half-written file
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.{time.time_ns()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, cache)
    return table[key]["ref_min"], table[key]["ref_max"]


def zero_action_return(env: str, seed: int = 0) -> float:
    """Mean return of the zero-torque team over the reference episodes (computed with the reference scores)."""
    reference_scores(env, seed)
    key = f"{env}:{_file_key(SHIPPED[f'{env}_expert'])}:{seed}:{REF_EPISODES}"
    return json.loads((envs.CACHE_DIR / "reference_scores.json").read_text())[key]["zero_action"]


def build_reacher_expert_mix(n_transitions: Optional[int], seed: int) -> dict:
    """Half the transitions from the MAPPO expert, half from its mirror image (opposite elbow bend)."""
    n = 1_000_000 if n_transitions is None else n_transitions
    expert = load_policy(SHIPPED["reacher_expert"])
    half = n // 2
    a = collect_episodes("reacher", expert, half, seed=2 * seed + 1, desc="reacher expert")
    b = collect_episodes("reacher", MirroredPolicy(expert), n - half, seed=2 * seed + 2, desc="reacher mirrored expert")
    conv = [envs.reacher_convention(e["observations"][1:])[()] for e in a + b]
    conv_a = np.mean([c == 1 for c in conv[: len(a)]])
    conv_b = np.mean([c == 1 for c in conv[len(a):]])
    ref_min, ref_max = reference_scores("reacher", seed)
    envs.write_minari_dataset(
        "reacher", "expert-mix", a + b, ref_min, ref_max,
        algorithm_name="MAPPO expert (mappo.py) + its mirror image, sampled actions",
        description=(f"Two-agent Reacher-v5 mixture of experts: {len(a)} episodes of a MAPPO expert "
                     f"({100 * conv_a:.1f}% counter-clockwise, θ2 >= 0 near the target) then {len(b)} episodes of "
                     f"the same expert reflected across the x-axis ({100 * (1 - conv_b):.1f}% clockwise). "
                     f"ref_min = uniform random policy, ref_max = greedy expert ({REF_EPISODES} episodes each)."))
    ccw = np.mean(np.array(conv) == 1)
    return dict(episodes=len(conv), counter_clockwise_share=float(ccw), clockwise_share=float(1 - ccw),
                expert_ccw_share=float(conv_a), mirror_ccw_share=float(conv_b))


def build_ant(dataset: str, n_transitions: Optional[int], seed: int, full_replay_source: str = "snapshots",
              episodes: Optional[list] = None) -> dict:
    n = 1_000_000 if n_transitions is None else n_transitions
    info = {}
    if dataset == "random":
        episodes = collect_episodes("ant", UniformRandomPolicy(8, seed), n, seed=10 * seed + 1, desc="ant random")
        algo = "uniform random actions in [-1, 1]"
    elif dataset in ("medium", "expert"):
        policy = load_policy(SHIPPED[f"ant_{dataset}"])
        episodes = collect_episodes("ant", policy, n, seed=10 * seed + (2 if dataset == "medium" else 3),
                                    desc=f"ant {dataset}")
        algo = (f"TD3 (td3_ant.py) policy after {policy.meta.get('step')} env steps, acting "
                f"with Gaussian action noise N(0, {policy.log_std.exp().mean().item():.2f}²)")
    else:  # full-replay: the learner's whole replay buffer up to the expert (D4RL's full-replay)
        expert_step = load_policy(SHIPPED["ant_expert"]).meta.get("step")
        n = full_replay_size(n_transitions)
        # Re-enacted from the shipped snapshots on every machine, so every machine builds the same dataset (the
        # same fingerprint); the learner's own buffer exists only where it was trained (`full_replay_source`).
        if full_replay_source == "buffer":
            episodes = replay_episodes(ANT_TRAIN_DIR, expert_step, n)
            algo = f"every transition the TD3 learner collected up to step {expert_step} (whole episodes)"
        else:
            episodes = snapshot_replay(n, seed) if episodes is None else episodes  # (or collected in parallel)
            algo = (f"a re-enactment of the TD3 learner's replay up to step {expert_step}: uniform random actions for "
                    f"its warm-up steps, then shipped snapshots collecting (with exploration noise) their shares")
        info["source"] = full_replay_source
    ref_min, ref_max = reference_scores("ant", seed)
    envs.write_minari_dataset("ant", dataset, episodes, ref_min, ref_max, algorithm_name=algo,
                              description=f"Ant-v5 (27-dim state) {dataset} dataset: {algo}. ref_min = uniform random "
                                          f"policy, ref_max = greedy expert ({REF_EPISODES} episodes each).")
    return info


def full_replay_size(n_transitions: Optional[int]) -> int:
    """full-replay's transitions: n_transitions (default 1M), at most the learner's steps up to the expert."""
    n = 1_000_000 if n_transitions is None else n_transitions
    return min(n, load_policy(SHIPPED["ant_expert"]).meta.get("step"))


def snapshot_replay_tasks(n: int, seed: int) -> list[tuple[int, int, int]]:
    """The independent collections full-replay is made of, in order: (snapshot index, or -1 for the warm-up's
    uniform random actions; transitions; collection seed). Each has its own generators, so they can run in separate
    processes (make_datasets.py build --workers 2 does) and give the same episodes."""
    blob = torch.load(ANT_REPLAY_SNAPSHOTS, weights_only=True)
    warmup = int(blob["learning_starts"])
    spans = np.array([warmup] + [s["meta"]["covers"][1] - s["meta"]["covers"][0] for s in blob["snapshots"]], float)
    counts = np.floor(spans / spans.sum() * n).astype(int)
    counts[-1] += n - counts.sum()
    return [(k - 1, int(c), 10 * seed + (99 if k == 0 else 99 + k)) for k, c in enumerate(counts) if c > 0]


def snapshot_replay_task(task: tuple[int, int, int], seed: int) -> list[dict]:
    """One collection of snapshot_replay_tasks."""
    k, count, collect_seed = task
    torch.set_num_threads(1)
    if k < 0:
        return collect_episodes("ant", UniformRandomPolicy(8, seed), count, seed=collect_seed, desc="ant replay warm-up")
    blob = torch.load(ANT_REPLAY_SNAPSHOTS, weights_only=True)
    snap = blob["snapshots"][k]
    policy = load_gaussian_policy({**snap, "state_dict": {k2: v.float() for k2, v in snap["state_dict"].items()}})
    return collect_episodes("ant", policy, count, seed=collect_seed,
                            desc=f"ant replay snapshot {k + 1}/{len(blob['snapshots'])}")


def snapshot_replay_task_timed(task: tuple[int, int, int], seed: int) -> tuple[list[dict], float]:
    """snapshot_replay_task and the CPU seconds it took (for the build record of a parallel build)."""
    cpu = time.process_time()
    return snapshot_replay_task(task, seed), time.process_time() - cpu


def snapshot_replay(n: int, seed: int) -> list[dict]:
    """full-replay re-enacted from the shipped snapshots: uniform random actions for the learner's warm-up steps,
    then each snapshot (with the learner's exploration noise) collecting the share of n that the learner
    collected in the interval of steps it `covers` (it is the learner's snapshot nearest that interval's middle)."""
    return [episode for task in snapshot_replay_tasks(n, seed) for episode in snapshot_replay_task(task, seed)]


def update_reference_scores(env: str, seed: int = 0) -> list[str]:
    """Rewrite ref_min_score / ref_max_score in the metadata of `env`'s existing datasets (after a new
    expert was exported, e.g. for `random`, whose transitions do not depend on the expert)."""
    ref_min, ref_max = reference_scores(env, seed)
    done = []
    for name in envs.DATASETS[env]:
        meta_path = envs.dataset_path(env, name) / "data" / "metadata.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            meta.update(ref_min_score=ref_min, ref_max_score=ref_max)
            _write_atomic(meta_path, json.dumps(meta))
            done.append(envs.dataset_id(env, name))
    return done


def build(env: str, dataset: str, n_transitions: Optional[int] = None, seed: int = 0,
          full_replay_source: str = "snapshots", episodes: Optional[list] = None, collect_cpu_s: float = 0.0,
          collect_wall_s: float = 0.0) -> dict:
    """envs.build_dataset's hook: write the Minari dataset envs.dataset_id(env, dataset). The caller holds the
    dataset's build lock (envs.build_dataset, or build_locked for `make_datasets.py build`)."""
    envs.check_names(env, None, dataset)
    check_build_args(n_transitions, seed)
    if env not in ("reacher", "ant"):
        raise envs.MomaError(f"make_datasets builds the MuJoCo datasets only; {env} datasets are built by envs.py")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small policies: extra threads only spin against other jobs
    t0, c0 = time.time(), time.process_time()
    # A script whose dataset is missing builds it in its own process, after seeding: the build (loading the shipped
    # policies draws network initialisations, training one re-seeds torch) must leave the caller's global
    # generators as it found them, or the first run of a seed would differ from its reruns.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            info = (build_reacher_expert_mix(n_transitions, seed) if env == "reacher"
                    else build_ant(dataset, n_transitions, seed, full_replay_source, episodes))
    finally:
        torch.set_num_threads(threads)
        random.setstate(py_state)
        np.random.set_state(np_state)
    # wall time, and this process's CPU time (what the build costs on a machine shared with other jobs)
    # (`episodes` collected elsewhere, e.g. in parallel: their CPU and wall time are added)
    info.update(build_time_s=round(time.time() - t0 + collect_wall_s, 1),
                cpu_time_s=round(time.process_time() - c0 + collect_cpu_s, 1),
                n_transitions=n_transitions, seed=seed)
    _record_build(env, dataset, info)
    return info


# CPU seconds of each build on this project's 2-core machine (cards: "build wall / CPU"), for the build order only
BUILD_COST = {("ant", "full-replay"): 430, ("ant", "random"): 345, ("ant", "medium"): 335, ("ant", "expert"): 330,
              ("reacher", "expert-mix"): 130}


def check_build_args(n_transitions: Optional[int], seed: int) -> None:
    """Before any work: a dataset of 0 transitions (or a negative seed) is an error, never a silent default build."""
    if n_transitions is not None and (isinstance(n_transitions, bool) or n_transitions < 1):
        raise envs.MomaError(f"--n-transitions must be an integer >= 1, got {n_transitions!r} (e.g. --n-transitions "
                             f"100000; leave it out for the full 1M)")
    if seed < 0:
        raise envs.MomaError(f"--seed must be an integer >= 0, got {seed!r} (e.g. --seed 0)")


def build_locked(env: str, dataset: str, n_transitions: Optional[int] = None, seed: int = 0,
                 full_replay_source: str = "snapshots", only_if_missing: bool = False, episodes: Optional[list] = None,
                 collect_cpu_s: float = 0.0, collect_wall_s: float = 0.0) -> Optional[dict]:
    """build() under the dataset's build lock: two `make_datasets.py build`s (a script that finds a dataset missing
    runs one, through envs.build_dataset) never write the same dataset at once; the second waits for the first, and
    with only_if_missing then finds it built (None: nothing was built)."""
    with envs._build_lock(env, dataset):
        if only_if_missing and envs.dataset_exists(env, dataset):
            return None
        return build(env, dataset, n_transitions, seed, full_replay_source, episodes, collect_cpu_s, collect_wall_s)


def _record_build(env: str, dataset: str, info: dict) -> None:
    """Build facts (time, conventions, source) next to the datasets, one file per dataset (no write races)."""
    path = envs.DATA_DIR / "moma" / "builds" / (envs.dataset_id(env, dataset).replace("/", "__") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(info, indent=1))


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Write a small file atomically under a temporary name of this process's own (two builds never share one);
    the temporary file is removed if the write fails."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_records() -> dict:
    folder = envs.DATA_DIR / "moma" / "builds"
    return {f.stem.replace("__", "/"): json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))} \
        if folder.exists() else {}


# ==================================================================================================
# The shapes the shipped Ant policies were chosen for (td3_ant.py exports them; the cards show them)
# ==================================================================================================
# Paper Table 2 (D4RL ant-v2 normalised with D4RL's reference scores; the authors' Reacher-v2 set): min / mean /
# median / max %. Its Ant magnitudes do not carry over to Ant-v5, but its *shape* does: each dataset's mean (and
# median) as a share of the expert dataset's mean score. Medium: 80.2 / 117.4 = 68% (median 95.1 / 117.4 = 81%),
# full-replay 72.0 / 117.4 = 61%, expert 100%. The Ant policies below are chosen to match those shares.
PAPER_TABLE2 = {
    ("reacher", "expert-mix"): (38.8, 100.0, 98.9, 152.3),
    ("ant", "random"): (-3.0, 6.4, 7.2, 10.3),
    ("ant", "medium"): (-4.8, 80.2, 95.1, 107.2),
    ("ant", "full-replay"): (-22.4, 72.0, 77.8, 134.3),
    ("ant", "expert"): (-32.8, 117.4, 129.4, 142.5),
}
ANT_MEDIUM_TARGET = (100 * 80.2 / 117.4, 100 * 95.1 / 117.4)  # medium mean and median, % of the expert set's mean
EXPERT_MIN_STEP = 1_000_000  # the expert comes after >= 1M learner steps, so full-replay holds >= 1M transitions


# ==================================================================================================
# Dataset cards (paper Table 2)
# ==================================================================================================
MUJOCO_DATASETS = [("reacher", "expert-mix"), ("ant", "random"), ("ant", "medium"), ("ant", "full-replay"),
                   ("ant", "expert")]


WORLD_MODEL_REPORTS = REPO_DIR / "results" / "world_models"  # written by `python results.py world-models`
WORLD_MODEL_HEADER = ["| dataset (fingerprint) | steps | wall (s) | held-out MSE (members) | terminal accuracy (min) | "
                      "terminal recall: held-out terminals: heads / vote / vote or rule | state RMSE/std h1 / h5 / h10 | "
                      "reward error h1 / h5 / h10 | one-step RMSE of the elites' means (dataset units) |",
                      "|---|---|---|---|---|---|---|---|---|"]


def world_model_row(r: dict) -> str:
    """One markdown row of a world model's held-out report, in docs/datasets.md's cards and in results.py's
    world-model table alike (results.py calls this; building datasets never imports results.py)."""
    roll = r.get("rollout", {})
    recall = r.get("holdout_terminal_recall_model", {})
    heads = [x for x in r.get("holdout_terminal_recall", []) if x == x]
    terminals = (f"{r.get('holdout_terminals', 0)}: {min(heads):.2f}-{max(heads):.2f} / {recall.get('vote', float('nan')):.2f}"
                 f" / {recall.get('vote_or_rule', float('nan')):.2f}" if heads else "no terminals")
    state = ", ".join(f"{k} {v:.4f}" for k, v in r.get("elite_state_rmse", {}).items())
    return (f"| `{r['dataset_id']}` (`{(r.get('dataset_fingerprint') or '?')[:12]}`) | {r['train_steps']:,} "
            f"({'held-out plateau' if r.get('stopped_early') else 'step cap'}) | {r.get('train_time_s', float('nan')):.0f} | "
            f"{min(r['holdout_mse']):.4f}-{max(r['holdout_mse']):.4f} | {min(r['holdout_terminal_accuracy']):.4f} | "
            f"{terminals} | " + " / ".join(f"{roll[h]['state_rmse_std_units']:.3f}" for h in ("h1", "h5", "h10") if h in roll)
            + " | " + " / ".join(f"{roll[h]['reward_abs_error']:.3f}" for h in ("h1", "h5", "h10") if h in roll)
            + f" | {state} |")


def _world_model_rows(folder: pathlib.Path = WORLD_MODEL_REPORTS) -> list[str]:
    """Held-out reports of the MuJoCo datasets' world models (seed 0) kept in results/world_models/*.json (written
    by `python results.py world-models` where they were trained: the models themselves stay in the ignored cache)."""
    reports = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return [world_model_row(r) for r in reports
            if r.get("env") in {env for env, _ in MUJOCO_DATASETS} and r.get("hyper", {}).get("seed", 0) == 0]


def dataset_cards(path: Optional[pathlib.Path] = REPO_DIR / "docs" / "datasets.md") -> str:
    """Markdown Table-2 statistics of every MuJoCo dataset present locally, with the shapes the Ant policies were
    chosen for, the medium search, the full-replay re-enactment against the learner's buffer, and the world models'
    held-out reports (written to `path`)."""
    builds = build_records()
    stats = {}
    for env, name in MUJOCO_DATASETS:
        if not envs.dataset_exists(env, name):
            continue
        try:
            stats[(env, name)] = envs.dataset_stats(env, name)
        except envs.MomaError as e:  # e.g. being written by another build right now
            print(f"dataset card: skipping {env}/{name}: {e}")
    expert_mean = stats[("ant", "expert")]["mean_score_pct"] if ("ant", "expert") in stats else None
    paper_expert_mean = PAPER_TABLE2[("ant", "expert")][1]
    rows = []
    for (env, name), st in stats.items():
        b = builds.get(st["dataset"], {})
        paper = PAPER_TABLE2[(env, name)]
        if env == "ant" and expert_mean:
            share = (f"{100 * st['mean_score_pct'] / expert_mean:.0f} / {100 * paper[1] / paper_expert_mean:.0f} | "
                     f"{100 * st['median_score_pct'] / expert_mean:.0f} / {100 * paper[2] / paper_expert_mean:.0f}")
        else:
            share = "- | -"
        rows.append(f"| `{st['dataset']}` | {st['min_score_pct']:.1f} / {st['mean_score_pct']:.1f} / "
                    f"{st['median_score_pct']:.1f} / {st['max_score_pct']:.1f} | "
                    f"{' / '.join(f'{v:g}' for v in paper)} | {share} | {st['episodes']:,} "
                    f"({100 * st['terminated_episodes'] / st['episodes']:.0f}% fell) | {st['transitions']:,} | "
                    f"{st['ref_min_score']:.2f} / {st['ref_max_score']:.2f} | "
                    f"{b.get('build_time_s', float('nan')):.0f} / {b.get('cpu_time_s', 'n/a')} | `{st['fingerprint'][:12]}` |")
    standing = []
    for env in ("ant", "reacher"):
        if SHIPPED[f"{env}_expert"].exists() and any(e == env for e, _ in stats):
            lo, hi = reference_scores(env)
            zero = zero_action_return(env)
            standing.append(f"{env}: return {zero:.1f}, normalised score **{(zero - lo) / (hi - lo):.3f}**")

    medium_meta = torch.load(SHIPPED["ant_medium"], weights_only=True).get("meta", {}) if SHIPPED["ant_medium"].exists() else {}
    search = medium_meta.get("search")
    medium_rows = []
    if search:
        for r in sorted(search["candidates"], key=lambda r: (r["step"], r["noise"])):
            medium_rows.append(f"| {r['step']:,} | {r['noise']:.2f} | {r['episodes']} | {r['mean_share']:.1f} | "
                               f"{r['median_share']:.1f} | {100 * r['fell_share']:.0f} | {r['distance']:.1f} |")
        for r in search["confirmed"] + search.get("refined", []):
            chosen = " **(shipped)**" if (r["step"], r["noise"]) == (search["choice"]["step"], search["choice"]["noise"]) else ""
            medium_rows.append(f"| {r['step']:,}{chosen} | {r['noise']:.2f} | {r['episodes']} | {r['mean_share']:.1f} | "
                               f"{r['median_share']:.1f} | {100 * r['fell_share']:.0f} | {r['distance']:.1f} |")
    replay_blob = torch.load(ANT_REPLAY_SNAPSHOTS, weights_only=True) if ANT_REPLAY_SNAPSHOTS.exists() else {}
    buffer = replay_blob.get("buffer_stats")
    replay_note = "not recorded"
    if buffer and ("ant", "full-replay") in stats and expert_mean:
        st = stats[("ant", "full-replay")]
        replay_note = (
            f"the learner's own buffer up to the expert (step {replay_blob['expert_step']:,}; {buffer['episodes']:,} "
            f"episodes): {buffer['min_score_pct']:.1f} / {buffer['mean_score_pct']:.1f} / {buffer['median_score_pct']:.1f} / "
            f"{buffer['max_score_pct']:.1f} % (mean {100 * buffer['mean_score_pct'] / expert_mean:.0f}% of the expert set's "
            f"mean); the re-enactment from {len(replay_blob['snapshots'])} shipped snapshots that every machine builds: "
            f"{st['min_score_pct']:.1f} / {st['mean_score_pct']:.1f} / {st['median_score_pct']:.1f} / {st['max_score_pct']:.1f} % "
            f"(mean {100 * st['mean_score_pct'] / expert_mean:.0f}%)")
    policies = []
    for key, p in SHIPPED.items():
        if p.exists():
            m = torch.load(p, weights_only=True).get("meta", {})
            noise = m.get("noise", 0.1 if key.startswith("ant") else None)
            trained_by = f"`{m.get('trained_by', '')}`"
            if "--train-ant" in trained_by:  # the shipped files predate td3_ant.py: the same learner, moved there
                trained_by = f"`python td3_ant.py [--resume]` (recorded then as {trained_by})"
            policies.append(f"| `{p.relative_to(REPO_DIR)}` | {p.stat().st_size / 1e3:.0f} kB | {m.get('step', '')} | "
                            f"{'' if noise is None else noise} | "
                            f"{m.get('greedy_return_mean', float('nan')):.2f} ({m.get('greedy_return_episodes', '')} ep.) | "
                            f"{trained_by} | {m.get('wall_time_s', '')} |")
    if ANT_REPLAY_SNAPSHOTS.exists():
        policies.append(f"| `{ANT_REPLAY_SNAPSHOTS.relative_to(REPO_DIR)}` | {ANT_REPLAY_SNAPSHOTS.stat().st_size / 1e3:.0f} kB | "
                        f"{', '.join(str(b['meta']['step']) for b in replay_blob['snapshots'])} | 0.1 | | | |")
    expert_meta = torch.load(SHIPPED["ant_expert"], weights_only=True).get("meta", {}) if SHIPPED["ant_expert"].exists() else {}
    expert_candidates = ", ".join(f"step {k:,}: {v:.0f}" for k, v in sorted(expert_meta.get("candidates", {}).items()))
    reacher = builds.get(envs.dataset_id("reacher", "expert-mix"), {})
    wm_rows = _world_model_rows()
    text = string.Template(CARD_TEMPLATE.read_text().split("\n", 1)[1]).substitute(
        dataset_rows="\n".join(rows), ref_episodes=REF_EPISODES,
        standing_still="; ".join(standing) or "not computed yet",
        expert_eval_episodes=expert_meta.get("greedy_return_episodes", "?"), expert_min_step=f"{EXPERT_MIN_STEP:,}",
        expert_candidates=expert_candidates or "n/a", medium_target_mean=f"{ANT_MEDIUM_TARGET[0]:.0f}",
        medium_target_median=f"{ANT_MEDIUM_TARGET[1]:.0f}",
        expert_set_mean_pct=f"{search['expert_set_mean_pct'] if search else float('nan'):.1f}",
        medium_rows="\n".join(medium_rows), replay_note=replay_note,
        world_model_header="\n".join(WORLD_MODEL_HEADER),
        world_model_rows="\n".join(wm_rows) or "| (no report kept yet) | | | | | | | | |",
        reacher_ccw_pct=f"{100 * reacher.get('counter_clockwise_share', float('nan')):.1f}",
        reacher_cw_pct=f"{100 * reacher.get('clockwise_share', float('nan')):.1f}",
        policy_rows="\n".join(policies),
        ant_total_steps=f"{expert_meta['config']['total_steps']:,}" if "config" in expert_meta else "?")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


# ==================================================================================================
# Command line: one subcommand per job (`python make_datasets.py <subcommand> --help`)
# ==================================================================================================
@dataclasses.dataclass
class Build:
    """Build the MuJoCo datasets from the shipped behaviour policies (default: all five), then regenerate
    docs/datasets.md."""

    only: Optional[Literal["reacher/expert-mix", "ant/random", "ant/medium", "ant/full-replay", "ant/expert"]] = None
    """build only this dataset (default: all five)"""
    n_transitions: Optional[int] = None
    """transitions per dataset (default 1M; smaller for quick checks)"""
    seed: int = 0
    full_replay_source: Literal["snapshots", "buffer"] = "snapshots"
    """full-replay from the shipped snapshots (every machine builds the same set) or from the learner's own
    replay buffer (only where td3_ant.py was trained: data/behaviour/ant_td3/replay)"""
    workers: int = 2
    """datasets built in parallel processes (one per core)"""
    if_missing: bool = False
    """build only the datasets that do not exist (checked under each dataset's lock): what a script that finds a
    dataset missing runs"""


@dataclasses.dataclass
class Cards:
    """Only regenerate docs/datasets.md from the datasets present."""


@dataclasses.dataclass
class UpdateRefs:
    """Recompute the reference scores (after a new expert was exported) and write them into the existing datasets'
    metadata, then regenerate docs/datasets.md."""

    seed: int = 0


Command = Union[Build, Cards, UpdateRefs]


def _report_build(env: str, name: str, info: Optional[dict], log) -> None:
    if info is None:
        log(f"{envs.dataset_id(env, name)} exists (built meanwhile by another process): not rebuilt")
        return
    st = envs.dataset_stats(env, name)
    log(f"built {st['dataset']} in {info['build_time_s']:.0f}s: {st['episodes']} episodes, {st['transitions']} "
        f"transitions, normalised score min/mean/median/max {st['min_score_pct']:.1f} / {st['mean_score_pct']:.1f} / "
        f"{st['median_score_pct']:.1f} / {st['max_score_pct']:.1f} %, ref {st['ref_min_score']:.2f} / "
        f"{st['ref_max_score']:.2f} | {info}")


def build_in_parallel(todo: list, ref_envs: list, args: "Build", log) -> None:
    """One pool of `args.workers` processes for everything, so that no core waits: first the reference episodes (a
    build needs its env's scores only when it writes, minutes later), then the builds, longest first, and last
    full-replay as its independent collections (snapshot_replay_tasks, ~25 CPU s each), which fill the workers'
    final minutes; this process writes full-replay once they are all in. The datasets are those of a serial build."""
    import collections
    import concurrent.futures
    import multiprocessing

    full_replay = ("ant", "full-replay")
    split = (full_replay in todo and args.full_replay_source == "snapshots"
             and not (args.if_missing and envs.dataset_exists(*full_replay)))
    for env in ref_envs:
        if reference_scores_cached(env, args.seed):
            lo, hi = reference_scores(env, args.seed)
            log(f"{env} reference scores: random {lo:.3f}, expert {hi:.3f} ({REF_EPISODES} episodes each)")
    t0 = time.time()
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {}
        for env in ref_envs:
            if not reference_scores_cached(env, args.seed):
                for part in REFERENCE_PARTS:
                    jobs[pool.submit(reference_returns, env, args.seed, part)] = ("reference", env, part)
        for env, name in sorted(todo, key=lambda t: -BUILD_COST.get(t, 0)):
            if not (split and (env, name) == full_replay):
                jobs[pool.submit(build_locked, env, name, args.n_transitions, args.seed, args.full_replay_source,
                                 args.if_missing)] = ("build", env, name)
        tasks = snapshot_replay_tasks(full_replay_size(args.n_transitions), args.seed) if split else []
        for i, task in enumerate(tasks):
            jobs[pool.submit(snapshot_replay_task_timed, task, args.seed)] = ("replay", i, None)
        references, replayed, replay_cpu = collections.defaultdict(dict), {}, 0.0
        for job in concurrent.futures.as_completed(jobs):
            kind, key, part = jobs[job]
            if kind == "reference":
                references[key][part] = job.result()
                if len(references[key]) == len(REFERENCE_PARTS):
                    lo, hi = reference_scores(key, args.seed, references[key])
                    log(f"{key} reference scores: random {lo:.3f}, expert {hi:.3f} ({REF_EPISODES} episodes each)")
            elif kind == "build":
                _report_build(key, part, job.result(), log)
            else:
                replayed[key], cpu = job.result()
                replay_cpu += cpu
                if len(replayed) == len(tasks):
                    episodes = [episode for i in range(len(tasks)) for episode in replayed.pop(i)]
                    # its wall time counts from the pool's start (its collections share the workers with the rest)
                    _report_build(*full_replay, build_locked(*full_replay, args.n_transitions, args.seed, "snapshots",
                                                             False, episodes, replay_cpu, time.time() - t0), log)


def main(args: Command) -> None:
    torch.set_num_threads(1)  # small policies; extra threads only spin against other jobs
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    if isinstance(args, UpdateRefs):
        check_build_args(None, args.seed)
        for env in ("reacher", "ant"):
            log(f"updated reference scores of {update_reference_scores(env, args.seed)}")
        dataset_cards()
        return
    if isinstance(args, Cards):
        print(dataset_cards())
        return
    check_build_args(args.n_transitions, args.seed)  # before the reference scores or any build
    if args.workers < 1:
        raise envs.MomaError(f"--workers must be an integer >= 1, got {args.workers!r} (e.g. --workers 2)")
    todo = MUJOCO_DATASETS if args.only is None else [tuple(args.only.split("/"))]
    t0 = time.time()
    ref_envs = sorted({env for env, _ in todo}, reverse=True)  # ant's episodes are the long ones
    if args.workers > 1 and len(todo) > 1:
        build_in_parallel(todo, ref_envs, args, log)
    else:
        for env in ref_envs:  # once, before the builds need them
            lo, hi = reference_scores(env, args.seed)
            log(f"{env} reference scores: random {lo:.3f}, expert {hi:.3f} ({REF_EPISODES} episodes each)")
        for env, name in todo:
            _report_build(env, name, build_locked(env, name, args.n_transitions, args.seed, args.full_replay_source,
                                                  args.if_missing), log)
    log(f"all builds done in {time.time() - t0:.0f}s (reference episodes included)")
    missing = [f"{env}/{name}" for env, name in MUJOCO_DATASETS if not envs.dataset_exists(env, name)]
    if missing:  # a partial build must not rewrite the committed page with only the datasets present here
        log(f"docs/datasets.md left as it is: {', '.join(missing)} not built here (`python make_datasets.py cards` once all are)")
    else:
        dataset_cards()


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Command, default=Build()))  # no subcommand: build
    except envs.MomaError as e:
        raise SystemExit(f"error: {e}")
