"""Probes of a MOMA-PPO checkpoint in the real simulator, for the Ant diagnosis (docs/diagnosis.md).

    python bench/diagnose_moma_ppo.py episodes RUN_DIR        # greedy episodes: how they end, progress, ctrl cost
    python bench/diagnose_moma_ppo.py from-states RUN_DIR     # greedy steps from rest vs from dataset states
    python bench/diagnose_moma_ppo.py terminals RUN_DIR       # real terminals of 10-step rollouts vs the model's

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
    probe: tyro.conf.Positional[Literal["episodes", "from-states", "terminals"]]
    run_dir: tyro.conf.Positional[str]
    episodes: int = 20
    """greedy episodes (episodes) or start states (from-states); terminals uses 25x as many rollouts"""
    steps: int = 200
    """steps per from-states rollout"""
    seed: int = 0


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


def greedy_rollouts(agents, args, data, layout, n: int, steps: int, start_rows=None, seed: int = 0) -> dict:
    """n greedy episodes in the real env, from its reset (start_rows None) or from dataset states with their
    dataset histories; per episode: return, length, x progress, control cost, torso height where it ended."""
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
    end_z, alive = np.full(n, np.nan), np.ones(n, dtype=bool)
    for _ in range(steps):
        if not alive.any():
            break
        actions = act(observations, history.get())
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
        history.push(previous, actions)
    out["end_z"] = end_z
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


if __name__ == "__main__":
    torch.set_num_threads(1)
    probe_args = tyro.cli(ProbeArgs)
    try:
        {"episodes": probe_episodes, "from-states": probe_from_states, "terminals": probe_terminals}[probe_args.probe](probe_args)
    except envs.MomaError as e:
        raise SystemExit(f"error: {e}")
