"""Probes of a MOMA-PPO checkpoint in the real simulator, for the Ant diagnosis (docs/diagnosis.md).

    python bench/diagnose_moma_ppo.py episodes RUN_DIR        # greedy episodes: how they end, progress, ctrl cost
    python bench/diagnose_moma_ppo.py from-states RUN_DIR     # greedy steps from rest vs from dataset states
    python bench/diagnose_moma_ppo.py terminals RUN_DIR       # real terminals of 10-step rollouts vs the model's
    python bench/diagnose_moma_ppo.py jumps RUN_DIR           # does the model see the jumps of the policy's own episodes?

RUN_DIR is a run folder with a checkpoint.pt (any iteration); the probes rebuild the agents exactly as moma_ppo.py
does (same dataset normalisers) and run on one thread. Ant only: the state's index 0 is the torso height, 13 its
forward velocity, and the env's control cost is 0.5 Σ a² per step (Ant-v5).
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

Z, FORWARD_VELOCITY, DT = 0, 13, 0.05  # Ant-v5: state index of the torso height and x velocity; seconds per step


@dataclasses.dataclass
class ProbeArgs:
    probe: tyro.conf.Positional[Literal["episodes", "from-states", "terminals", "jumps"]]
    run_dir: tyro.conf.Positional[str]
    episodes: int = 20
    """greedy episodes (episodes) or start states (from-states); terminals uses 25x as many rollouts"""
    steps: int = 200
    """steps per from-states rollout"""
    seed: int = 0
    source: Literal["policy", "dataset"] = "policy"
    """jumps: the policy's greedy episodes, or the dataset's own episodes (up to 5x --episodes of each kind)"""


def load_agents(run_dir: pathlib.Path, env: str = "ant"):
    """The agents of a checkpoint, rebuilt as moma_ppo.main builds them, with their args, dataset and layout
    (bench/diagnose_reacher.py uses it with env="reacher")."""
    ck = envs.load_checkpoint(run_dir / "checkpoint.pt", torch.device("cpu"))
    args = moma_ppo.resolve(moma_ppo.Args(**ck["args"]))
    if args.env != env:
        raise envs.MomaError(f"these probes read {env}'s state layout; {run_dir} is a {args.env} run")
    data = envs.load_dataset(args.env, args.dataset, args.obs)
    layout = moma_ppo.Layout(args.env, args.obs, "cpu")
    agents = moma_ppo.build_agents(args, layout, torch.as_tensor(data.states))
    agents.load_state_dict(ck["agents"])
    return agents, args, data, layout, int(ck["iteration"])


def greedy_rollouts(agents, args, data, layout, n: int, steps: int, start_rows=None, seed: int = 0,
                    record: bool = False) -> dict:
    """n greedy episodes in the real env, from its reset (start_rows None) or from dataset states with their
    dataset histories; per episode: return, length, x progress, control cost, torso height where it ended, whether
    it ended by a terminal, and with record=True its states before each step and joint actions ([length, S], [length, A])."""
    act = moma_ppo.greedy_policy(agents, layout, "cpu")
    sims = [envs.make_env(args.env, args.obs) for _ in range(n)]
    history = envs.OnlineHistory(args.env, args.obs, n)
    for j, sim in enumerate(sims):
        sim.reset(seed=seed + j)
        if start_rows is not None:
            sim.set_state(data.states[start_rows[j]])
    if start_rows is not None and args.use_history:
        for i in range(layout.n):
            history.buffers[i][:] = data.history_table(i)[data.history_index[start_rows]]
    observations = [np.stack([envs.split_state(args.env, args.obs, s._state)[i] for s in sims]) for i in range(layout.n)]
    x_start = np.array([s.env.unwrapped.data.qpos[0] for s in sims])
    out = {k: np.zeros(n) for k in ("return", "length", "ctrl_cost", "x_progress")}
    end_z, alive, terminal = np.full(n, np.nan), np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    states, joints = [[] for _ in range(n)], [[] for _ in range(n)]
    for _ in range(steps):
        if not alive.any():
            break
        actions = act(observations, history.get())
        if record:
            joint = layout.joint(torch.as_tensor(np.stack(actions))).clamp(-1, 1).numpy()
            for j in np.flatnonzero(alive):
                states[j].append(np.array(sims[j]._state, dtype=np.float32))
                joints[j].append(joint[j])
        previous = [o.copy() for o in observations]
        for j in np.flatnonzero(alive):
            a = [x[j] for x in actions]
            o, state, reward, terminated, truncated = sims[j].step(a)
            out["return"][j] += reward
            out["length"][j] += 1
            out["ctrl_cost"][j] += 0.5 * float(np.sum(np.clip(np.concatenate(a), -1, 1) ** 2))
            out["x_progress"][j] = sims[j].env.unwrapped.data.qpos[0] - x_start[j]
            for i in range(layout.n):
                observations[i][j] = o[i]
            if terminated or truncated:
                alive[j] = False
                end_z[j] = state[Z] if terminated else np.nan
                terminal[j] = bool(terminated)
        history.push(previous, actions)
    out["end_z"], out["terminal"] = end_z, terminal
    if record:
        out["states"] = [np.stack(x) for x in states]
        out["joint_actions"] = [np.stack(x) for x in joints]
    return out


def probe_episodes(a: ProbeArgs) -> None:
    agents, args, data, layout, iteration = load_agents(pathlib.Path(a.run_dir))
    r = greedy_rollouts(agents, args, data, layout, a.episodes, envs.EPISODE_STEPS["ant"], seed=20202 + a.seed)
    score = data.normalized_score(r["return"])
    print(f"{a.run_dir} (iteration {iteration}), {a.episodes} greedy episodes: score {score.mean():.3f} ± {score.std():.3f}; "
          f"{np.mean(r['length'] >= envs.EPISODE_STEPS['ant']):.0%} reach {envs.EPISODE_STEPS['ant']} steps "
          f"(mean length {r['length'].mean():.0f}); ended by a fall (z < 0.2): {int(np.sum(r['end_z'] < 0.2))}, by a "
          f"jump (z > 1): {int(np.sum(r['end_z'] > 1.0))}; per episode: x progress {r['x_progress'].mean():.1f} m "
          f"(forward reward {r['x_progress'].mean() / DT:.0f}), control cost {r['ctrl_cost'].mean():.0f}, "
          f"return {r['return'].mean():.0f}")


def probe_from_states(a: ProbeArgs) -> None:
    agents, args, data, layout, iteration = load_agents(pathlib.Path(a.run_dir))
    rows = np.random.default_rng(a.seed).integers(len(data.states), size=a.episodes)
    print(f"{a.run_dir} (iteration {iteration}), {a.episodes} greedy rollouts of {a.steps} real steps:")
    for name, start in (("from rest (the env's reset)", None), ("from dataset states", rows)):
        r = greedy_rollouts(agents, args, data, layout, a.episodes, a.steps, start_rows=start, seed=30303 + a.seed)
        print(f"  {name:28s} forward speed {r['x_progress'].sum() / (r['length'].sum() * DT):.2f} m/s, control cost "
              f"{r['ctrl_cost'].sum() / r['length'].sum():.2f} per step, {np.mean(r['length'] < a.steps):.0%} ended early")
    print(f"  the dataset at those states: forward speed {data.states[rows, FORWARD_VELOCITY].mean():.2f} m/s, control "
          f"cost {0.5 * np.mean(np.sum(np.clip(np.concatenate(data.actions, 1)[rows], -1, 1) ** 2, 1)):.2f} per step")


@torch.no_grad()
def probe_terminals(a: ProbeArgs) -> None:
    """The policy's 10-step rollouts (sampled actions, dataset starts and histories, as in training) run in the real
    simulator; at each real step, what the world model predicts from the same state and action."""
    import world_model

    agents, args, data, layout, iteration = load_agents(pathlib.Path(a.run_dir))
    model = world_model.load_or_train(args.env, args.dataset, seed=args.world_model_seed, device=torch.device("cpu"))
    simulator = moma_ppo.GroundTruthSimulator(args.env, torch.device("cpu"))
    gen = torch.Generator().manual_seed(a.seed)
    b = 25 * a.episodes
    rows = torch.randint(len(data.states), (b,), generator=gen)
    state = torch.as_tensor(data.states)[rows]
    hist = moma_ppo.start_histories(agents, layout, layout.dataset_history_table(data), torch.as_tensor(data.history_index),
                                    rows, "dataset") if args.use_history else None
    alive, steps = torch.ones(b, dtype=torch.bool), []
    for _ in range(args.rollout_horizon):
        obs = layout.observe(state)
        actions = agents.distribution(agents.features(obs, hist)).sample()
        joint = layout.joint(actions).clamp(-1, 1)
        real = simulator.step(state, joint, restart=True)
        members = model.member_predictions(state, joint, model.elites)["next_states"]  # [elites, b, S]
        drawn = model.step(state, joint, generator=gen)
        standardised = model.step(state, joint, generator=gen, eps_g_units="standardised")
        steps.append(dict(alive=alive.clone(), real=real["terminals"] > 0, drawn=drawn["terminals"] > 0,
                          any_elite=torch.stack([envs.is_terminal_state(args.env, m) for m in members]).any(0),
                          eps_raw=drawn["eps_g"], eps_std=standardised["eps_g"], z_real=real["next_states"][:, Z],
                          z_model=members[:, :, Z].mean(0)))
        if args.use_history:
            hist = torch.cat([hist[:, :, 1:], layout.history_step(obs, actions).unsqueeze(2)], dim=2)
        alive = alive & (real["terminals"] == 0)
        state = torch.where(alive[:, None], real["next_states"], state)
    s = {k: torch.cat([step[k] for step in steps]) for k in steps[0]}
    valid = s["alive"]
    real = s["real"] & valid
    n_real = int(real.sum())
    print(f"{a.run_dir} (iteration {iteration}): {b} rollouts of {args.rollout_horizon} real steps, {int(valid.sum())} "
          f"steps, {n_real} real terminals ({n_real / b:.1%} of rollouts; {float((s['z_real'][real] > 1).float().mean()) if n_real else float('nan'):.0%} "
          f"of them jumps above z = 1)")
    cut = args.uncertainty_threshold
    for name, flagged in (("the model's terminal (drawn elite's head or the rule)", s["drawn"]),
                          ("any elite's next state breaks the rule", s["any_elite"]),
                          (f"raw ε_g ≥ l_ε = {cut:g} (the rollout cut)", s["eps_raw"] >= cut),
                          (f"standardised ε_g ≥ {cut:g}", s["eps_std"] >= cut)):
        flagged = flagged & valid
        print(f"  {name:55s} recall of real terminals {float((flagged & real).sum()) / max(n_real, 1):.2f}, "
              f"flags {float(flagged.sum()) / float(valid.sum()):.1%} of steps")
    if n_real:
        print(f"  ε_g median at real terminals / elsewhere: raw {s['eps_raw'][real].median():.3f} / "
              f"{s['eps_raw'][valid & ~real].median():.3f}, standardised {s['eps_std'][real].median():.3f} / "
              f"{s['eps_std'][valid & ~real].median():.3f}; torso height there: real {s['z_real'][real].mean():.3f}, "
              f"elites' mean prediction {s['z_model'][real].mean():.3f}")


@torch.no_grad()
def probe_jumps(a: ProbeArgs) -> None:
    """The policy's own greedy episodes in the real simulator; for each one that ended by a terminal (a jump or a
    fall) at step T, the world model is run open-loop with the episode's real actions from the real state d steps
    before it (d = 1: the one transition that jumps). Is the terminal predicted, or is the rollout cut by ε_g ≥ l_ε
    (Ant's preset ends a cut rollout as a terminal: either way the policy is charged the fall)? The same d-step
    open-loop rollouts from states of the full-length episodes (well away from any terminal) give the false alarms."""
    import world_model

    agents, args, data, layout, iteration = load_agents(pathlib.Path(a.run_dir))
    model = world_model.load_or_train(args.env, args.dataset, seed=args.world_model_seed, device=torch.device("cpu"))
    rng = np.random.default_rng(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    if a.source == "policy":
        r = greedy_rollouts(agents, args, data, layout, a.episodes, envs.EPISODE_STEPS["ant"], seed=20202 + a.seed,
                            record=True)
    else:  # the behaviour policies' episodes: up to 5 x --episodes ended by a terminal, as many full-length ones
        starts = np.flatnonzero(np.r_[True, data.episode_ids[1:] != data.episode_ids[:-1]])
        bounds = list(zip(starts, np.r_[starts[1:], len(data.episode_ids)]))
        by_terminal = [(b, e) for b, e in bounds if data.terminals[e - 1] > 0]
        by_length = [(b, e) for b, e in bounds if e - b >= envs.EPISODE_STEPS["ant"]]
        picked = [x for group in (by_terminal, by_length)
                  for x in (group if len(group) <= 5 * a.episodes else
                            [group[i] for i in rng.choice(len(group), 5 * a.episodes, replace=False)])]
        r = {"states": [data.states[b:e] for b, e in picked], "joint_actions": [data.joint_actions[b:e] for b, e in picked],
             "length": np.array([e - b for b, e in picked]), "terminal": np.array([data.terminals[e - 1] > 0 for b, e in picked]),
             "end_z": np.array([data.next_states[e - 1, Z] if data.terminals[e - 1] > 0 else np.nan for b, e in picked])}
    ended = np.flatnonzero(r["terminal"])
    full = np.flatnonzero(r["length"] >= envs.EPISODE_STEPS["ant"])
    what = f"{a.episodes} greedy episodes" if a.source == "policy" else f"{len(r['length'])} of the dataset's episodes"
    print(f"{a.run_dir} (iteration {iteration}), {what}: {len(ended)} ended by a terminal "
          f"({int(np.sum(r['end_z'] > 1))} jumps above z = 1, {int(np.sum(r['end_z'] < 0.2))} falls), {len(full)} full length")
    if not len(ended):
        return

    def flags(starts: list) -> tuple:  # starts: (episode, step, d); -> share predicted terminal, share terminal or
        # cut, and the largest torso height the model predicts on the way
        state = torch.as_tensor(np.stack([r["states"][e][t] for e, t, _ in starts]))
        d = starts[0][2]
        terminal = torch.zeros(len(starts), dtype=torch.bool)
        cut = torch.zeros(len(starts), dtype=torch.bool)
        z_max = state[:, Z].clone()
        for k in range(d):
            joint = torch.as_tensor(np.stack([r["joint_actions"][e][t + k] for e, t, _ in starts]))
            out = model.step(state, joint, clip=args.clip_to_dataset, generator=gen, eps_g_units=args.eps_g_units)
            live = ~(terminal | cut)
            near_top = out["next_states"][:, Z] > envs.ANT_HEALTHY_Z[1] - args.terminal_height_margin  # the run's margin
            terminal |= live & ((out["terminals"] > 0) | (near_top & (args.terminal_height_margin > 0)))
            cut |= live & (out["eps_g"] >= args.uncertainty_threshold)
            state = out["next_states"]
            z_max = torch.maximum(z_max, state[:, Z])
        return float(terminal.float().mean()), float((terminal | cut).float().mean()), float(z_max.mean())

    print(f"  d = steps before the real terminal the model starts from; flagged = predicted terminal, or cut by "
          f"ε_g ≥ l_ε = {args.uncertainty_threshold:g}")
    for d in (1, 3, 5, 10, 30):
        jumps = [(e, int(r["length"][e]) - d, d) for e in ended if r["length"][e] >= d]
        calm = [(e, int(t), d) for e in full for t in rng.integers(100, envs.EPISODE_STEPS["ant"] - 100 - d, size=20)]
        if not jumps:
            continue
        hit_terminal, hit_any, z_model = flags(jumps)
        alarm_terminal, alarm_any, z_model_calm = flags(calm) if calm else (float("nan"),) * 3
        z_real = np.mean([max(r["states"][e][t:, Z].max(), r["end_z"][e]) for e, t, _ in jumps])
        z_real_calm = np.mean([r["states"][e][t + 1:t + d + 1, Z].max() for e, t, _ in calm]) if calm else float("nan")
        print(f"  d = {d:2d}: of {len(jumps)} real terminals, the model predicts {hit_terminal:.0%} (flags {hit_any:.0%}; "
              f"highest torso on the way: model {z_model:.2f} m, real {z_real:.2f} m); from {len(calm)} calm states "
              f"of full-length episodes it predicts a terminal in {alarm_terminal:.0%} (flags {alarm_any:.0%}; highest "
              f"torso: model {z_model_calm:.2f} m, real {z_real_calm:.2f} m)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    probe_args = tyro.cli(ProbeArgs)
    try:
        {"episodes": probe_episodes, "from-states": probe_from_states, "terminals": probe_terminals,
         "jumps": probe_jumps}[probe_args.probe](probe_args)
    except envs.MomaError as e:
        raise SystemExit(f"error: {e}")
