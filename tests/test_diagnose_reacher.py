"""The Reacher probe's geometry and reward split (bench/diagnose_reacher.py), against the real simulator."""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import diagnose_reacher  # noqa: E402
import envs  # noqa: E402


def test_needed_elbow_puts_the_fingertip_on_the_targets_circle():
    sim = envs.make_env("reacher")
    rng = np.random.default_rng(0)
    for convention in (1, -1):
        for _ in range(5):
            radius, direction, theta1 = rng.uniform(0.03, 0.2), rng.uniform(-np.pi, np.pi), rng.uniform(-np.pi, np.pi)
            target = radius * np.array([np.cos(direction), np.sin(direction)])
            probe = np.zeros(10)
            probe[4:6] = target
            theta2 = float(diagnose_reacher.needed_elbow(probe, np.array(convention)))
            assert np.sign(theta2) == convention
            state = np.zeros(10)
            state[[0, 2]] = np.cos(theta1), np.sin(theta1)
            state[[1, 3]] = np.cos(theta2), np.sin(theta2)
            state[4:6] = target
            sim.set_state(state)  # gymnasium's MujocoEnv.set_state runs mj_forward: body positions are current
            fingertip = sim.env.unwrapped.get_body_com("fingertip")[:2]
            assert abs(np.linalg.norm(fingertip) - radius) < 1e-3, (np.linalg.norm(fingertip), radius)


def test_reach_figures_split_the_return_into_distance_and_control():
    sim = envs.make_env("reacher")
    _, state = sim.reset(seed=3)
    rng = np.random.default_rng(3)
    T = envs.EPISODE_STEPS["reacher"]
    states, rewards, actions = [state], [], []
    for _ in range(T):
        a = rng.uniform(-1, 1, 2).astype(np.float32)
        _, state, r, _, _ = sim.step([a[:1], a[1:]])
        states.append(state), rewards.append(r), actions.append(a)
    f = diagnose_reacher.reach_figures(np.array(states)[None], np.array(rewards)[None], np.array(actions)[None])
    assert np.allclose(f["recon"], f["ret"], atol=1e-4)  # Reacher-v5: r = -|fingertip - target| - |a|²
    assert f["final_radial"][0] <= f["final_dist"][0] + 1e-6  # the radial part of a distance is at most the distance


def test_reach_replays_an_itd3bc_runs_final_evaluation(tiny_mujoco_datasets, tmp_path):
    """The probe rebuilds an itd3bc.py (MATD3+BC) team from its checkpoint and plays the run's own final evaluation:
    the same greedy returns as the run's summary, episode for episode."""
    import itd3bc

    summary = itd3bc.main(itd3bc.Args(env="reacher", obs="independent", dataset="expert-mix", mixer=True, seed=0,
                                      total_steps=4, batch_size=16, hidden=16, history_dim=8, eval_every=0,
                                      eval_episodes=3, run_dir=str(tmp_path / "run")))
    _, figures, _, states = diagnose_reacher.play(tmp_path / "run", 3, oracle_elbow=False, gain=2.0)
    assert np.allclose(figures["ret"], summary["episode_returns"], atol=1e-5)
    assert states.shape == (3, envs.EPISODE_STEPS["reacher"] + 1, 10)
