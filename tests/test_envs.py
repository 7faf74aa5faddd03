"""envs.py: index maps, physics of the agent split, Minari round trip, histories, Table 1, errors."""

import json

import minari
import numpy as np
import pytest
import torch

import envs

# The tables of docs/environments.md / paper §5, written out literally so that a change in envs.py cannot hide.
EXPECTED_OBS = {
    ("coordination", "full"): [[0], [0]],
    ("reacher", "all-observant"): [list(range(10))] * 2,
    ("reacher", "independent"): [[0, 2, 6, 4, 5], [1, 3, 7, 4, 5]],
    ("reacher", "leader-only"): [[0, 2, 6, 1, 3, 7, 4, 5], [0, 2, 6, 1, 3, 7]],
    ("ant", "full"): [list(range(27))] * 4,
    ("ant", "partial"): [
        [0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 18, 5, 6, 19, 20],
        [7, 8, 21, 22],
        [9, 10, 23, 24],
        [11, 12, 25, 26],
    ],
}
EXPECTED_ACTIONS = {"coordination": [[0], [1]], "reacher": [[0], [1]], "ant": [[2, 3], [4, 5], [6, 7], [0, 1]]}
EXPECTED_DIMS = {
    ("reacher", "all-observant"): [10, 10],
    ("reacher", "independent"): [5, 5],
    ("reacher", "leader-only"): [8, 6],
    ("ant", "full"): [27] * 4,
    ("ant", "partial"): [15, 4, 4, 4],
    ("coordination", "full"): [1, 1],
}


@pytest.mark.parametrize("key", sorted(EXPECTED_OBS))
def test_observation_index_maps(key):
    env, obs = key
    assert envs.obs_indices(env, obs) == EXPECTED_OBS[key]
    assert envs.obs_dims(env, obs) == EXPECTED_DIMS[key]
    e = envs.make_env(env, obs, seed=0)
    observations, state = e.reset()
    assert [o.shape[0] for o in observations] == EXPECTED_DIMS[key]
    assert state.shape == (envs.STATE_DIM[env],)
    for o, ix in zip(observations, EXPECTED_OBS[key]):
        np.testing.assert_array_equal(o, state[ix])


def test_action_index_maps():
    assert envs.ACTION_INDICES == EXPECTED_ACTIONS
    for env, ix in EXPECTED_ACTIONS.items():
        flat = sorted(i for agent in ix for i in agent)
        assert flat == list(range(envs.JOINT_ACTION_DIM[env]))  # every joint action dim driven exactly once
    per_agent = [np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([5.0, 6.0]), np.array([7.0, 8.0])]
    joint = envs.join_actions("ant", per_agent)
    np.testing.assert_array_equal(joint, [7, 8, 1, 2, 3, 4, 5, 6])
    for a, b in zip(envs.split_actions("ant", joint), per_agent):
        np.testing.assert_array_equal(a, b)


def test_partial_observations_partition_the_state():
    concat = sorted(i for agent in EXPECTED_OBS[("ant", "partial")] for i in agent)
    assert concat == list(range(27))  # the PO concatenation is a permutation of the state
    torso = {0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 18}
    assert all(not torso & set(ix) for ix in EXPECTED_OBS[("ant", "partial")][1:])  # only agent 0 sees the torso
    for obs in ("independent", "leader-only"):
        for ix in envs.obs_indices("reacher", obs):
            assert 8 not in ix and 9 not in ix  # no PO agent sees fingertip - target


def _ant_joint_displacement(agent: int, steps: int = 5) -> np.ndarray:
    """Per-leg joint-angle change caused by actuating only `agent` (vs. the zero action), by physics."""
    results = []
    for active in (None, agent):
        e = envs.make_env("ant", "partial")
        e.reset(seed=3)
        for _ in range(steps):
            actions = [np.zeros(2, dtype=np.float32) for _ in range(4)]
            if active is not None:
                actions[active] = np.ones(2, dtype=np.float32)
            observations, state, *_ = e.step(actions)
        results.append(state.copy())
    diff = np.abs(results[1] - results[0])
    legs = [[5, 6], [7, 8], [9, 10], [11, 12]]  # hip_i, ankle_i angles
    return np.array([diff[ix].sum() for ix in legs])


