"""Probes of a Reacher MOMA-PPO checkpoint in the real simulator, for Table 4a's leader-only gap (docs/diagnosis.md).

    python bench/diagnose_reacher.py reach RUN_DIR [RUN_DIR ...]   # where the return goes: distance, control, the elbow
    python bench/diagnose_reacher.py dataset                         # the same figures for the expert-mix dataset
    python bench/diagnose_reacher.py radius-info RUN_DIR             # how well agent 1's inputs predict the target radius

`reach` reads MOMA-PPO run folders and ITD3+BC / MATD3+BC ones (itd3bc.py, with or without --mixer). It plays the
final evaluation's 100 greedy episodes (same seeds as the scripts' final evaluation) and splits
each episode's return into its distance and control terms; over the last 10 steps it splits the fingertip's
distance to the target into a radial part (|fingertip radius - target radius|: set only by the elbow θ2, i.e. by
agent 1) and the rest, and compares the elbow angle the team ends with to the one the target's radius needs
(θ2* from the arm's two link lengths, with the sign of the convention the team chose). A follower that cannot
infer the target's radius ends with θ2 shrunk towards its average: the regression slope of |θ2| on |θ2*| below 1.

`radius-info` measures the information bound behind that: an MLP regressor from everything agent 1's policy reads at
step t (its observation and 10-step history) to θ2* (set by the target's radius), fitted on 80% of 1,000 greedy episodes of the
team (or of dataset episodes) and scored by R² on the other 20%, per step t.

`--oracle-elbow` replaces agent 1 by a PD controller to θ2* (it sees the target, which no leader-only follower
does) while agent 0 keeps its policy: what the leader reaches when the elbow is right.
"""

import dataclasses
import pathlib
import sys
from typing import Literal

import numpy as np
import torch
import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import moma_ppo  # noqa: E402
import results  # noqa: E402
from diagnose_moma_ppo import load_agents  # noqa: E402  (bench/ is this script's folder, first on sys.path)

# Reacher-v5's arm (reacher.xml): upper arm 0.1, forearm 0.1 + fingertip 0.01; state layout in envs.py
UPPER_ARM, FOREARM = 0.1, 0.11


@dataclasses.dataclass
class ProbeArgs:
    probe: tyro.conf.Positional[Literal["reach", "dataset", "radius-info"]]
    run_dirs: tyro.conf.Positional[tuple[str, ...]] = ()
    episodes: int = 100
    oracle_elbow: bool = False
    """agent 1 becomes a PD controller to the elbow angle the target's radius needs (see the module docstring)"""
    oracle_gain: float = 2.0
    """PD controller: action = gain * (θ2* - θ2) - 0.1 * gain * θ2', clipped to [-1, 1]"""


def needed_elbow(states: np.ndarray, convention: np.ndarray) -> np.ndarray:
    """θ2* whose fingertip radius equals the target's (law of cosines), signed by the convention (+1 ccw, -1 cw)."""
    r = np.linalg.norm(states[..., 4:6], axis=-1)
    cos = np.clip((r ** 2 - UPPER_ARM ** 2 - FOREARM ** 2) / (2 * UPPER_ARM * FOREARM), -1, 1)
    return convention * np.arccos(cos)


def reach_figures(states: np.ndarray, rewards: np.ndarray, actions: np.ndarray) -> dict:
    """states [E, T+1, 10] (reset state first), rewards [E, T], actions [E, T, 2] (executed, clipped)."""
    nxt = states[:, 1:]
    distance = np.linalg.norm(nxt[..., 8:10], axis=-1)  # the env's distance term, after each step
    control = np.sum(actions ** 2, -1)
    last = nxt[:, -envs.CONVENTION_STEPS:]
    tip = last[..., 8:10] + last[..., 4:6]
    radial = np.abs(np.linalg.norm(tip, axis=-1) - np.linalg.norm(last[..., 4:6], axis=-1))
    convention = envs.reacher_convention(states)  # [E]
    theta2 = envs.reacher_theta2(last).mean(-1)
    theta2_star = needed_elbow(last[:, -1], convention)
    slope = np.polyfit(np.abs(theta2_star), np.abs(theta2), 1)[0] if len(states) > 2 else float("nan")
    agree = envs.reacher_agent_conventions(states)
    # the side of the target at the reset: +1 where it lies counter-clockwise of the upper arm. A team that rotates the
    # short way and stops on the near side ends with both labels equal to it; the dataset's experts keep one
    # convention each whatever the side (about 50%)
    start = states[:, 0]
    start_side = np.where(np.angle(np.exp(1j * (np.arctan2(start[:, 5], start[:, 4])
                                                 - np.arctan2(start[:, 2], start[:, 0])))) >= 0, 1, -1)
    return dict(start_side=(agree == start_side[:, None]).mean(0),  # [2]: per agent, share of labels = that side
                ret=rewards.sum(1), dist_sum=distance.sum(1), ctrl_sum=control.sum(1),
                ctrl_agents=(actions ** 2).sum(1),  # [E, 2]: each agent's share of the control term
                recon=-(distance.sum(1) + control.sum(1)),
                final_dist=distance[:, -envs.CONVENTION_STEPS:].mean(1), final_radial=radial.mean(1),
                elbow_error=np.abs(theta2 - theta2_star), slope=slope,
                same=(agree[:, 0] == agree[:, 1]).mean())


