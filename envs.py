"""Shared module of moma-ppo: the paper's three benchmarks, their observation functions and datasets.

Everything an algorithm script needs about a task lives here, so that every script splits states,
builds histories, evaluates and normalises scores in exactly the same way:

* `make_env(env, obs, seed)`        one multi-agent environment (per-agent lists in and out).
* `evaluate(...)`                   greedy episodes in the real environment, batched over episodes.
* `load_dataset(env, dataset, obs)` an offline dataset split per agent, with 10-step histories.
* `build_dataset(env, dataset)`     (re)generates a project dataset locally; `python envs.py --help`.
* `normalized_score(...)`           (R - ref_min) / (ref_max - ref_min), a fraction as in the paper.

Benchmarks (paper §5; docs/environments.md, docs/deviations.md §1-§3):

* coordination - the Iterated Coordination Game (Fig. 3a): 2 agents, actions 0 = left, 1 = right,
  payoff 1 when both pick the same direction. An episode is `COORDINATION_ROUNDS` rounds; the state
  and both observations are the normalised round index t / rounds (no information about the
  other agent). Return / rounds = mean payoff per round in [0, 1].
* reacher - gymnasium Reacher-v5 split in two agents (agent 0 torques joint0, agent 1 joint1).
  Reacher-v5 has a 10-dim observation; the authors' Reacher-v2 had 11 (an extra, always-zero
  fingertip-target z). We drop nothing else.
* ant - gymnasium Ant-v5 with `include_cfrc_ext_in_observation=False` (27-dim state, as the
  authors' 27-dim cut of D4RL's ant), one agent per leg.

Datasets are single-agent Minari datasets (observation = global state, action = joint action) stored
under `DATA_DIR` (`MINARI_DATASETS_PATH` overrides), with ids `moma/<env>/<dataset>-v0`. Nothing is
ever downloaded: a missing project dataset is built locally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import socket
import time
import warnings
from typing import Callable, Literal, Optional, Sequence

import gymnasium as gym
import numpy as np

REPO_DIR = pathlib.Path(__file__).resolve().parent
# Datasets live inside the repository (ignored by git) unless the user points Minari elsewhere.
# This must be set before minari resolves its storage path, i.e. before any minari call.
os.environ.setdefault("MINARI_DATASETS_PATH", str(REPO_DIR / "data" / "minari"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
DATA_DIR = pathlib.Path(os.environ["MINARI_DATASETS_PATH"])
# World models and flattened datasets; MOMA_CACHE_DIR overrides (the tests use a temporary folder).
CACHE_DIR = pathlib.Path(os.environ.get("MOMA_CACHE_DIR", str(REPO_DIR / "data" / "cache")))


def keep_large_allocations_in_the_heap() -> bool:
    """Stop glibc from serving every allocation above 32 MB with a fresh mmap (and unmapping it on free).

    The PPO minibatches and rollout tensors of MOMA-PPO are tens of MB; with glibc's default dynamic
    threshold each one page-faults its memory in anew, which showed up as 21.9 s of system time in a
    35 s benchmark (bench/bench_moma_ppo.py, ant partial: 1,036 -> 1,771 synthetic steps/s with this).
    Called at start by the scripts whose large tensors gain from it: moma_ppo.py, and icql.py / omar.py, whose CQL
    activations are 63 MB (1.5x their gradient steps/s; the other baselines' tensors stay below glibc's threshold and
    gain nothing measurable); a no-op off glibc (MOMA_KEEP_MMAP=1 disables it).
    """
    if os.environ.get("MOMA_KEEP_MMAP") == "1":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


EnvName = Literal["coordination", "reacher", "ant"]
ObsName = Literal["full", "all-observant", "independent", "leader-only", "partial"]

ENVS = ("coordination", "reacher", "ant")
OBS_FUNCTIONS = {
    "coordination": ("full",),
    "reacher": ("all-observant", "independent", "leader-only"),
    "ant": ("full", "partial"),
}
DEFAULT_OBS = {"coordination": "full", "reacher": "all-observant", "ant": "full"}
# The (env, obs) tasks where an agent does not see the whole state: there the observation is not Markov and the
# decentralised learners condition on the 10-step history encoder (docs/deviations.md §6).
PARTIALLY_OBSERVABLE = frozenset({("reacher", "independent"), ("reacher", "leader-only"), ("ant", "partial")})
DATASETS = {
    "coordination": ("favorable", "neutral", "unfavorable"),
    "reacher": ("expert-mix",),
    "ant": ("random", "medium", "full-replay", "expert"),
}
DEFAULT_DATASET = {"coordination": "unfavorable", "reacher": "expert-mix", "ant": "medium"}
N_AGENTS = {"coordination": 2, "reacher": 2, "ant": 4}
STATE_DIM = {"coordination": 1, "reacher": 10, "ant": 27}
JOINT_ACTION_DIM = {"coordination": 2, "reacher": 2, "ant": 8}
EPISODE_STEPS = {"coordination": 10, "reacher": 50, "ant": 1000}
HISTORY_LEN = 10  # paper §3.2: 10-step action-observation histories
# Ant-v5 ends an episode when the torso height (state 0) leaves this range or the state is not finite
# (gymnasium's defaults healthy_z_range=(0.2, 1.0), terminate_when_unhealthy=True); Reacher and the
# coordination game never terminate, they only time out.
ANT_HEALTHY_Z = (0.2, 1.0)


def is_terminal_state(env: str, states):
    """The env's own termination rule on next states [..., S] (NumPy or torch): True where s' is absorbing.

    World-model rollouts apply it to the predicted next state (MOPO's and OfflineRL-Kit's `termination_fn`):
    in our Ant datasets every terminal is a jump above z = 1.0 (476 of 1M rows in `medium`), too rare for the
    learned terminal head, which the rule backs up (see world_model.py)."""
    z = states[..., 0]
    if env != "ant":
        return z > float("inf")  # never: all False, in the input's array type
    not_finite = ((states != states) | (abs(states) == float("inf"))).any(-1)
    return not_finite | (z < ANT_HEALTHY_Z[0]) | (z > ANT_HEALTHY_Z[1])

# --------------------------------------------------------------------------------------------------
# Observation functions: per-agent index lists into the global state (docs/environments.md, docs/deviations.md §1-§2).
# --------------------------------------------------------------------------------------------------
_REACHER_FIRST_ARM = [0, 2, 6]  # cos θ1, sin θ1, θ1 velocity
_REACHER_SECOND_ARM = [1, 3, 7]  # cos θ2, sin θ2, θ2 velocity
_REACHER_TARGET = [4, 5]  # target x, y; 8-9 (fingertip - target) is seen only when all-observant
_ANT_TORSO = [0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 18]  # z, quaternion, linear and angular velocity
_ANT_LEGS = [[5, 6, 19, 20], [7, 8, 21, 22], [9, 10, 23, 24], [11, 12, 25, 26]]  # hip, ankle, velocities

OBS_INDICES: dict[tuple[str, str], list[list[int]]] = {
    ("coordination", "full"): [[0], [0]],
    ("reacher", "all-observant"): [list(range(10)), list(range(10))],
    ("reacher", "independent"): [_REACHER_FIRST_ARM + _REACHER_TARGET, _REACHER_SECOND_ARM + _REACHER_TARGET],
    ("reacher", "leader-only"): [
        _REACHER_FIRST_ARM + _REACHER_SECOND_ARM + _REACHER_TARGET,
        _REACHER_FIRST_ARM + _REACHER_SECOND_ARM,
    ],
    ("ant", "full"): [list(range(27)) for _ in range(4)],
    # Only agent 0 (front-left leg, yellow in Fig. 3c) sees the torso; every agent sees its own leg.
    ("ant", "partial"): [_ANT_TORSO + _ANT_LEGS[0], _ANT_LEGS[1], _ANT_LEGS[2], _ANT_LEGS[3]],
}

# Which entries of the joint (environment) action each agent drives.
# Ant: gymnasium's ant.xml lists its actuators as hip_4, ankle_4, hip_1, ankle_1, hip_2, ankle_2, hip_3,
# ankle_3, so leg i (hip_i, ankle_i, observed at state indices above) is driven by these action indices.
# The authors' code gave agent i action indices [2i, 2i+1], so its PO agents actuated a different leg
# than they observed (docs/deviations.md §1). We follow the paper's text instead: each agent observes
# the limb it controls.
ACTION_INDICES: dict[str, list[list[int]]] = {
    "coordination": [[0], [1]],
    "reacher": [[0], [1]],
    "ant": [[2, 3], [4, 5], [6, 7], [0, 1]],
}
COORDINATION_N_ACTIONS = 2  # 0 = left, 1 = right
COORDINATION_ROUNDS = EPISODE_STEPS["coordination"]
# Table 1: behaviour probabilities P(a1 = right), P(a2 = right).
COORDINATION_BEHAVIOUR = {"favorable": (0.75, 0.75), "neutral": (0.5, 0.5), "unfavorable": (0.25, 0.75)}
COORDINATION_EPISODES = 2000  # 20k rounds; seed 0 gives mean scores 0.621 / 0.498 / 0.373 (paper: 0.623 / 0.502 / 0.375)


class PlainProgress:
    """A progress report for logs (nohup, Slurm): where stderr is not a terminal tqdm draws nothing, and a long
    phase (dataset build, world model, training) would print nothing for minutes. This prints one plain line
    every `every_s` seconds (MOMA_PROGRESS_EVERY, default 60): phase, step / total, rate, ETA and the postfix."""

    def __init__(self, iterable=None, total=None, desc="", initial=0, every_s=None, **_):
        self.iterable, self.total, self.desc, self.n = iterable, total, desc, initial
        self.every_s = float(os.environ.get("MOMA_PROGRESS_EVERY", 60)) if every_s is None else every_s
        self.postfix, self.start_n = "", initial
        self._time = time.time
        self.t_start = self.t_last = self._time()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def set_postfix(self, ordered_dict=None, **kwargs):
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n=1):
        self.n += n
        if self._time() - self.t_last >= self.every_s:
            self._print()

    def _print(self):
        self.t_last = now = self._time()
        rate = (self.n - self.start_n) / max(now - self.t_start, 1e-9)
        total = f"/{self.total}" if self.total else ""
        eta = f", ETA {(self.total - self.n) / rate / 60:.1f} min" if self.total and rate > 0 else ""
        print(f"[{self.desc}] {self.n}{total} ({rate:.1f}/s{eta}, {now - self.t_start:.0f} s)"
              + (f" {self.postfix}" if self.postfix else ""), flush=True)

    def close(self):
        if self.n > self.start_n:
            self._print()


def progress_bar(iterable=None, *, total=None, desc="", disable=None, initial=0, **tqdm_kwargs):
    """tqdm on a terminal; PlainProgress lines in a log. disable=True shows nothing (short phases)."""
    import sys

    if disable is True:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=True, initial=initial)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, **tqdm_kwargs)
    return PlainProgress(iterable, total=total, desc=desc, initial=initial)


class MomaError(ValueError):
    """Bad user input (unknown name, mismatched dataset, corrupt file): the message says the fix."""


def check_names(env: str, obs: Optional[str] = None, dataset: Optional[str] = None) -> str:
    """Validate (env, obs, dataset); returns the observation function (the env's default if None)."""
    if env not in ENVS:
        raise MomaError(f"unknown env {env!r}; valid envs: {', '.join(ENVS)}")
    if obs is None:
        obs = DEFAULT_OBS[env]
    if obs not in OBS_FUNCTIONS[env]:
        raise MomaError(
            f"unknown observation function {obs!r} for env {env!r}; valid choices: {', '.join(OBS_FUNCTIONS[env])}"
        )
    if dataset is not None and not _is_external_id(dataset) and dataset not in DATASETS[env]:
        raise MomaError(
            f"unknown dataset {dataset!r} for env {env!r}; valid choices: {', '.join(DATASETS[env])} "
            f"(or a local Minari id such as 'mujoco/{env}/medium-v0' downloaded by you)"
        )
    return obs


def obs_indices(env: str, obs: Optional[str] = None) -> list[list[int]]:
    return OBS_INDICES[(env, check_names(env, obs))]


def obs_dims(env: str, obs: Optional[str] = None) -> list[int]:
    return [len(ix) for ix in obs_indices(env, obs)]


def action_dims(env: str) -> list[int]:
    return [len(ix) for ix in ACTION_INDICES[env]]


def split_state(env: str, obs: Optional[str], states):
    """Global states [..., S] -> list of per-agent observations [..., o_i] (numpy or torch)."""
    return [states[..., ix] for ix in obs_indices(env, obs)]


def split_actions(env: str, joint_actions):
    """Joint actions [..., A] -> list of per-agent actions [..., a_i] (numpy or torch)."""
    return [joint_actions[..., ix] for ix in ACTION_INDICES[env]]


def join_actions(env: str, actions: Sequence[np.ndarray]) -> np.ndarray:
    """List of per-agent actions [..., a_i] -> joint action [..., A] in the environment's order."""
    first = np.asarray(actions[0])
    joint = np.zeros(first.shape[:-1] + (JOINT_ACTION_DIM[env],), dtype=first.dtype)
    for ix, a in zip(ACTION_INDICES[env], actions):
        joint[..., ix] = a
    return joint


# --------------------------------------------------------------------------------------------------
# Environments
# --------------------------------------------------------------------------------------------------
def _coordination_spaces():
    return (gym.spaces.Box(0.0, 1.0, (1,), np.float32), gym.spaces.MultiDiscrete([COORDINATION_N_ACTIONS] * 2))


class CoordinationGame(gym.Env):
    """The Iterated Coordination Game over joint actions, with gymnasium's Env interface.

    Registered as gymnasium id `COORDINATION_GYM_ID`, so its Minari datasets carry an env spec.
    """

    metadata = {"render_modes": []}

    def __init__(self, rounds: int = COORDINATION_ROUNDS):
        self.rounds = rounds
        self.t = 0
        self.observation_space, self.action_space = _coordination_spaces()

    def _state(self) -> np.ndarray:
        return np.array([self.t / self.rounds], dtype=np.float32)

    def reset(self, seed: Optional[int] = None, options: Optional[dict] = None):
        self.t = 0
        return self._state(), {}

    def step(self, joint_action):
        a = np.asarray(joint_action).astype(np.int64).reshape(-1)
        if a.shape != (2,) or not np.isin(a, (0, 1)).all():
            raise MomaError(f"coordination actions must be two integers in {{0, 1}}, got {joint_action!r}")
        reward = float(a[0] == a[1])
        self.t += 1
        return self._state(), reward, False, self.t >= self.rounds, {}

COORDINATION_GYM_ID = "moma/CoordinationGame-v0"


def _register_coordination() -> None:
    if COORDINATION_GYM_ID not in gym.registry:
        gym.register(id=COORDINATION_GYM_ID, entry_point="envs:CoordinationGame", disable_env_checker=True)


def make_single_agent_env(env: str, seed: Optional[int] = None):
    """The underlying single-agent environment: global state in, joint action out."""
    check_names(env)
    if env == "coordination":
        return CoordinationGame()
    if env == "reacher":
        return gym.make("Reacher-v5", max_episode_steps=EPISODE_STEPS["reacher"])
    return gym.make("Ant-v5", include_cfrc_ext_in_observation=False, max_episode_steps=EPISODE_STEPS["ant"])


class MultiAgentEnv:
    """One episode at a time, per-agent lists in and out, one shared team reward.

    reset(seed) -> (observations, state)
    step(actions) -> (observations, state, reward, terminated, truncated)
    `observations[i]` is agent i's observation, `actions[i]` agent i's action (a float array of
    its action dims, or an int in {0, 1} for the coordination game).
    """

    def __init__(self, env: str, obs: Optional[str] = None, seed: Optional[int] = None):
        self.obs = check_names(env, obs)
        self.env_name = env
        self.n_agents = N_AGENTS[env]
        self.obs_dims = obs_dims(env, self.obs)
        self.action_dims = action_dims(env)
        self.state_dim = STATE_DIM[env]
        self.discrete = env == "coordination"
        self.max_episode_steps = EPISODE_STEPS[env]
        self.env = make_single_agent_env(env)
        self._seed = seed
        self._state = None

    def reset(self, seed: Optional[int] = None):
        seed = self._seed if seed is None else seed
        self._seed = None  # like gymnasium: seed once, then continue the stream
        state, _ = self.env.reset(seed=seed)
        self._state = np.asarray(state, dtype=np.float32)
        return split_state(self.env_name, self.obs, self._state), self._state

    def step(self, actions):
        if len(actions) != self.n_agents:
            raise MomaError(f"{self.env_name} expects {self.n_agents} per-agent actions, got {len(actions)}")
        if self.discrete:
            joint = np.array([int(np.asarray(a).reshape(-1)[0]) for a in actions])
        else:
            acts = [np.asarray(a, dtype=np.float32).reshape(d) for a, d in zip(actions, self.action_dims)]
            # The executed action is clipped to the action box (the authors' ActionClipping wrapper).
            joint = np.clip(join_actions(self.env_name, acts), -1.0, 1.0)
        state, reward, terminated, truncated, _ = self.env.step(joint)
        self._state = np.asarray(state, dtype=np.float32)
        return split_state(self.env_name, self.obs, self._state), self._state, float(reward), bool(terminated), bool(truncated)

    def set_state(self, state: np.ndarray) -> None:
        """Put the simulator in a global state (ground-truth-simulator ablation, MAIQL-ft rollouts).

        Ant: the torso x, y are not part of the state and are set to 0 (they affect nothing).
        Reacher: joint angles are recovered with atan2 from their cos/sin.
        """
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (self.state_dim,):
            raise MomaError(f"set_state expects a state of shape ({self.state_dim},), got {state.shape}")
        if self.env_name == "coordination":
            self.env.t = int(round(float(state[0]) * self.env.rounds))
        else:
            u = self.env.unwrapped
            qpos, qvel = u.data.qpos.copy(), u.data.qvel.copy()
            if self.env_name == "reacher":
                qpos[0] = np.arctan2(state[2], state[0])
                qpos[1] = np.arctan2(state[3], state[1])
                qpos[2:4] = state[4:6]
                qvel[:] = 0.0
                qvel[0:2] = state[6:8]
            else:  # ant: qpos = x, y, z, quaternion(4), 8 joints; qvel = 6 torso, 8 joints
                qpos[0:2] = 0.0
                qpos[2:] = state[0:13]
                qvel[:] = state[13:27]
            u.set_state(qpos, qvel)
        self._state = state.astype(np.float32)

    def close(self):
        self.env.close()


def make_env(env: str, obs: Optional[str] = None, seed: Optional[int] = None) -> MultiAgentEnv:
    """The multi-agent environment `env` with observation function `obs` (default: fully observable)."""
    return MultiAgentEnv(env, obs, seed)


# --------------------------------------------------------------------------------------------------
# Histories: the previous HISTORY_LEN (observation_i, action_i) pairs of the episode, oldest first,
# zero-padded at the episode start; the current observation is kept separate (docs/deviations.md §5).
# --------------------------------------------------------------------------------------------------
def history_action_features(env: str, actions_i: np.ndarray) -> np.ndarray:
    """How an agent's action enters its history: one-hot for the coordination game, else clipped."""
    if env == "coordination":
        a = np.asarray(actions_i).reshape(-1).astype(np.int64)
        return np.eye(COORDINATION_N_ACTIONS, dtype=np.float32)[a]
    return np.clip(np.asarray(actions_i, dtype=np.float32), -1.0, 1.0)


def history_dims(env: str, obs: Optional[str] = None) -> list[int]:
    act = [COORDINATION_N_ACTIONS] * 2 if env == "coordination" else action_dims(env)
    return [o + a for o, a in zip(obs_dims(env, obs), act)]


class OnlineHistory:
    """Per-agent rolling histories for `n` parallel episodes, filled exactly as the dataset ones."""

    def __init__(self, env: str, obs: Optional[str], n: int, length: int = HISTORY_LEN):
        self.env = env
        self.length = length
        self.buffers = [np.zeros((n, length, d), dtype=np.float32) for d in history_dims(env, obs)]

    def get(self) -> list[np.ndarray]:
        return self.buffers

    def push(self, observations: Sequence[np.ndarray], actions: Sequence[np.ndarray]) -> None:
        """Append (o_t, a_t) after a step, dropping the oldest pair."""
        if self.length == 0:
            return
        for buf, o, a in zip(self.buffers, observations, actions):
            buf[:, :-1] = buf[:, 1:]
            n = buf.shape[0]
            buf[:, -1] = np.concatenate(
                [np.asarray(o, dtype=np.float32).reshape(n, -1), history_action_features(self.env, a).reshape(n, -1)],
                axis=1,
            )

    def reset(self, mask: Optional[np.ndarray] = None) -> None:
        for buf in self.buffers:
            if mask is None:
                buf[:] = 0.0
            else:
                buf[mask] = 0.0


def evaluate(
    env: str,
    obs: Optional[str],
    act: Callable[[list[np.ndarray], list[np.ndarray]], list[np.ndarray]],
    n_episodes: int,
    seed: int = 10101,
    history_len: int = HISTORY_LEN,
    max_parallel: int = 100,
    return_lengths: bool = False,
    return_conventions: bool = False,
):
    """Run `n_episodes` episodes with the (greedy) joint policy `act` and return their returns
    (and, with `return_lengths`, their lengths in steps: an Ant episode that falls ends early; with
    `return_conventions`, on Reacher the arm-bend convention each agent's joint ended the episode in,
    reacher_agent_conventions of the last 10 states, [n_episodes, 2]; None on the other envs).

    `act(observations, histories)` receives per-agent batches [n, o_i] and [n, H, o_i + a_i] and
    returns per-agent actions [n, a_i] (ints [n] for the coordination game). Episodes run in
    lockstep batches of up to `max_parallel`, so the policy is queried once per step, not per env.
    Episode j is reset with seed `seed + j`, so results are reproducible.
    """
    obs = check_names(env, obs)
    returns = np.zeros(n_episodes)
    lengths = np.zeros(n_episodes, dtype=np.int64)
    n_batches = -(-n_episodes // max_parallel)
    track_states = return_conventions and env == "reacher"
    last_states = np.zeros((n_episodes, CONVENTION_STEPS, STATE_DIM[env]), dtype=np.float32) if track_states else None
    # A bar for evaluations that take a while (100 Ant episodes: up to 100k env steps, ~30 s).
    bar = progress_bar(total=n_batches * EPISODE_STEPS[env], desc=f"evaluating {n_episodes} {env} episodes",
                       leave=False, disable=True if n_episodes * EPISODE_STEPS[env] < 20_000 else None)
    for start in range(0, n_episodes, max_parallel):
        n = min(max_parallel, n_episodes - start)
        envs = [make_env(env, obs) for _ in range(n)]
        resets = [e.reset(seed=seed + start + j) for j, e in enumerate(envs)]
        per_env = [observations for observations, _ in resets]
        if track_states:  # a rolling window of each episode's last states (reset states first, 50 steps follow)
            last_states[start:start + n] = np.stack([state for _, state in resets])[:, None]
        observations = [np.stack([p[i] for p in per_env]) for i in range(N_AGENTS[env])]
        history = OnlineHistory(env, obs, n, history_len)
        alive = np.ones(n, dtype=bool)
        while alive.any():
            actions = [np.asarray(a) for a in act(observations, history.get())]
            previous = [o.copy() for o in observations]
            for j in np.flatnonzero(alive):
                o, state, r, term, trunc = envs[j].step([a[j] for a in actions])
                if track_states:
                    window = last_states[start + j]
                    window[:-1] = window[1:].copy()
                    window[-1] = state
                returns[start + j] += r
                lengths[start + j] += 1
                for i in range(len(observations)):
                    observations[i][j] = o[i]
                alive[j] = not (term or trunc)
            history.push(previous, actions)  # finished episodes keep stepping nothing; their rows are ignored
            bar.update(1)
        for e in envs:
            e.close()
    bar.close()
    out = (returns,) + ((lengths,) if return_lengths else ())
    if return_conventions:
        out += (reacher_agent_conventions(last_states) if track_states else None,)
    return out if len(out) > 1 else returns


# --------------------------------------------------------------------------------------------------
# Reacher's two conventions (the expert-mix dataset: an expert that bends its elbow counter-clockwise and its
# mirror image, clockwise). Reacher-v5's state: 0 cos θ1, 1 cos θ2, 2 sin θ1, 3 sin θ2, 4-5 target x, y,
# 6-7 θ1', θ2', 8-9 fingertip - target. Agent 0 drives the shoulder (θ1), agent 1 the elbow (θ2).
# --------------------------------------------------------------------------------------------------
CONVENTION_STEPS = 10  # a convention is read off the last states of an episode, when the fingertip is at the target


def reacher_theta2(states: np.ndarray) -> np.ndarray:
    """Elbow angle θ2 = atan2(sin θ2, cos θ2) = atan2(state[3], state[1])."""
    states = np.asarray(states)
    return np.arctan2(states[..., 3], states[..., 1])


def reacher_convention(episode_states: np.ndarray, last: int = CONVENTION_STEPS) -> np.ndarray:
    """Arm-bend convention of episodes [..., T, 10]: +1 = counter-clockwise (θ2 >= 0 near the target,
    the paper's counter-clockwise team), -1 = clockwise; decided by the mean θ2 over the last `last`
    states, when the fingertip is at the target."""
    theta2 = reacher_theta2(np.asarray(episode_states)[..., -last:, :]).mean(-1)
    return np.where(theta2 >= 0, 1, -1)


def reacher_agent_conventions(episode_states: np.ndarray, last: int = CONVENTION_STEPS) -> np.ndarray:
    """The convention each agent's joint ends an episode in, [..., 2] of +1 (counter-clockwise) / -1 (clockwise),
    from the last `last` states of episodes [..., T, 10]. A fingertip at the target has two arm poses, mirror
    images of each other about the line to the target: elbow bent counter-clockwise (θ2 > 0) with the upper arm
    clockwise of the target's direction φ (θ1 < φ), or both the other way. Agent 1 (elbow): the sign of θ2.
    Agent 0 (shoulder): +1 where the upper arm lies clockwise of the target (wrapped φ - θ1 >= 0), the side a
    counter-clockwise elbow needs. Two agents on different sides cannot reach the target together: that is the
    miscoordination the dataset's two conventions invite. (Read off the poses the agents reach, not their
    actions: no expert policy is needed, and it is defined for any policy.)"""
    s = np.asarray(episode_states)[..., -last:, :]
    theta1 = np.arctan2(s[..., 2], s[..., 0])
    target_direction = np.arctan2(s[..., 5], s[..., 4])
    upper_arm_side = np.angle(np.exp(1j * (target_direction - theta1))).mean(-1)  # wrapped to (-π, π]
    return np.stack([np.where(upper_arm_side >= 0, 1, -1), reacher_convention(s, last)], axis=-1)


def convention_summary(conventions: np.ndarray) -> dict:
    """What a summary.json keeps of reacher_agent_conventions [episodes, 2]: each episode's pair, the share of
    episodes whose two agents follow the same convention, and the shares of each convention agreed on."""
    conventions = np.asarray(conventions)
    same = conventions[:, 0] == conventions[:, 1]
    return {"agents": conventions.tolist(), "same_share": float(same.mean()),
            "both_counter_clockwise_share": float((same & (conventions[:, 0] == 1)).mean()),
            "both_clockwise_share": float((same & (conventions[:, 0] == -1)).mean())}


def normalized_score(returns, ref_min: float, ref_max: float):
    """(R - ref_min) / (ref_max - ref_min): a fraction (1.0 = expert), as the paper reports."""
    return (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
def _is_external_id(dataset: str) -> bool:
    """A full Minari id (e.g. Farama's 'mujoco/ant/medium-v0') rather than a project dataset name."""
    return "/" in dataset


def dataset_id(env: str, dataset: str) -> str:
    return dataset if _is_external_id(dataset) else f"moma/{env}/{dataset}-v0"


def dataset_path(env: str, dataset: str) -> pathlib.Path:
    """Folder of a local Minari dataset (Minari's layout: <root>/<namespace>/<name>-v<version>)."""
    return DATA_DIR / dataset_id(env, dataset)


def dataset_exists(env: str, dataset: str) -> bool:
    return (dataset_path(env, dataset) / "data" / "metadata.json").exists()


@dataclasses.dataclass
class OfflineData:
    """An offline dataset split per agent. N transitions, rows in episode order.

    Histories are stored as indices to stay small (1M Ant rows x 10 steps x 4 agents would be GBs):
    `history_index[t]` lists the H dataset rows preceding row t in its episode, oldest first, with
    the value N (a zero row of `history_table(i)`) as left padding at the episode start, so
    `history_table(i)[history_index[rows]]` is agent i's [B, H, o_i + a_i] history.
    `next_history_index[t]` is the history of the row after t: drop the oldest, append t.
    """

    env: str
    obs: str
    dataset_id: str
    states: np.ndarray  # [N, S] float32, global state s_t
    next_states: np.ndarray  # [N, S] float32, s_{t+1}
    joint_actions: np.ndarray  # [N, A] float32 (int64 for the coordination game)
    rewards: np.ndarray  # [N] float32, shared team reward
    terminals: np.ndarray  # [N] float32, 1 where s_{t+1} is absorbing (f = 0)
    timeouts: np.ndarray  # [N] float32, 1 where the episode was cut without a terminal (truncation)
    episode_ids: np.ndarray  # [N] int64
    observations: list  # per agent [N, o_i]
    next_observations: list  # per agent [N, o_i]
    actions: list  # per agent [N, a_i]
    history_index: np.ndarray  # [N, H] int64, N = padding
    next_history_index: np.ndarray  # [N, H] int64
    ref_min_score: Optional[float]
    ref_max_score: Optional[float]
    fingerprint: str = ""  # content hash of the transitions (see dataset_fingerprint)

    @property
    def n_agents(self) -> int:
        return len(self.observations)

    def __len__(self) -> int:
        return len(self.rewards)

    def history_table(self, agent: int) -> np.ndarray:
        """[N + 1, o_i + a_i]: row t is (o^i_t, a^i_t); the last row is the zero padding."""
        feats = np.concatenate(
            [self.observations[agent], history_action_features(self.env, self.actions[agent])], axis=1
        )
        return np.concatenate([feats, np.zeros((1, feats.shape[1]), dtype=np.float32)], axis=0)

    def histories(self, agent: int, rows: np.ndarray, next_: bool = False) -> np.ndarray:
        """Agent `agent`'s [B, H, o_i + a_i] histories at dataset rows `rows` (of s_{t+1} if next_)."""
        index = self.next_history_index if next_ else self.history_index
        return self.history_table(agent)[index[rows]]

    def episode_returns(self) -> np.ndarray:
        return np.bincount(self.episode_ids, weights=self.rewards.astype(np.float64))

    def normalized_score(self, returns):
        if self.ref_min_score is None or self.ref_max_score is None:
            raise MomaError(f"dataset {self.dataset_id} has no ref_min_score/ref_max_score in its metadata")
        return normalized_score(returns, self.ref_min_score, self.ref_max_score)


def build_history_index(episode_ids: np.ndarray, length: int = HISTORY_LEN) -> tuple[np.ndarray, np.ndarray]:
    """History and next-history row indices for rows sorted by episode (see OfflineData)."""
    n = len(episode_ids)
    rows = np.arange(n)
    starts = np.ones(n, dtype=bool)
    starts[1:] = episode_ids[1:] != episode_ids[:-1]
    start_row = np.maximum.accumulate(np.where(starts, rows, 0))
    position = rows - start_row  # steps since the episode start
    k = np.arange(length)
    index = rows[:, None] - length + k[None, :]
    index = np.where(k[None, :] >= length - position[:, None], index, n)
    next_index = np.concatenate([index[:, 1:], rows[:, None]], axis=1) if length > 0 else index
    return index.astype(np.int64), next_index.astype(np.int64)


def _fingerprint(arrays: dict) -> str:
    """Content hash of a flattened dataset (its transitions, not its metadata): a world model records the
    fingerprint of the data it was trained on, so a rebuilt dataset is never paired with a stale model."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for k in ("obs", "next_obs", "act", "rew", "term", "trunc", "ep"):
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def dataset_fingerprint(env: str, dataset: str) -> Optional[str]:
    """The content hash of a local dataset (None if it does not exist), read from the flattened cache when
    that is fresh, without loading the arrays."""
    if not dataset_exists(env, dataset):
        return None
    did = dataset_id(env, dataset)
    meta_file = dataset_path(env, dataset) / "data" / "metadata.json"
    cache = CACHE_DIR / "datasets" / (did.replace("/", "__") + ".npz")
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["stamp"]) == f"{meta_file.stat().st_mtime_ns}" and "fingerprint" in z.files:
                    return str(z["fingerprint"])
        except Exception:
            pass
    return str(_read_minari(env, dataset)["fingerprint"])


def _read_minari(env: str, dataset: str):
    """Flatten a local Minari dataset to arrays (cached as .npz next to the world models)."""
    import minari

    did = dataset_id(env, dataset)
    meta_file = dataset_path(env, dataset) / "data" / "metadata.json"
    cache = CACHE_DIR / "datasets" / (did.replace("/", "__") + ".npz")
    stamp = f"{meta_file.stat().st_mtime_ns}"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["stamp"]) == stamp and "fingerprint" in z.files:
                    return {k: z[k] for k in z.files}
        except Exception:
            pass  # stale or corrupt cache: rebuild it
    try:
        ds = minari.load_dataset(did, download=False)
        meta = ds.storage.metadata
        parts = {k: [] for k in ("obs", "next_obs", "act", "rew", "term", "trunc", "ep")}
        # a bar (a plain line a minute in logs) when the read takes a while: by transitions, not episodes (Ant's
        # medium set is 1,107 episodes, but 1M transitions)
        for ep in progress_bar(ds.iterate_episodes(), total=ds.total_episodes, desc=f"reading {did}", leave=False,
                               disable=None if ds.total_steps > 200_000 else True):
            o = np.asarray(ep.observations, dtype=np.float32)
            T = len(ep.rewards)
            parts["obs"].append(o[:-1])
            parts["next_obs"].append(o[1:])
            parts["act"].append(np.asarray(ep.actions).reshape(T, -1))
            parts["rew"].append(np.asarray(ep.rewards, dtype=np.float32))
            parts["term"].append(np.asarray(ep.terminations, dtype=bool))
            parts["trunc"].append(np.asarray(ep.truncations, dtype=bool))
            parts["ep"].append(np.full(T, ep.id, dtype=np.int64))
    except MomaError:
        raise
    except Exception as e:  # a corrupt dataset folder, or a file another process holds open for writing
        if isinstance(e, OSError) and "lock" in str(e).lower():  # HDF5's file lock: the data may be fine
            raise MomaError(
                f"could not read dataset {did} at {dataset_path(env, dataset)}: the file is locked by another "
                f"process ({e}); wait for it to finish (or stop it) and run again: do not delete the dataset"
            ) from e
        raise MomaError(
            f"could not read dataset {did} at {dataset_path(env, dataset)} ({type(e).__name__}: {e}); "
            f"delete that folder and rebuild it with `python envs.py --env {env} --dataset {dataset} --force`"
        ) from e
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    arrays["ref_min_score"] = np.float64(meta.get("ref_min_score", np.nan) if meta.get("ref_min_score") is not None else np.nan)
    arrays["ref_max_score"] = np.float64(meta.get("ref_max_score", np.nan) if meta.get("ref_max_score") is not None else np.nan)
    arrays["stamp"] = np.array(stamp)
    arrays["fingerprint"] = np.array(_fingerprint(arrays))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")  # per process: two first readers never share it
    np.savez(tmp, **arrays)
    os.replace(tmp, cache)
    return arrays


def load_dataset(
    env: str,
    dataset: Optional[str] = None,
    obs: Optional[str] = None,
    history_len: int = HISTORY_LEN,
    build_if_missing: bool = True,
) -> OfflineData:
    """Load (building it first if it is a missing project dataset) and split an offline dataset.

    `dataset` is a project dataset name (DATASETS[env]) or the id of a Minari dataset you have in
    your local Minari folder, e.g. Farama's 'mujoco/ant/medium-v0' (its 105-dim Ant observations are
    cut to the 27-dim state: the contact forces are dropped). Nothing is downloaded.
    """
    dataset = DEFAULT_DATASET[env] if dataset is None and env in ENVS else dataset
    obs = check_names(env, obs, dataset)
    if not dataset_exists(env, dataset):
        if _is_external_id(dataset):
            raise MomaError(
                f"Minari dataset {dataset!r} is not in {DATA_DIR}; this project never downloads. Download it "
                f"yourself (`minari download {dataset}`) with MINARI_DATASETS_PATH={DATA_DIR}, or use one of "
                f"the project datasets: {', '.join(DATASETS[env])}"
            )
        if not build_if_missing:
            raise MomaError(f"dataset {dataset_id(env, dataset)} is missing; build it with "
                            f"`python envs.py --env {env} --dataset {dataset}`")
        build_dataset(env, dataset, only_if_missing=True)
    a = _read_minari(env, dataset)
    states, next_states, joint = a["obs"], a["next_obs"], a["act"]
    if env == "ant" and states.shape[1] == 105:  # Farama's Ant-v5 default: drop the 78 contact forces
        states, next_states = states[:, :27], next_states[:, :27]
    if states.shape[1] != STATE_DIM[env] or joint.shape[1] != JOINT_ACTION_DIM[env]:
        raise MomaError(
            f"dataset {dataset_id(env, dataset)} has observations of shape {states.shape[1:]} and actions of shape "
            f"{joint.shape[1:]}, but env {env!r} has states of shape ({STATE_DIM[env]},) and joint actions of shape "
            f"({JOINT_ACTION_DIM[env]},); use a dataset recorded on {env}"
        )
    # Non-finite data trains non-finite networks whose greedy actions can still score (a NaN argmax picks the
    # first action), so it is refused here, before any training.
    for name, values in (("observations", states), ("next observations", next_states), ("actions", joint),
                         ("rewards", a["rew"])):
        bad = ~np.isfinite(np.asarray(values, dtype=np.float64))
        if bad.any():
            rows = np.flatnonzero(bad.reshape(len(bad), -1).any(1))
            raise MomaError(
                f"dataset {dataset_id(env, dataset)} has non-finite {name} in {len(rows)} transitions (first at row "
                f"{rows[0]}); rebuild it (`python envs.py --env {env} --dataset {dataset} --force`) or fix its source")
    if env == "coordination":
        joint = joint.astype(np.int64)
    else:
        joint = joint.astype(np.float32)
    terminals = a["term"].astype(np.float32)
    # A timeout is an episode end that is not absorbing: a truncation, or the end of a stored episode.
    episode_end = np.ones(len(terminals), dtype=bool)
    episode_end[:-1] = a["ep"][1:] != a["ep"][:-1]
    timeouts = ((a["trunc"] | episode_end) & ~a["term"]).astype(np.float32)
    hist, next_hist = build_history_index(a["ep"], history_len)
    ref_min, ref_max = float(a["ref_min_score"]), float(a["ref_max_score"])
    return OfflineData(
        env=env,
        obs=obs,
        dataset_id=dataset_id(env, dataset),
        states=states,
        next_states=next_states,
        joint_actions=joint,
        rewards=a["rew"].astype(np.float32),
        terminals=terminals,
        timeouts=timeouts,
        episode_ids=np.unique(a["ep"], return_inverse=True)[1].astype(np.int64),
        observations=split_state(env, obs, states),
        next_observations=split_state(env, obs, next_states),
        actions=split_actions(env, joint),
        history_index=hist,
        next_history_index=next_hist,
        ref_min_score=None if np.isnan(ref_min) else ref_min,
        ref_max_score=None if np.isnan(ref_max) else ref_max,
        fingerprint=str(a["fingerprint"]),
    )


def write_minari_dataset(
    env: str,
    dataset: str,
    episodes: Sequence[dict],
    ref_min_score: float,
    ref_max_score: float,
    algorithm_name: str,
    description: str,
) -> None:
    """Write episodes {observations [T+1, S], actions [T, A], rewards, terminations, truncations}
    as the Minari dataset moma/<env>/<dataset>-v0, atomically: a failed write leaves nothing behind."""
    import minari
    from minari.data_collector import EpisodeBuffer

    did = dataset_id(env, dataset)
    buffers = [
        EpisodeBuffer(
            id=j,
            observations=np.asarray(ep["observations"]),
            actions=np.asarray(ep["actions"]),
            rewards=list(np.asarray(ep["rewards"], dtype=np.float64)),
            terminations=list(np.asarray(ep["terminations"], dtype=bool)),
            truncations=list(np.asarray(ep["truncations"], dtype=bool)),
        )
        for j, ep in enumerate(episodes)
    ]
    if env == "coordination":
        _register_coordination()
        spec = gym.spec(COORDINATION_GYM_ID)
    else:
        spec = make_single_agent_env(env).spec
    # Written into a private staging folder, then moved into place with one rename: a reader never sees a half
    # dataset (metadata.json used to appear before the hdf5 was complete), a killed build leaves only its staging
    # folder, and a concurrent build's cleanup can never delete another process's finished dataset.
    # Named <pid>-<time>-<host>: on a cluster DATA_DIR is shared by nodes, and a pid says nothing about another
    # node's processes, so only this host's dead builds are cleaned up (another host's after a week).
    host = socket.gethostname()
    for stale in (DATA_DIR / ".staging").glob("*"):  # left by killed builds
        pid, _, rest = stale.name.partition("-")
        other_host = rest.partition("-")[2] not in ("", host)
        week_old = time.time() - stale.stat().st_mtime > 7 * 86400
        if (not other_host and not _pid_alive(int(pid))) or (other_host and week_old):
            shutil.rmtree(stale, ignore_errors=True)
    staging_root = DATA_DIR / ".staging" / f"{os.getpid()}-{time.time_ns()}-{host}"
    t0 = time.time()
    print(f"writing dataset {did}: {len(buffers)} episodes, {sum(len(b.rewards) for b in buffers)} transitions",
          flush=True)
    previous_root = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(staging_root)  # Minari reads it at every call
    try:
        with warnings.catch_warnings():  # Minari warns that eval_env defaults to the collection env: intended
            warnings.simplefilter("ignore", UserWarning)
            minari.create_dataset_from_buffers(
                did,
                buffers,
                ref_min_score=float(ref_min_score),
                ref_max_score=float(ref_max_score),
                algorithm_name=algorithm_name,
                # Metadata must be true: the project has no public address or mailbox (yet), so none is named
                # (Minari accepts None); the description names the code version that made the data.
                author="moma-ppo contributors",
                author_email=None,
                code_permalink=None,
                description=f"{description} Made by the moma-ppo repository at git commit {_git_commit()}.",
                data_format="hdf5",
                env=spec,
            )
        final = dataset_path(env, dataset)
        final.parent.mkdir(parents=True, exist_ok=True)
        retired = final.with_name(f"{final.name}.retired-{os.getpid()}-{time.time_ns()}")
        if final.exists():
            os.replace(final, retired)
        os.replace(staging_root / did, final)
        shutil.rmtree(retired, ignore_errors=True)
        print(f"wrote dataset {did} in {time.time() - t0:.0f} s", flush=True)
    finally:
        if previous_root is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous_root
        shutil.rmtree(staging_root, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_DIR, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # not a git checkout (e.g. a copied script)
        return "unknown"


def build_coordination_dataset(dataset: str, n_episodes: int = COORDINATION_EPISODES, seed: int = 0) -> None:
    """Table 1: each agent independently goes right with its behaviour probability every round."""
    p_right = np.array(COORDINATION_BEHAVIOUR[dataset])
    rng = np.random.default_rng(seed)
    R = COORDINATION_ROUNDS
    actions = (rng.random((n_episodes, R, 2)) < p_right).astype(np.int64)
    rewards = (actions[..., 0] == actions[..., 1]).astype(np.float64)
    rounds = (np.arange(R + 1, dtype=np.float32) / R)[:, None]
    truncations = np.zeros(R, dtype=bool)
    truncations[-1] = True
    episodes = [
        dict(observations=rounds, actions=actions[j], rewards=rewards[j], terminations=np.zeros(R, dtype=bool),
             truncations=truncations)
        for j in range(n_episodes)
    ]
    write_minari_dataset(
        "coordination", dataset, episodes, ref_min_score=0.0, ref_max_score=float(R),
        algorithm_name=f"iid behaviour P(a1=right)={p_right[0]}, P(a2=right)={p_right[1]}",
        description=f"Iterated Coordination Game, {dataset} dataset (paper Table 1), {n_episodes} episodes of {R} "
        f"rounds; normalised score = mean payoff per round.",
    )


@contextlib.contextmanager
def file_lock(path: pathlib.Path, waiting: str = ""):
    """An exclusive lock on `path` (fcntl, released if the process dies). If another process holds it, prints
    `waiting` (what it is doing) once and blocks until it is done."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t0 = time.time()
            print(f"waiting for another process {waiting or 'holding ' + str(path)}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
            print(f"waited {time.time() - t0:.0f} s for {path.name}", flush=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_lock(env: str, dataset: str):
    """An exclusive lock per dataset: two processes that find the same dataset missing build it once; the second
    waits, then finds it built."""
    return file_lock(DATA_DIR / ".locks" / (dataset_id(env, dataset).replace("/", "__") + ".lock"),
                     f"building dataset {dataset_id(env, dataset)}")


def build_dataset(env: str, dataset: str, n_transitions: Optional[int] = None, seed: int = 0,
                  only_if_missing: bool = False) -> None:
    """Generate the project dataset `dataset` of `env` locally (overwriting it; with only_if_missing, unless another
    process built it while this one waited for the lock)."""
    check_names(env, None, dataset)
    if _is_external_id(dataset):
        raise MomaError(f"{dataset!r} is an external Minari id; only project datasets can be built here")
    if env != "coordination":
        _build_mujoco_dataset(env, dataset, n_transitions, seed, only_if_missing)
        return
    with _build_lock(env, dataset):
        if only_if_missing and dataset_exists(env, dataset):
            return
        n_episodes = COORDINATION_EPISODES if n_transitions is None else max(1, n_transitions // COORDINATION_ROUNDS)
        build_coordination_dataset(dataset, n_episodes, seed)


def _build_mujoco_dataset(env: str, dataset: str, n_transitions: Optional[int], seed: int,
                          only_if_missing: bool) -> None:
    """MuJoCo datasets come from the shipped behaviour policies (docs/deviations.md §4): `make_datasets.py build`,
    run as a program of its own, builds one under the same per-dataset lock (its progress lines show here). A
    subprocess, not an import: the generator imports envs, and envs never imports it back."""
    import subprocess

    script = REPO_DIR / "make_datasets.py"
    if not script.exists():
        raise MomaError(f"dataset {dataset_id(env, dataset)} is missing and this checkout has no MuJoCo dataset "
                        f"generator (make_datasets.py); place a Minari dataset with that id under {DATA_DIR}")
    command = [_sys.executable, str(script), "build", "--only", f"{env}/{dataset}", "--seed", str(seed)]
    command += ["--n-transitions", str(n_transitions)] if n_transitions is not None else []
    command += ["--if-missing"] if only_if_missing else []
    paths = {"MINARI_DATASETS_PATH": str(DATA_DIR), "MOMA_CACHE_DIR": str(CACHE_DIR)}  # this process's folders
    done = subprocess.run(command, cwd=REPO_DIR, env={**os.environ, **paths})
    if done.returncode != 0:
        raise MomaError(f"building dataset {dataset_id(env, dataset)} failed (exit status {done.returncode}, its "
                        f"error is above); the command was: {_shlex.join(command)}")


def dataset_stats(env: str, dataset: str) -> dict:
    """Table-2-style statistics of a dataset: normalised episode scores (%) and sizes."""
    data = load_dataset(env, dataset)
    returns = data.episode_returns()
    stats = dict(dataset=data.dataset_id, episodes=len(returns), transitions=len(data),
                 ref_min_score=data.ref_min_score, ref_max_score=data.ref_max_score,
                 mean_return=float(returns.mean()), terminated_episodes=int(data.terminals.sum()),
                 fingerprint=data.fingerprint)
    if data.ref_min_score is not None and data.ref_max_score is not None:
        scores = 100 * data.normalized_score(returns)
        stats.update({f"{k}_score_pct": float(f(scores)) for k, f in
                      (("min", np.min), ("mean", np.mean), ("median", np.median), ("max", np.max))})
    return stats


@dataclasses.dataclass
class Args:
    """Build (or rebuild) project datasets and print their statistics."""

    env: EnvName = "coordination"
    dataset: str = "all"
    """a dataset name of the env, or 'all'"""
    n_transitions: Optional[int] = None
    """dataset size (default: the paper's)"""
    seed: int = 0
    force: bool = False
    """rebuild even if the dataset exists"""


def main(args: Args) -> None:
    if args.n_transitions is not None and args.n_transitions < 1:
        raise MomaError(f"--n-transitions must be an integer >= 1, got {args.n_transitions} (omit it for the paper's size)")
    if args.seed < 0:
        raise MomaError(f"--seed must be an integer >= 0, got {args.seed}")
    names = DATASETS[args.env] if args.dataset == "all" else (args.dataset,)
    for name in names:
        check_names(args.env, None, name)
        if args.force or not dataset_exists(args.env, name):
            build_dataset(args.env, name, args.n_transitions, args.seed)
        print(dataset_stats(args.env, name))



# ==================================================================================================
# Run records (results/, docs/reproduction.md). Every algorithm script writes, next to its summary.json, the
# evaluation curve (curve.csv, appended as evaluations happen) and the exact command (command.txt), and
# stamps its summary with the code and dataset fingerprints; with --results-dir it copies that small
# record (kilobytes, no checkpoints) to <results-dir>/<env>__<obs>__<dataset>__<algorithm>__<seed>/,
# which is committed. results.py builds docs/results.md and the plots from those records only.
# ==================================================================================================
import csv as _csv
import hashlib as _hashlib
import json as _json
import shlex as _shlex
import sys as _sys

RECORD_FILES = ("summary.json", "curve.csv", "command.txt")
# Copied into the record too where a script writes them: MOMA-PPO's per-iteration rollout and loss statistics
# (training.csv), which the diagnosis reads (rollout lengths, uncertainty cuts, terminals, in-training episode lengths).
RECORD_OPTIONAL_FILES = ("training.csv",)
CURVE_COLUMNS = ("step", "samples", "wall_time_s", "normalized_score", "episodes")
# The files a run's result depends on (besides the dataset): a record is stale when any of them changed.
# Every script imports envs.py; moma_ppo.py also trains / loads its world model with world_model.py.
def file_hash(path) -> str:
    """Short hash (sha256, 16 hex digits) of what a file *does*: for Python, its syntax tree without docstrings and
    help strings, so edits to comments, docs or layout do not make the records made with it stale; code changes do."""
    import ast

    path = pathlib.Path(path)
    text = path.read_bytes()
    if path.suffix == ".py":
        try:
            tree = ast.parse(text)
        except SyntaxError:
            return _hashlib.sha256(text).hexdigest()[:16]
        for node in ast.walk(tree):  # drop bare string statements: docstrings and tyro's field help texts
            for field in ("body", "orelse", "finalbody"):
                body = getattr(node, field, None)
                if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                    kept = [b for b in body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                                                    and isinstance(b.value.value, str))]
                    setattr(node, field, kept or [ast.Pass()])
        text = ast.dump(tree, include_attributes=False).encode()
    return _hashlib.sha256(text).hexdigest()[:16]


def code_fingerprint(script, extra: Sequence[str] = ()) -> dict:
    """{file: content hash} of the code a run of `script` depends on: the script (its path, e.g. its __file__, or
    a file name in the repository such as 'iql.py'), the repository modules it imports besides envs.py (`extra`,
    e.g. moma_ppo.py's world_model.py: named by the script itself, so a renamed copy keeps them) and envs.py."""
    script = pathlib.Path(script)
    files = (script.name, *extra, "envs.py")
    paths = {script.name: script if script.is_absolute() else REPO_DIR / script}
    return {name: file_hash(paths.get(name, REPO_DIR / name)) for name in files}


def record_name(env: str, obs: str, dataset: str, algorithm: str, seed: int) -> str:
    """The folder name of one table cell's record (and of its run under run_all.sh)."""
    return f"{env}__{obs}__{dataset.replace('/', '_')}__{algorithm}__{seed}"


def write_command(run_dir, resume: bool) -> None:
    """command.txt: the exact command line, shell-quoted; a resumed run appends its own line under the first."""
    line = _shlex.join(["python"] + _sys.argv) + "\n"
    path = pathlib.Path(run_dir) / "command.txt"
    if resume and path.exists():
        with open(path, "a") as f:
            f.write(line)
    else:
        path.write_text(line)


class CurveLog:
    """curve.csv of a run: one row per greedy evaluation (CURVE_COLUMNS), written out as it happens.

    step = iteration (MOMA-PPO) or gradient step; samples = synthetic steps (MOMA-PPO) or gradient steps x batch
    size; wall_time_s = training wall time so far (resumes included); episodes = greedy episodes averaged. On
    resume the rows after the checkpoint's step are dropped: they came from the part of the run that was lost
    and is trained again. A step appears once: a second row at the same step (the 100-episode final evaluation
    after a 10-episode one, or a final evaluation redone after a crash) replaces the first.
    """

    def __init__(self, run_dir, resume_step: Optional[int] = None):
        self.path = pathlib.Path(run_dir) / "curve.csv"
        self.rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [[r.get(c, "") for c in CURVE_COLUMNS] for r in _csv.DictReader(f)
                             if int(float(r["step"])) <= resume_step]
        self._write()

    def add(self, step: int, samples: int, wall_time_s: float, normalized_score: float, episodes: int) -> None:
        self.rows = [r for r in self.rows if int(float(r[0])) != int(step)]
        self.rows.append([int(step), int(samples), f"{wall_time_s:.1f}", f"{float(normalized_score):.6g}", int(episodes)])
        self._write()

    def _write(self) -> None:  # kilobytes: rewriting the whole file keeps it whole if the run is killed mid-write
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", newline="") as f:
                writer = _csv.writer(f)
                writer.writerow(getattr(self, "columns", CURVE_COLUMNS))
                writer.writerows(self.rows)
            os.replace(tmp, self.path)
        except OSError as e:  # a full disk: a clear error, no half file
            tmp.unlink(missing_ok=True)
            raise MomaError(f"could not write {self.path} ({e.strerror}); free some disk space and continue with "
                            f"--resume") from None


class TableLog:
    """A CSV of one row per training step (e.g. MOMA-PPO's training.csv), rewritten whole at each row like
    CurveLog, so a killed run leaves a whole file; on resume the rows after the checkpoint's step are dropped."""

    def __init__(self, path, columns: tuple, resume_step: Optional[int] = None):
        self.path, self.columns, self.rows = pathlib.Path(path), tuple(columns), []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                self.rows = [[r.get(c, "") for c in self.columns] for r in _csv.DictReader(f)
                             if int(float(r[self.columns[0]])) <= resume_step]
        CurveLog._write(self)

    def add(self, row: dict) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ValueError(f"{self.path.name}: unknown columns {sorted(unknown)}")
        fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else v  # noqa: E731
        self.rows = [r for r in self.rows if int(float(r[0])) != int(row[self.columns[0]])]
        self.rows.append([fmt(row.get(c, "")) for c in self.columns])
        CurveLog._write(self)


# Columns every critic-based script (iql, maiql, icql, itd3bc, omar) writes to its training.csv every 1000 steps.
CRITIC_COLUMNS = ("step", "td_loss", "value_mean")


class CriticLog(TableLog):
    """training.csv of a script with a learned critic, and the verdict on whether that critic diverged.

    Offline Q-learning with function approximation can diverge (bootstrapping + off-policy data + a neural net:
    the "deadly triad"); its losses then grow geometrically while the policy keeps acting on the diverged
    critic's advantages, and its score is not that of the method (MAIQL on Ant, docs/diagnosis.md). The verdict
    needs no tuned threshold: on the critic's own training data, no return exceeds value_bound = max|r| / (1 - γ)
    in magnitude, so a critic whose mean value on a minibatch of dataset (s, a) exceeds it, or whose squared TD
    error exceeds (2 value_bound)² per term, estimates nothing that any reward sequence could produce. Such a run
    keeps its record (the evidence) with `critic_diverged` set, and results.py never averages it into a table.
    """

    def __init__(self, run_dir, rewards, gamma: float, td_terms: int, extra_columns: tuple = (),
                 resume_step: Optional[int] = None):
        r_max = float(np.abs(np.asarray(rewards, dtype=np.float64)).max()) if np.asarray(rewards).size else 0.0
        self.value_bound = r_max / (1.0 - gamma) if gamma < 1.0 else float("inf")
        self.td_bound = td_terms * (2.0 * self.value_bound) ** 2  # td_terms: how many mean squared errors the loss sums
        super().__init__(pathlib.Path(run_dir) / "training.csv", CRITIC_COLUMNS + tuple(extra_columns), resume_step)

    def add(self, step: int, td_loss, value_mean, **extra) -> None:
        """Every 1000 steps: the critic's TD loss and its mean value on the minibatch's dataset actions."""
        super().add(dict(step=int(step), td_loss=float(td_loss), value_mean=float(value_mean),
                         **{k: float(v) for k, v in extra.items()}))

    def diverged(self) -> Optional[dict]:
        """The first logged step at which the critic left the bounds, or None."""
        return critic_divergence([float(r[0]) for r in self.rows], [float(r[1]) for r in self.rows],
                                 [float(r[2]) if r[2] != "" else float("nan") for r in self.rows],
                                 self.value_bound, self.td_bound)

    def record_fields(self) -> dict:
        return {"critic_value_bound": self.value_bound, "critic_diverged": self.diverged()}


def critic_divergence(steps, td_losses, value_means, value_bound: float, td_bound: float) -> Optional[dict]:
    """CriticLog's verdict on logged (step, td_loss, value_mean) rows: the first row whose |value_mean| exceeds
    value_bound or whose td_loss exceeds td_bound, as a dict saying which, else None (NaN values are not read as a
    verdict: check_losses stops a run with a non-finite loss before any summary)."""
    for step, td, value in zip(steps, td_losses, value_means):
        why = []
        if abs(value) > value_bound:
            why.append(f"mean value {value:.4g} beyond ±{value_bound:.4g} = max|r| / (1 - γ)")
        if td > td_bound:
            why.append(f"TD loss {td:.4g} above {td_bound:.4g}, what values within that bound allow")
        if why:
            return {"step": int(step), "td_loss": float(td), "value_mean": float(value) if value == value else None,
                    "reason": "; ".join(why)}
    return None


def record_fields(code: dict, data: "OfflineData", budget: Optional[str], episode_lengths, conventions=None) -> dict:
    """What a summary.json needs besides the scores to be checked later: budget, fingerprints (`code` from
    code_fingerprint, taken when the run started), episode lengths, and on Reacher each greedy episode's agent
    conventions (evaluate's `return_conventions`: the mechanism of Table 4a, measured)."""
    fields = {"budget": budget, "dataset_fingerprint": data.fingerprint, "code_fingerprint": code,
              "episode_lengths": [int(x) for x in episode_lengths]}
    if conventions is not None:
        fields["conventions"] = convention_summary(conventions)
    return fields


def check_results_dir(results_dir: Optional[str], name: str, budget: Optional[str]) -> None:
    """Called before training and before the run folder is made: refuse a --results-dir that is a file or cannot be
    written (else the record is lost after hours of training), and say now if the record this run will write
    replaces one made at another budget (git keeps the old one; the tables never mix budgets)."""
    if results_dir is None:
        return
    folder = pathlib.Path(results_dir)
    if folder.exists() and not folder.is_dir():
        raise MomaError(f"--results-dir {folder} is a file, not a folder; give a folder (e.g. --results-dir results/4b)")
    place = _existing_ancestor(folder)
    if not place.is_dir():
        raise MomaError(f"--results-dir {folder}: {place} is a file, so no folder can be made there; "
                        f"choose another --results-dir")
    try:  # a real write, as check_run_dir: the record is copied there only after training
        with _tempfile.TemporaryFile(dir=place):
            pass
    except OSError as e:
        raise MomaError(f"--results-dir {folder}: cannot write in {place} ({e.strerror}); "
                        f"choose a writable --results-dir") from None
    old = folder / name / "summary.json"
    if old.exists():
        try:
            old_budget = _json.loads(old.read_text()).get("budget")
        except (OSError, ValueError):
            old_budget = "unreadable"
        if old_budget != budget:
            print(f"note: {old.parent} holds a record at budget {old_budget!r}; this run (budget {budget!r}) "
                  f"will replace it when it finishes")


def save_record(run_dir, results_dir, name: str) -> pathlib.Path:
    """Copy the run's small record (RECORD_FILES) to <results_dir>/<name>/, replacing that folder whole."""
    run_dir, dest = pathlib.Path(run_dir), pathlib.Path(results_dir) / name
    missing = [f for f in RECORD_FILES if not (run_dir / f).exists()]
    if missing:
        raise MomaError(f"{run_dir} has no {', '.join(missing)}: not a finished run, nothing to record")
    tmp = _unique_tmp(dest)  # two processes recording the same cell never share (and delete) one staging folder
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in RECORD_FILES + tuple(f for f in RECORD_OPTIONAL_FILES if (run_dir / f).exists()):
        shutil.copy2(run_dir / f, tmp / f)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


# ==================================================================================================
# Run safety (docs/usage.md, "Run safety"): every algorithm script validates its arguments before any work,
# refuses to resume a checkpoint of another configuration, stops on non-finite losses or weights before a summary
# is written, checks the free disk space before training, and writes its files atomically under names no other
# process uses.
# ==================================================================================================
import math as _math
import tempfile as _tempfile

# Fields that may differ between a run and its --resume: where the run lives and reports, how fast it runs, and
# how it is evaluated (greedy evaluations use their own env seeds and no training RNG, so they change nothing that
# is learned). The training length (--iterations / --total-steps) may change too, to extend a run, but never to
# below what the checkpoint already trained. Every other field defines the run and must match.
RESUME_MAY_CHANGE = frozenset({"run_dir", "resume", "results_dir", "budget", "exp_name", "torch_threads", "cuda",
                               "eval_every", "eval_episodes", "eval_episodes_during", "checkpoint_every",
                               "cross_play_with"})
MIN_FREE_BYTES = 50 * 2**20  # free space a run needs at least (checkpoints, TensorBoard events, records)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def per_env_default(presets: dict, key: str):
    """tyro marker of an Args field that defaults to None and is filled per env from a `PRESETS` table (the script's
    resolve()): `--help` shows the table's values, e.g. "(default per env: coordination 1, reacher 10, ant 10)".
    Use: `rollout_horizon: Annotated[Optional[int], envs.per_env_default(PRESETS, "rollout_horizon")] = None`."""
    import tyro

    shown = ", ".join(f"{env} {p[key]:g}" if isinstance(p[key], float) else f"{env} {p[key]}"
                      for env, p in presets.items())
    return tyro.conf.arg(help_behavior_hint=f"(default per env: {shown})")


def check_args(args, *, at_least_one=(), non_negative=(), positive=(), finite=(), between=None, examples=None) -> None:
    """Validate arguments right after parsing, before any folder or data is touched (MomaError naming the flag and a
    valid value). at_least_one: counts >= 1; non_negative: numbers >= 0; positive: finite numbers > 0; finite: any
    finite number; between: {name: (low, high)}, inclusive. Fields that are None (filled in later) are skipped.
    Every script also gets: --seed >= 0, --torch-threads >= 1 and a usable --run-dir."""
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    examples = {**{k: v for k, v in defaults.items() if v is not None and v is not dataclasses.MISSING}, **(examples or {})}
    rules = [(n, "an integer >= 1", lambda v: v >= 1) for n in at_least_one]
    rules += [(n, "a number >= 0", lambda v: _math.isfinite(v) and v >= 0) for n in non_negative]
    rules += [(n, "a finite number > 0", lambda v: _math.isfinite(v) and v > 0) for n in positive]
    rules += [(n, "a finite number", _math.isfinite) for n in finite]
    rules += [(n, f"a number in [{lo:g}, {hi:g}]", lambda v, lo=lo, hi=hi: lo <= v <= hi)
              for n, (lo, hi) in (between or {}).items()]
    rules += [("seed", "an integer >= 0", lambda v: v >= 0), ("torch_threads", "an integer >= 1", lambda v: v >= 1)]
    for name, requirement, ok in rules:
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        if not ok(value):
            example = examples.get(name)
            hint = f" (e.g. {_flag(name)} {example:g})" if isinstance(example, (int, float)) and ok(example) else ""
            raise MomaError(f"{_flag(name)} must be {requirement}, got {value!r}{hint}")
    if getattr(args, "resume", False) and getattr(args, "run_dir", None) is None:
        raise MomaError("--resume needs --run-dir <the run folder to continue>")
    if getattr(args, "run_dir", None) is not None:
        check_run_dir(pathlib.Path(args.run_dir))


def _existing_ancestor(path: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def check_run_dir(run_dir: pathlib.Path) -> None:
    """The run folder is a folder (or can become one) that this process can write in: said now, not after training."""
    if run_dir.exists() and not run_dir.is_dir():
        raise MomaError(f"--run-dir {run_dir} is a file, not a folder; give a folder (e.g. --run-dir runs/my_run)")
    place = _existing_ancestor(run_dir)
    if not place.is_dir():
        raise MomaError(f"--run-dir {run_dir}: {place} is a file, so no folder can be made there; choose another --run-dir")
    try:  # a real write: os.access says yes to root in a read-only folder, and knows nothing of read-only mounts
        with _tempfile.TemporaryFile(dir=place):
            pass
    except OSError as e:
        raise MomaError(f"--run-dir {run_dir}: cannot write in {place} ({e.strerror}); choose a writable --run-dir") from None


def default_run_dir(env: str, obs: str, dataset: str, exp_name: str, seed: int, base="runs") -> pathlib.Path:
    """The run folder of every script when no --run-dir is given (CleanRL's runs/<run name>):
    <base>/<env>__<obs>__<dataset>__<exp_name>__<seed>__<unix time in µs>_<pid>, the record's name (record_name)
    plus a stamp, so that two runs started in the same second (or µs) never share a folder."""
    return pathlib.Path(base) / f"{record_name(env, obs, dataset, exp_name, seed)}__{time.time_ns() // 1000}_{os.getpid()}"


def make_run_dir(run_dir: pathlib.Path, given: bool) -> None:
    """Create the run folder, only once the arguments, the checkpoint and the data are known to be good (so an error
    leaves no empty folder). A default folder must be new: another process never shares it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=given)
    except FileExistsError:
        raise MomaError(f"run folder {run_dir} already exists (another run started at the same moment?); "
                        f"start again or give --run-dir") from None
    except OSError as e:
        raise MomaError(f"cannot create the run folder {run_dir} ({e.strerror}); choose another --run-dir") from None
    for stale in run_dir.glob("*.*.tmp"):  # half-written files of killed processes (named <file>.<pid>.tmp)
        pid = stale.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


def load_checkpoint(path: pathlib.Path, device="cpu") -> dict:
    """torch.load with a clear error for a corrupt, truncated or foreign file."""
    import torch

    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        if not isinstance(ck, dict) or "args" not in ck:
            raise ValueError("not a checkpoint of this project (no recorded configuration)")
        return ck
    except Exception as e:
        raise MomaError(f"checkpoint {path} is corrupt or not a checkpoint of this script ({type(e).__name__}: "
                        f"{str(e)[:200]}); start a new run without --resume (or in another --run-dir)") from None


def check_resume(saved: dict, current: dict, length_field: str, done: int, current_length: int) -> None:
    """--resume continues the run the checkpoint recorded, never another one: every field outside RESUME_MAY_CHANGE
    must be equal (the error names each difference), and the training length may only grow."""
    defaults_missing = object()
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_MAY_CHANGE or key == length_field:
            continue
        old, new = saved.get(key, defaults_missing), current.get(key, defaults_missing)
        if old is defaults_missing or new is defaults_missing:  # a flag the script gained or lost since the checkpoint
            continue
        if old != new and not (isinstance(old, float) and isinstance(new, float) and _math.isnan(old) and _math.isnan(new)):
            diffs.append(f"{_flag(key)} {old!r} in the checkpoint, {new!r} now")
    if diffs:
        raise MomaError("--resume would continue a run of another configuration: " + "; ".join(diffs) +
                        ". Resume with the run's own flags (its command.txt), or start a new run in another --run-dir")
    if current_length < done:
        raise MomaError(f"the checkpoint is at {_flag(length_field)[2:]} {done} already; {_flag(length_field)} "
                        f"{current_length} would end before it: give {_flag(length_field)} >= {done} (a larger value "
                        f"extends the run)")


def check_losses(step: int, **losses) -> None:
    """A non-finite loss means the networks are (or are about to be) non-finite: stop before any summary."""
    for name, value in losses.items():
        value = float(value.detach()) if hasattr(value, "detach") else float(value)
        if not _math.isfinite(value):
            raise MomaError(f"training diverged: {name} is {value} at step {step}; no summary was written. Likely "
                            f"causes: a learning rate too high (--learning-rate), extreme rewards or an extreme "
                            f"hyper-parameter; the run folder keeps the last good checkpoint")


def check_weights(step: int, *modules, what: str = "training produced") -> None:
    """Every parameter and buffer finite (before a checkpoint and before the final evaluation): a NaN policy can
    still score (a NaN argmax picks the first action), so it must never reach a summary."""
    import torch

    for module in modules:
        if module is None:
            continue
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise MomaError(f"{what} non-finite weights ({name}) at step {step}; no summary was "
                                f"written. Likely causes: a learning rate too high (--learning-rate), extreme rewards "
                                f"or an extreme hyper-parameter; start a new run with other settings")


def tensor_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in list(m.parameters()) + list(m.buffers()))


def check_free_space(run_dir: pathlib.Path, checkpoint_bytes: int) -> None:
    """Fail at once, not at the first checkpoint: the disk of the run folder must hold three checkpoints (the
    checkpoint, its temporary copy, some slack), and at least MIN_FREE_BYTES."""
    needed = max(MIN_FREE_BYTES, 3 * int(checkpoint_bytes))
    free = shutil.disk_usage(_existing_ancestor(run_dir)).free
    if free < needed:
        raise MomaError(f"only {free / 2**20:.0f} MB free on the disk of {run_dir}; this run needs about "
                        f"{needed / 2**20:.0f} MB (checkpoints, logs); free some space or choose another --run-dir")


def _unique_tmp(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def save_checkpoint(obj: dict, path: pathlib.Path) -> None:
    """Atomic torch.save under a name no other process uses; if the write fails (a full disk), the partial file is
    removed and the previous checkpoint stays as it was."""
    import torch

    tmp = _unique_tmp(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as RuntimeError ("unexpected pos")
        tmp.unlink(missing_ok=True)
        raise MomaError(f"could not write the checkpoint {path} ({type(e).__name__}: {e}); the previous checkpoint "
                        f"is intact: free some disk space and continue with --resume") from None


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    tmp = _unique_tmp(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MomaError(f"could not write {path} ({e.strerror}); free some disk space and continue with --resume") from None


def write_summary(run_dir, summary: dict) -> None:
    """summary.json, atomically, and only for a score that exists: a summary with non-finite scores is refused."""
    scores = [summary["normalized_score_mean"], summary["normalized_score_std"], *summary["episode_returns"]]
    if not all(_math.isfinite(float(s)) for s in scores):
        raise MomaError(f"the final evaluation gave non-finite returns ({summary['normalized_score_mean']}); "
                        f"no summary was written")
    write_text_atomic(pathlib.Path(run_dir) / "summary.json", _json.dumps(_strict_json(summary), indent=1, allow_nan=False))


def _strict_json(value):
    """A summary is strict JSON (readable by any parser, not only Python's): a non-finite setting such as the
    coordination game's uncertainty_threshold = inf (no cut) is written as the string "inf"."""
    if isinstance(value, float) and not _math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value



# ==================================================================================================
# Cross-play (Table 4a's strategy-agreement problem made visible; the authors' evaluation code had it, off by
# default): a team stitched from the agents of two finished runs of the same method and task, e.g. two seeds.
# Self-play scores a run's own team. If each seed settled on a convention of its own, teams stitched across seeds
# fail even where every self-play score is high; if all seeds agree on one convention, cross-play matches
# self-play. Every script takes `--cross-play-with RUN_DIR ...`: after its final evaluation (or at once, for a
# finished run resumed with --resume) it plays its agents with each partner's and writes cross_play.json to its
# run folder and <results-dir>/crossplay/<record>.json.
# ==================================================================================================
def stitch_teams(own_act: Callable, partner_act: Callable, n_agents: int) -> Callable:
    """The act() of a mixed team: agent i acts as in `own_act` for even i and as in `partner_act` for odd i
    (Reacher: this run's shoulder, the partner's elbow; Ant: legs 0 and 2 from this run, 1 and 3 from the partner).
    Exact for every method here: at execution each agent acts on its own observation and history only
    (decentralised execution; IQL's centralised actor is split into its agents' parts the same way)."""
    def act(observations, histories):
        own, partner = own_act(observations, histories), partner_act(observations, histories)
        return [own[i] if i % 2 == 0 else partner[i] for i in range(n_agents)]
    return act


def check_cross_play_partners(partners: Sequence[str], run_dir: pathlib.Path) -> list[pathlib.Path]:
    """Before any training: every --cross-play-with path is another run's folder holding a checkpoint.pt."""
    folders = []
    for path in partners:
        folder = pathlib.Path(path)
        folder = folder.parent if folder.name == "checkpoint.pt" else folder
        if not (folder / "checkpoint.pt").exists():
            raise MomaError(f"--cross-play-with {path}: no checkpoint.pt there; give the run folder of another "
                            f"finished run of the same method and task (e.g. another seed's)")
        if folder.resolve() == pathlib.Path(run_dir).resolve():
            raise MomaError(f"--cross-play-with {path} is this run itself; its own team is the self-play score: "
                            f"give other runs' folders")
        folders.append(folder)
    if len({f.resolve() for f in folders}) != len(folders):
        raise MomaError(f"--cross-play-with names a run twice ({', '.join(map(str, partners))})")
    return folders


def load_team(agents, checkpoint: dict, key: str = "agents"):
    """A copy of the script's `agents` module holding a partner checkpoint's weights (for cross-play)."""
    import copy

    team = copy.deepcopy(agents)
    try:
        team.load_state_dict(checkpoint[key])
    except Exception as e:
        raise MomaError(f"a --cross-play-with partner's networks do not fit this run's ({type(e).__name__}: "
                        f"{str(e)[:200]}); cross-play runs of the same configuration (e.g. other seeds)") from None
    return team


def cross_play(*, run_dir, partners: Sequence[str], method: str, env: str, obs: str, data: "OfflineData",
               own_act: Callable, eval_obs: Optional[str] = None, partner_act: Callable[[dict], Callable], n_episodes: int, seed: int,
               history_len: int, record: str, results_dir: Optional[str], budget: Optional[str], code: dict,
               device="cpu") -> dict:
    """Play this (finished) run's agents with each partner run's (stitch_teams) for `n_episodes` greedy episodes
    with the final evaluation's env seeds, and write the report. `partner_act(checkpoint)` is the script's own
    greedy act() rebuilt from a partner's checkpoint. A partner must be finished (its summary.json) and be a run of
    the same method, env, observation function and dataset; anything else is refused with the reason. `eval_obs`:
    the observation function the teams play under, if not `obs` (IQL's centralised actor plays all-observant)."""
    run_dir = pathlib.Path(run_dir)
    own = _json.loads((run_dir / "summary.json").read_text())
    report_partners = []
    for folder in check_cross_play_partners(partners, run_dir):
        summary_path = folder / "summary.json"
        if not summary_path.exists():
            raise MomaError(f"--cross-play-with {folder}: that run has not finished (no summary.json); let it finish "
                            f"(or --resume it), then cross-play again")
        theirs = _json.loads(summary_path.read_text())
        ours = dict(method=method, env=env, obs=obs, dataset_fingerprint=data.fingerprint)
        differ = [f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items() if theirs.get(k) != v]
        if differ:
            raise MomaError(f"--cross-play-with {folder} is a run of another task or method ({'; '.join(differ)}); "
                            f"cross-play stitches runs of the same method on the same task and dataset")
        act = stitch_teams(own_act, partner_act(load_checkpoint(folder / "checkpoint.pt", device)), N_AGENTS[env])
        returns, lengths, conventions = evaluate(env, eval_obs or obs, act, n_episodes, seed=seed,
                                                 history_len=history_len, return_lengths=True, return_conventions=True)
        scores = data.normalized_score(returns)
        if not np.all(np.isfinite(scores)):
            raise MomaError(f"cross-play with {folder} gave non-finite returns; nothing was written")
        entry = dict(partner_run=str(folder), partner_seed=theirs.get("seed"),
                     partner_self_play_score=theirs["normalized_score_mean"],
                     normalized_score_mean=float(scores.mean()), normalized_score_std=float(scores.std()),
                     episode_returns=returns.tolist(), episode_lengths=[int(x) for x in lengths])
        if conventions is not None:
            entry["conventions"] = convention_summary(conventions)
        report_partners.append(entry)
        print(f"cross-play {record} with seed {theirs.get('seed')}: {scores.mean():.3f} +- {scores.std():.3f} "
              f"(self-play {own['normalized_score_mean']:.3f} and {theirs['normalized_score_mean']:.3f})")
    report = dict(method=method, env=env, obs=obs, dataset_id=data.dataset_id, dataset_fingerprint=data.fingerprint,
                  seed=own.get("seed"), budget=budget, eval_episodes=n_episodes, eval_seed=seed,
                  stitching="agent i from this run for even i, from the partner for odd i",
                  self_play=dict(normalized_score_mean=own["normalized_score_mean"],
                                 conventions=own.get("conventions")),
                  partners=report_partners,
                  cross_play_score_mean=float(np.mean([p["normalized_score_mean"] for p in report_partners])),
                  code_fingerprint=code)
    text = _json.dumps(report, indent=1)
    write_text_atomic(run_dir / "cross_play.json", text)
    if results_dir is not None:
        dest = pathlib.Path(results_dir) / "crossplay" / f"{record}.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(dest, text)
        print(f"cross-play record: {dest}")
    return report


# Last, so that `python envs.py` finds every definition above (the locks and records come after Args).
if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except MomaError as e:
        raise SystemExit(f"error: {e}")