@pytest.mark.parametrize("agent", range(4))
def test_ant_agent_moves_the_leg_it_observes(agent):
    displacement = _ant_joint_displacement(agent)
    others = np.delete(displacement, agent)
    assert displacement[agent] > 5 * others.max(), displacement
    # and that leg is exactly what this agent observes in the partial observation function
    observed = set(EXPECTED_OBS[("ant", "partial")][agent])
    assert {5 + 2 * agent, 6 + 2 * agent} <= observed


@pytest.mark.parametrize("agent", range(2))
def test_reacher_agent_drives_its_joint(agent):
    states = []
    for active in (None, agent):
        e = envs.make_env("reacher", "independent")
        e.reset(seed=1)
        for _ in range(3):
            actions = [np.zeros(1, dtype=np.float32) for _ in range(2)]
            if active is not None:
                actions[active] = np.ones(1, dtype=np.float32)
            _, state, *_ = e.step(actions)
        states.append(state)
    velocity_change = np.abs(states[1] - states[0])[[6, 7]]  # θ1, θ2 velocities
    assert velocity_change[agent] > velocity_change[1 - agent], velocity_change


def test_coordination_game_payoff_and_episode():
    e = envs.make_env("coordination", seed=0)
    observations, state = e.reset()
    assert state.tolist() == [0.0]
    total, steps, truncated = 0.0, 0, False
    while not truncated:
        observations, state, r, terminated, truncated = e.step([steps % 2, steps % 2 if steps < 5 else 1 - steps % 2])
        total += r
        steps += 1
        assert not terminated
        np.testing.assert_allclose(observations[0], [steps / 10])
    assert steps == 10 and total == 5.0
    with pytest.raises(envs.MomaError, match="two integers"):
        e.step([0, 2])


def test_evaluate_coordination_greedy_policies():
    always_right = lambda o, h: [np.ones(len(o[0]), dtype=np.int64)] * 2  # noqa: E731
    disagree = lambda o, h: [np.zeros(len(o[0]), dtype=np.int64), np.ones(len(o[0]), dtype=np.int64)]  # noqa: E731
    np.testing.assert_array_equal(envs.evaluate("coordination", None, always_right, 7), np.full(7, 10.0))
    np.testing.assert_array_equal(envs.evaluate("coordination", None, disagree, 3), np.zeros(3))

def _reacher_pose(target, elbow_sign, shoulder_from=None):
    """A Reacher-v5 state whose fingertip is at `target` (links 0.1 and 0.11), elbow bent `elbow_sign`; the shoulder
    angle of the pose with `shoulder_from`'s bend instead where given (a pose two disagreeing agents reach)."""
    l1, l2 = 0.1, 0.11
    d, phi = np.hypot(*target), np.arctan2(target[1], target[0])

    def pose(sign):
        theta2 = sign * np.arccos((d ** 2 - l1 ** 2 - l2 ** 2) / (2 * l1 * l2))
        return phi - np.arctan2(l2 * np.sin(theta2), l1 + l2 * np.cos(theta2)), theta2

    theta1, theta2 = pose(elbow_sign)
    if shoulder_from is not None:
        theta1 = pose(shoulder_from)[0]
    tip = np.array([l1 * np.cos(theta1) + l2 * np.cos(theta1 + theta2), l1 * np.sin(theta1) + l2 * np.sin(theta1 + theta2)])
    return np.array([np.cos(theta1), np.cos(theta2), np.sin(theta1), np.sin(theta2), *target, 0.0, 0.0,
                     *(tip - np.asarray(target))], dtype=np.float32)