def summarise(name: str, f: dict) -> None:
    paper = results.paper_scale_reacher(f["ret"])
    print(f"{name}\n  return {f['ret'].mean():.3f} (paper's scale {paper.mean():.3f} ± {paper.std():.3f}); distance term "
          f"{-f['dist_sum'].mean():.3f}, control term {-f['ctrl_sum'].mean():.3f} (agent 0 {-f['ctrl_agents'][:, 0].mean():.3f}, "
          f"agent 1 {-f['ctrl_agents'][:, 1].mean():.3f}; sum {f['recon'].mean():.3f})\n"
          f"  last 10 steps: fingertip-target distance {f['final_dist'].mean():.4f} m, of it radial "
          f"{f['final_radial'].mean():.4f} m; |θ2 - θ2*| {f['elbow_error'].mean():.3f} rad (median "
          f"{np.median(f['elbow_error']):.3f}); slope of |θ2| on |θ2*| {f['slope']:.2f}; same convention {f['same']:.0%}\n"
          f"  label = the target's side at the reset: shoulder {f['start_side'][0]:.0%}, elbow {f['start_side'][1]:.0%}")


def load_td3_policy(run_dir: pathlib.Path, ck: dict):
    """The greedy joint policy of an itd3bc.py run (ITD3+BC or MATD3+BC), rebuilt as itd3bc.main builds it."""
    import itd3bc

    fields = {f.name for f in dataclasses.fields(itd3bc.Args)}
    args = itd3bc.Args(**{k: v for k, v in ck["args"].items() if k in fields})
    if args.env != "reacher":
        raise envs.MomaError(f"these probes read reacher's state layout; {run_dir} is a {args.env} run")
    obs = envs.check_names("reacher", args.obs, args.dataset)
    history_len = args.history_len
    if history_len is None:
        history_len = envs.HISTORY_LEN if ("reacher", obs) in envs.PARTIALLY_OBSERVABLE else 0
    obs_dim, hist_dim = max(envs.obs_dims("reacher", obs)), max(envs.history_dims("reacher", obs))
    agents = itd3bc.TD3Agents(2, obs_dim, envs.action_dims("reacher")[0], args.hidden, history_len, hist_dim,
                              args.history_dim)
    agents.load_state_dict(ck["agents"])

    def act(observations, histories):
        x = agents.features(itd3bc.pad_stack(observations, obs_dim),
                            itd3bc.pad_stack(histories, hist_dim) if history_len > 0 else None)
        return list(agents.act(x).numpy())

    return act, dataclasses.replace(args, obs=obs), int(ck["step"])


@torch.no_grad()
def play(run_dir: pathlib.Path, episodes: int, oracle_elbow: bool, gain: float) -> dict:
    ck = envs.load_checkpoint(run_dir / "checkpoint.pt", torch.device("cpu"))
    if "target_actor" in ck:  # an itd3bc.py run
        act, args, iteration = load_td3_policy(run_dir, ck)
    else:
        agents, args, data, layout, iteration = load_agents(run_dir, env="reacher")
        act = moma_ppo.greedy_policy(agents, layout, "cpu")
    sims = [envs.make_env("reacher", args.obs) for _ in range(episodes)]
    seed = 10101 + 1 + args.seed  # the final evaluation of moma_ppo.py and itd3bc.py
    resets = [s.reset(seed=seed + j) for j, s in enumerate(sims)]
    observations = [np.stack([o[i] for o, _ in resets]) for i in range(2)]
    T = envs.EPISODE_STEPS["reacher"]
    states = np.zeros((episodes, T + 1, 10), np.float32)
    states[:, 0] = [s for _, s in resets]
    rewards, actions = np.zeros((episodes, T)), np.zeros((episodes, T, 2))
    follower_inputs = []  # [T] of [E, o_1 + H (o_1 + a_1)]: what agent 1's policy reads at each step
    history = envs.OnlineHistory("reacher", args.obs, episodes)
    torch.set_num_threads(1)
    for t in range(T):
        follower_inputs.append(np.concatenate([observations[1], history.get()[1].reshape(episodes, -1)], 1))
        a = [np.asarray(x) for x in act(observations, history.get())]
        if oracle_elbow:  # agent 1: PD to θ2*, with the convention agent 0 is on (its upper arm's side of the target)
            s = states[:, t]
            side = envs.reacher_agent_conventions(s[:, None], last=1)[:, 0]
            star = needed_elbow(s, side)
            theta2 = envs.reacher_theta2(s)
            a[1] = np.clip(gain * (star - theta2) - 0.1 * gain * s[:, 7], -1, 1)[:, None].astype(np.float32)
        previous = [o.copy() for o in observations]
        for j, sim in enumerate(sims):
            o, state, r, _, _ = sim.step([x[j] for x in a])
            states[j, t + 1], rewards[j, t] = state, r
            for i in range(2):
                observations[i][j] = o[i]
        actions[:, t] = np.clip(np.concatenate(a, 1), -1, 1)
        history.push(previous, a)
    label = f"{run_dir} ({args.obs}, seed {args.seed}, {'step' if 'target_actor' in ck else 'iteration'} {iteration}{', oracle elbow' if oracle_elbow else ''})"
    return label, reach_figures(states, rewards, actions), np.stack(follower_inputs, 1), states