@pytest.mark.parametrize("target", [(0.12, 0.05), (-0.1, 0.08), (-0.05, -0.15), (0.02, -0.07)])
def test_reacher_agent_conventions_on_the_two_poses_and_a_disagreeing_one(target):
    ccw, cw = _reacher_pose(target, +1), _reacher_pose(target, -1)
    assert np.abs(ccw[8:]).max() < 1e-6 and np.abs(cw[8:]).max() < 1e-6  # both poses reach the target
    episodes = np.stack([np.stack([ccw] * 12), np.stack([cw] * 12),
                         np.stack([_reacher_pose(target, +1, shoulder_from=-1)] * 12)])
    assert envs.reacher_agent_conventions(episodes).tolist() == [[1, 1], [-1, -1], [-1, 1]]
    assert np.abs(_reacher_pose(target, +1, shoulder_from=-1)[8:]).max() > 0.01  # the disagreeing pose misses
    summary = envs.convention_summary(envs.reacher_agent_conventions(episodes))
    assert summary["same_share"] == pytest.approx(2 / 3)
    assert summary["both_counter_clockwise_share"] == pytest.approx(1 / 3)
    assert summary["both_clockwise_share"] == pytest.approx(1 / 3)


def test_evaluate_reads_the_conventions_of_the_expert_and_its_mirror():
    """The shipped reacher expert bends counter-clockwise, its mirror image clockwise (docs/datasets.md): greedy
    episodes of each, with the agents' conventions read off the poses they reach."""
    import make_datasets as md

    expert = md.load_policy(envs.REPO_DIR / "behaviour_policies" / "reacher_expert.pt")
    for policy, convention in ((expert, 1), (md.MirroredPolicy(expert), -1)):
        def act(observations, histories, policy=policy):  # all-observant: each agent's observation is the state
            return envs.split_actions("reacher", policy.act(observations[0], True))

        returns, conventions = envs.evaluate("reacher", "all-observant", act, 8, seed=3, return_conventions=True)
        assert conventions.shape == (8, 2)
        assert (conventions == convention).mean() >= 0.9, conventions.tolist()
    assert envs.evaluate("ant", "full", lambda o, h: [np.zeros((len(o[0]), 2))] * 4, 1,
                         return_conventions=True)[1] is None  # only Reacher has conventions



@pytest.mark.parametrize("env", ["reacher", "ant"])
def test_set_state_restores_the_simulator(env):
    e = envs.make_env(env, seed=0)
    e.reset()
    rng = np.random.default_rng(0)
    for _ in range(20):
        _, state, *_ = e.step([rng.uniform(-1, 1, d) for d in e.action_dims])
    other = envs.make_env(env, seed=5)
    other.reset()
    other.set_state(state)
    np.testing.assert_allclose(other.env.unwrapped._get_obs(), state, atol=1e-5)
    # and both simulators then evolve identically under the same actions
    actions = [rng.uniform(-1, 1, d) for d in e.action_dims]
    _, s1, r1, *_ = e.step(actions)
    _, s2, r2, *_ = other.step(actions)
    np.testing.assert_allclose(s1, s2, atol=1e-4)


def test_termination_rule_matches_the_ant_simulator():
    """envs.is_terminal_state on the next state says exactly when Ant-v5 itself terminates: start from states
    whose torso is lifted or lowered around the healthy range and compare over one random step each."""
    e = envs.make_env("ant", seed=0)
    _, state = e.reset(seed=0)
    rng = np.random.default_rng(0)
    agree, terminated = [], []
    for z in np.linspace(0.1, 1.2, 45):
        start = state.copy()
        start[0] = z
        start[13:] = rng.normal(0, 0.5, 14)  # some velocity, so the step moves the torso
        e.set_state(start)
        _, next_state, _, term, _ = e.step([rng.uniform(-1, 1, d) for d in e.action_dims])
        agree.append(bool(envs.is_terminal_state("ant", next_state)) == term)
        terminated.append(term)
    assert all(agree)
    assert 5 < sum(terminated) < 40  # both outcomes were exercised
    # NumPy and torch inputs, batched; non-finite states are terminal too
    batch = np.zeros((4, 27), np.float32)
    batch[:, 0] = [0.5, 0.19, 1.01, 0.5]
    batch[3, 5] = np.nan
    expected = [False, True, True, True]
    assert envs.is_terminal_state("ant", batch).tolist() == expected
    assert envs.is_terminal_state("ant", torch.as_tensor(batch)).tolist() == expected
    assert not envs.is_terminal_state("reacher", np.full((2, 10), 9.0)).any()


def _random_episodes(env: str, n_episodes: int, seed: int = 0):
    e = envs.make_single_agent_env(env)
    rng = np.random.default_rng(seed)
    episodes = []
    for j in range(n_episodes):
        s, _ = e.reset(seed=seed + j)
        obs, acts, rews, terms, truncs = [s], [], [], [], []
        done = False
        while not done:
            a = rng.uniform(-1, 1, envs.JOINT_ACTION_DIM[env]).astype(np.float32)
            s, r, te, tr, _ = e.step(a)
            obs.append(s), acts.append(a), rews.append(r), terms.append(te), truncs.append(tr)
            done = te or tr
        episodes.append(dict(observations=np.array(obs), actions=np.array(acts), rewards=np.array(rews),
                             terminations=np.array(terms), truncations=np.array(truncs)))
    return episodes


def test_minari_round_trip_and_split():
    episodes = _random_episodes("reacher", 4)
    envs.write_minari_dataset("reacher", "expert-mix", episodes, ref_min_score=-40.0, ref_max_score=-4.0,
                              algorithm_name="uniform random", description="test")
    ds = minari.load_dataset("moma/reacher/expert-mix-v0")
    assert ds.total_episodes == 4 and ds.total_steps == 200
    assert ds.storage.metadata["ref_min_score"] == -40.0 and ds.storage.metadata["ref_max_score"] == -4.0
    for stored, ep in zip(ds.iterate_episodes(), episodes):
        np.testing.assert_allclose(stored.observations, ep["observations"])
        np.testing.assert_allclose(stored.actions, ep["actions"])
        np.testing.assert_allclose(stored.rewards, ep["rewards"])
    data = envs.load_dataset("reacher", "expert-mix", "leader-only")
    states = np.concatenate([ep["observations"][:-1] for ep in episodes])
    np.testing.assert_allclose(data.states, states, rtol=1e-6)
    np.testing.assert_allclose(data.next_states, np.concatenate([ep["observations"][1:] for ep in episodes]), rtol=1e-6)
    np.testing.assert_allclose(data.observations[0], states[:, [0, 2, 6, 1, 3, 7, 4, 5]], rtol=1e-6)
    np.testing.assert_allclose(data.observations[1], states[:, [0, 2, 6, 1, 3, 7]], rtol=1e-6)
    np.testing.assert_allclose(data.actions[1][:, 0], data.joint_actions[:, 1])
    assert data.timeouts.sum() == 4 and data.terminals.sum() == 0  # Reacher only truncates, at 50 steps
    assert np.flatnonzero(data.timeouts).tolist() == [49, 99, 149, 199]
    np.testing.assert_allclose(data.normalized_score([-40.0, -4.0, -22.0]), [0.0, 1.0, 0.5])


def test_histories_against_hand_built_episodes():
    # Two episodes of lengths 3 and 13 of the coordination game; row t's history is the previous
    # up-to-10 (o, one-hot a) pairs of its own episode, oldest first, left-padded with zeros.
    episode_ids = np.array([0] * 3 + [1] * 13)
    index, next_index = envs.build_history_index(episode_ids, length=10)
    pad = len(episode_ids)
    for t in range(len(episode_ids)):
        start = 0 if t < 3 else 3
        previous = list(range(max(start, t - 10), t))
        expected = [pad] * (10 - len(previous)) + previous
        assert index[t].tolist() == expected, t
        expected_next = (expected + [t])[1:]
        assert next_index[t].tolist() == expected_next, t
    # next history of row t is the history of row t+1 inside an episode
    np.testing.assert_array_equal(next_index[3:15], index[4:16])
    np.testing.assert_array_equal(next_index[0:2], index[1:3])