def radius_r2(inputs: np.ndarray, target: np.ndarray, steps=(0, 5, 10, 20, 30, 49), seed: int = 0) -> dict:
    """(R², mean absolute error) of an MLP regressor inputs[:, t] -> target (θ2*) on held-out episodes (20%), per step t."""
    torch.manual_seed(seed)
    n = len(target)
    order = np.random.default_rng(seed).permutation(n)
    train, test = order[: int(0.8 * n)], order[int(0.8 * n):]
    out = {}
    for t in steps:
        x = torch.as_tensor(inputs[:, t], dtype=torch.float32)
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        x = (x - mean) / std
        y = torch.as_tensor(target, dtype=torch.float32)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                  torch.nn.ReLU(), torch.nn.Linear(256, 1))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
        for _ in range(3000):
            batch = torch.as_tensor(np.random.default_rng(_).choice(train, 256))
            loss = ((net(x[batch]).squeeze(-1) - y[batch]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = net(x[test]).squeeze(-1)
        out[t] = (float(1 - ((pred - y[test]) ** 2).mean() / y[test].var(unbiased=False)),
                  float((pred - y[test]).abs().mean()))
    return out


def probe_radius_info(a: ProbeArgs) -> None:
    if not a.run_dirs:  # the dataset's episodes: what agent 1's inputs say about the radius when the experts act
        data = envs.load_dataset("reacher", "expert-mix", "leader-only")
        T = envs.EPISODE_STEPS["reacher"]
        starts = np.flatnonzero(np.r_[True, data.episode_ids[1:] != data.episode_ids[:-1]])
        starts = starts[np.diff(np.r_[starts, len(data.rewards)]) == T][: a.episodes]
        rows = starts[:, None] + np.arange(T)[None]
        inputs = np.concatenate([data.observations[1][rows], data.histories(1, rows.reshape(-1)).reshape(*rows.shape, -1)], -1)
        states = np.concatenate([data.states[rows], data.next_states[rows[:, -1:]]], 1)
        theta2_star = needed_elbow(states[:, -1], envs.reacher_convention(states))
        fit = radius_r2(inputs, theta2_star)
        print(f"the expert-mix dataset, {len(starts)} episodes: θ2* from agent 1's leader-only inputs at step t (held-out "
              "R², mean |error| in rad): " + ", ".join(f"t={t}: {r2:.2f}, {mae:.3f}" for t, (r2, mae) in fit.items()))
    for run_dir in a.run_dirs:
        label, _, inputs, states = play(pathlib.Path(run_dir), a.episodes, False, a.oracle_gain)
        theta2_star = needed_elbow(states[:, -1], envs.reacher_convention(states))
        theta2_end = envs.reacher_theta2(states[:, -envs.CONVENTION_STEPS:]).mean(-1)
        fit = radius_r2(inputs, theta2_star)
        print(f"{label}, {a.episodes} episodes: the elbow angle the target needs, θ2*, predicted from agent 1's inputs "
              f"at step t (held-out R², mean |error| in rad): "
              + ", ".join(f"t={t}: {r2:.2f}, {mae:.3f}" for t, (r2, mae) in fit.items())
              + f"; the policy's own |θ2 - θ2*| at the end: {np.abs(theta2_end - theta2_star).mean():.3f}")


def probe_dataset() -> None:
    data = envs.load_dataset("reacher", "expert-mix", "all-observant")
    ep = data.episode_ids
    starts = np.flatnonzero(np.r_[True, ep[1:] != ep[:-1]])
    T = envs.EPISODE_STEPS["reacher"]
    starts = starts[np.diff(np.r_[starts, len(ep)]) == T]
    rows = starts[:, None] + np.arange(T)[None]
    states = np.concatenate([data.states[rows], data.next_states[rows[:, -1:]]], 1)
    actions = np.clip(data.joint_actions[rows], -1, 1)
    summarise(f"the expert-mix dataset ({len(starts)} episodes)", reach_figures(states, data.rewards[rows], actions))


def main(a: ProbeArgs) -> None:
    if a.probe == "dataset":
        return probe_dataset()
    if a.probe == "radius-info":
        return probe_radius_info(a)
    for run_dir in a.run_dirs:
        summarise(*play(pathlib.Path(run_dir), a.episodes, a.oracle_elbow, a.oracle_gain)[:2])


if __name__ == "__main__":
    main(tyro.cli(ProbeArgs))