def test_dataset_histories_hold_the_previous_pairs():
    episodes = _random_episodes("reacher", 2, seed=7)
    envs.write_minari_dataset("reacher", "expert-mix", episodes, -40.0, -4.0, "uniform random", "test")
    data = envs.load_dataset("reacher", "expert-mix", "independent")
    h = data.histories(1, np.array([0, 1, 12, 50, 53]))  # agent 1: (θ2 arm, target) + its action
    assert h.shape == (5, 10, 5 + 1)
    assert np.all(h[0] == 0)  # episode start: all padding
    np.testing.assert_allclose(h[1, -1], np.r_[data.observations[1][0], data.actions[1][0]])
    np.testing.assert_allclose(h[1, :-1], 0)
    np.testing.assert_allclose(h[2], np.c_[data.observations[1][2:12], data.actions[1][2:12]])  # oldest first
    assert np.all(h[3] == 0)  # row 50 starts the second episode: nothing leaks from the first
    np.testing.assert_allclose(h[4, -3:], np.c_[data.observations[1][50:53], data.actions[1][50:53]])
    np.testing.assert_allclose(h[4, :-3], 0)


def test_online_history_matches_dataset_history():
    e = envs.make_env("reacher", "leader-only", seed=2)
    observations, _ = e.reset()
    online = envs.OnlineHistory("reacher", "leader-only", n=1)
    rng = np.random.default_rng(0)
    seen = []
    for t in range(14):
        seen.append([h.copy() for h in online.get()])
        actions = [rng.uniform(-1.5, 1.5, 1).astype(np.float32) for _ in range(2)]
        online.push([o[None] for o in observations], [a[None] for a in actions])
        observations, *_ = e.step(actions)
    # at step 12 the history holds steps 2..11, oldest first, with actions clipped to [-1, 1]
    assert seen[12][0].shape == (1, 10, 8 + 1)
    assert np.all(np.abs(seen[12][1][0, :, -1]) <= 1.0)
    assert np.all(seen[0][0] == 0) and np.all(seen[3][0][0, :7] == 0) and np.any(seen[3][0][0, 7:] != 0)


@pytest.mark.parametrize("name,expected", [("favorable", 0.625), ("neutral", 0.5), ("unfavorable", 0.375)])
def test_coordination_datasets_match_table_1(name, expected):
    data = envs.load_dataset("coordination", name)  # built on demand in the temporary data folder
    score = data.normalized_score(data.episode_returns()).mean()
    assert abs(score - expected) < 0.01, score
    assert abs(data.rewards.mean() - expected) < 0.01
    p1, p2 = envs.COORDINATION_BEHAVIOUR[name]
    assert abs(data.joint_actions[:, 0].mean() - p1) < 0.01 and abs(data.joint_actions[:, 1].mean() - p2) < 0.01
    assert len(data) == envs.COORDINATION_EPISODES * 10
    np.testing.assert_array_equal(data.rewards, data.joint_actions[:, 0] == data.joint_actions[:, 1])
    assert data.timeouts.sum() == envs.COORDINATION_EPISODES and data.terminals.sum() == 0
    assert data.histories(0, np.arange(2)).shape == (2, 10, 1 + 2)  # round index + one-hot action


def test_unknown_names_list_the_valid_choices():
    with pytest.raises(envs.MomaError, match="valid envs: coordination, reacher, ant"):
        envs.make_env("hopper")
    with pytest.raises(envs.MomaError, match="valid choices: all-observant, independent, leader-only"):
        envs.make_env("reacher", "partial")
    with pytest.raises(envs.MomaError, match="valid choices: random, medium, full-replay, expert"):
        envs.load_dataset("ant", "medium-replay", "full")


def test_cli_rejects_unknown_env():
    import tyro

    with pytest.raises(SystemExit):
        tyro.cli(envs.Args, args=["--env", "hopper"])


def test_dataset_with_wrong_shapes_is_rejected_with_both_shapes():
    episodes = _random_episodes("reacher", 1)
    envs.write_minari_dataset("ant", "random", episodes, -40.0, -4.0, "wrong env", "reacher data under an ant id")
    try:
        with pytest.raises(envs.MomaError, match=r"\(10,\).*\(2,\).*\(27,\).*\(8,\)"):
            envs.load_dataset("ant", "random", "partial")
    finally:  # leave no reacher data under the ant id for later tests
        minari.delete_dataset(envs.dataset_id("ant", "random"))


def test_external_dataset_is_never_downloaded():
    with pytest.raises(envs.MomaError, match="never downloads"):
        envs.load_dataset("ant", "mujoco/ant/medium-v0", "full")


def test_farama_ant_observations_are_cut_to_the_state():
    e = envs.make_single_agent_env("ant")
    import gymnasium as gym

    full = gym.make("Ant-v5")  # Farama's datasets use the default 105-dim observation
    s, _ = full.reset(seed=0)
    obs, acts = [s], []
    for _ in range(5):
        a = np.zeros(8, dtype=np.float32)
        s, r, *_ = full.step(a)
        obs.append(s), acts.append(a)
    ep = dict(observations=np.array(obs), actions=np.array(acts), rewards=np.ones(5), terminations=np.zeros(5, bool),
              truncations=np.r_[np.zeros(4, bool), True])
    import minari
    from minari.data_collector import EpisodeBuffer

    minari.create_dataset_from_buffers("mujoco/ant/tiny-v0", [EpisodeBuffer(
        id=0, observations=ep["observations"], actions=ep["actions"], rewards=list(ep["rewards"]),
        terminations=list(ep["terminations"]), truncations=list(ep["truncations"]))], env=full.spec,
        ref_min_score=0.0, ref_max_score=1.0, algorithm_name="t", author="t", author_email="t@t", code_permalink="t",
        description="t")
    data = envs.load_dataset("ant", "mujoco/ant/tiny-v0", "partial")
    assert data.states.shape == (5, 27)
    np.testing.assert_allclose(data.states, np.array(obs)[:-1, :27], rtol=1e-6)
    e.close()


def test_corrupt_dataset_gives_a_clear_error():
    envs.build_dataset("coordination", "favorable", n_transitions=100)
    data_file = envs.dataset_path("coordination", "favorable") / "data" / "main_data.hdf5"
    data_file.write_bytes(b"not an hdf5 file")
    cache = envs.CACHE_DIR / "datasets"
    for f in cache.glob("moma__coordination__favorable*"):
        f.unlink()
    meta = envs.dataset_path("coordination", "favorable") / "data" / "metadata.json"
    meta.write_text(json.dumps(json.loads(meta.read_text())))  # new stamp: the flat cache is stale
    with pytest.raises(envs.MomaError, match="--force"):
        envs.load_dataset("coordination", "favorable")
    envs.build_dataset("coordination", "favorable")  # leave a good dataset for other tests


def test_missing_mujoco_dataset_without_generator_is_a_clear_error(monkeypatch, tmp_path):
    # a checkout without make_datasets.py (the program envs runs to build a missing MuJoCo dataset)
    monkeypatch.setattr(envs, "REPO_DIR", tmp_path)
    with pytest.raises(envs.MomaError, match="moma/ant/expert-v0 is missing and this checkout has no MuJoCo dataset"):
        envs.load_dataset("ant", "expert", "full")


def test_progress_in_a_log_prints_plain_lines(capsys, monkeypatch):
    """Under nohup or Slurm stderr is not a terminal: long phases print a plain line at a steady pace."""
    monkeypatch.setenv("MOMA_PROGRESS_EVERY", "0")
    bar = envs.progress_bar(range(3), total=3, desc="world model test")
    assert isinstance(bar, envs.PlainProgress)  # pytest captures stderr: not a terminal
    for _ in bar:
        bar.set_postfix(loss="0.5")
    bar.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("[world model test] 1/3") and "/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("[world model test] 3/3") and "loss=0.5" in lines[-1]
    assert envs.progress_bar(total=5, desc="short", disable=True).disable  # short phases stay silent


def test_a_dataset_with_non_finite_rewards_is_refused_at_load():
    episodes = [dict(observations=np.zeros((4, 1), np.float32), actions=np.zeros((3, 2), np.int64),
                     rewards=np.array([1.0, float("nan"), 0.0]), terminations=np.zeros(3, bool),
                     truncations=np.array([False, False, True]))]
    envs.write_minari_dataset("coordination", "neutral", episodes, 0.0, 10.0, "test", "a dataset with a NaN reward")
    try:
        with pytest.raises(envs.MomaError, match="non-finite rewards in 1 transitions"):
            envs.load_dataset("coordination", "neutral")
    finally:
        envs.build_coordination_dataset("neutral")  # leave the real dataset for the other tests


def test_concurrent_builds_of_a_missing_dataset_build_it_once(tmp_path):
    """Two processes that find the same dataset missing: one builds it under the lock, the other waits and loads it;
    neither deletes the other's work."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "minari"), MOMA_CACHE_DIR=str(tmp_path / "cache"))
    code = "import envs; print(len(envs.load_dataset('coordination', 'favorable')))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=envs.REPO_DIR, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-500:] for o in outs]
    assert [int(o[0].split()[-1]) for o in outs] == [envs.COORDINATION_EPISODES * envs.COORDINATION_ROUNDS] * 2
    assert not list((tmp_path / "minari" / ".staging").glob("*"))  # nothing half-written left behind


def test_an_interrupted_write_leaves_no_dataset_behind(monkeypatch):
    import minari

    def dies_half_way(dataset_id, *args, **kwargs):  # as a build killed while Minari writes its files
        path = minari.storage.get_dataset_path(dataset_id) / "data"
        path.mkdir(parents=True)
        (path / "metadata.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(minari, "create_dataset_from_buffers", dies_half_way)
    episodes = [dict(observations=np.zeros((3, 1), np.float32), actions=np.zeros((2, 2), np.int64),
                     rewards=np.zeros(2), terminations=np.zeros(2, bool), truncations=np.array([False, True]))]
    existed = envs.dataset_exists("coordination", "favorable")
    with pytest.raises(KeyboardInterrupt):
        envs.write_minari_dataset("coordination", "favorable", episodes, 0.0, 10.0, "test", "interrupted")
    assert envs.dataset_exists("coordination", "favorable") == existed  # the earlier dataset (if any) is intact
    assert not list((envs.DATA_DIR / ".staging").glob("*"))


def test_a_build_killed_with_sigkill_leaves_no_dataset_and_the_next_load_rebuilds_it(tmp_path):
    """A real kill (SIGKILL: no `finally`, no cleanup) in the middle of Minari's write: no dataset appears, and the
    next load builds it from scratch, dropping the dead build's staging folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "minari"), MOMA_CACHE_DIR=str(tmp_path / "cache"))
    # the child writes part of the files in its staging folder, then hangs there until it is killed
    code = """if True:
        import pathlib, time, minari, numpy as np, envs
        def hangs_half_way(dataset_id, *args, **kwargs):
            path = minari.storage.get_dataset_path(dataset_id) / "data"
            path.mkdir(parents=True)
            (path / "metadata.json").write_text("{}")
            time.sleep(600)
        minari.create_dataset_from_buffers = hangs_half_way
        episodes = [dict(observations=np.zeros((3, 1), np.float32), actions=np.zeros((2, 2), np.int64),
                         rewards=np.zeros(2), terminations=np.zeros(2, bool), truncations=np.array([False, True]))]
        envs.write_minari_dataset("coordination", "favorable", episodes, 0.0, 10.0, "test", "killed")
    """
    child = subprocess.Popen([sys.executable, "-c", code], cwd=envs.REPO_DIR, env=env)
    staging = tmp_path / "minari" / ".staging"
    deadline = time.time() + 120
    while not list(staging.glob("*/**/metadata.json")) and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert list(staging.glob("*/**/metadata.json")), "the child never reached the write"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert list(staging.glob("*")), "the killed build's staging folder is left (nothing cleaned it)"
    check = "import envs; print(envs.dataset_exists('coordination', 'favorable'))"
    out = subprocess.run([sys.executable, "-c", check], cwd=envs.REPO_DIR, env=env, capture_output=True, text=True)
    assert out.stdout.split()[-1] == "False", out.stderr[-500:]  # half a dataset is not a dataset
    load = "import envs; print(len(envs.load_dataset('coordination', 'favorable')))"
    out = subprocess.run([sys.executable, "-c", load], cwd=envs.REPO_DIR, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-500:]
    assert int(out.stdout.split()[-1]) == envs.COORDINATION_EPISODES * envs.COORDINATION_ROUNDS
    assert not list(staging.glob("*"))  # the dead build's folder is gone
