"""make_datasets.py and the behaviour learners: the reacher mirror map and convention classifier, tiny generation
round trips through minari.load_dataset, reference scores, the shipped policies read without the training scripts,
td3_ant.py's replay bookkeeping and export, mappo.py's policy file. Small budgets."""

import dataclasses
import json
import os
import subprocess
import sys

import minari
import numpy as np
import pytest
import torch

import envs
import make_datasets as md
import td3_ant


# ---------------------------------------------------------------------------------------------------
# Reacher conventions and the mirror map
# ---------------------------------------------------------------------------------------------------
def _reacher_state(theta1, theta2, target=(0.1, 0.05), vel=(0.0, 0.0), tip=(0.0, 0.0)):
    return np.array([np.cos(theta1), np.cos(theta2), np.sin(theta1), np.sin(theta2), *target, *vel, *tip],
                    dtype=np.float32)


def test_convention_classifier_on_hand_made_states():
    ccw = np.stack([_reacher_state(0.3, 1.2)] * 12)  # elbow bent counter-clockwise (θ2 > 0)
    cw = np.stack([_reacher_state(-0.3, -1.2)] * 12)
    assert envs.reacher_convention(ccw) == 1
    assert envs.reacher_convention(cw) == -1
    assert np.isclose(envs.reacher_theta2(_reacher_state(0.0, 2.5)), 2.5, atol=1e-6)
    assert np.isclose(envs.reacher_theta2(_reacher_state(0.0, -2.5)), -2.5, atol=1e-6)
    # Only the last states (at the target) count: an episode that swings through θ2 < 0 first is ccw.
    swing = np.stack([_reacher_state(0.0, -1.0)] * 40 + [_reacher_state(0.0, 0.8)] * 10)
    assert envs.reacher_convention(swing) == 1
    # batched over episodes
    assert envs.reacher_convention(np.stack([ccw, cw])).tolist() == [1, -1]
    # the mirror map flips the convention
    assert envs.reacher_convention(md.mirror_reacher_states(ccw)) == -1


def test_mirror_map_is_exact_on_the_simulator():
    """Mirror a real trajectory (states and actions); the simulator started from the mirrored state and
    driven by the mirrored actions must produce exactly the mirrored states."""
    rng = np.random.default_rng(0)
    real, mirrored = envs.make_env("reacher"), envs.make_env("reacher")
    _, s = real.reset(seed=3)
    # give the arm some velocity first, so the check covers the dynamics, not just a resting arm
    for _ in range(5):
        _, s, _, _, _ = real.step([rng.uniform(-1, 1, 1), rng.uniform(-1, 1, 1)])
    mirrored.reset(seed=4)
    real.set_state(s)  # both simulators start from float32 states
    mirrored.set_state(md.mirror_reacher_states(s))
    max_err, rewards = 0.0, []
    for _ in range(50):
        a = rng.uniform(-1, 1, 2).astype(np.float32)
        _, s, r, _, _ = real.step([a[:1], a[1:]])
        ma = md.mirror_reacher_actions(a)
        _, ms, mr, _, _ = mirrored.step([ma[:1], ma[1:]])
        max_err = max(max_err, np.abs(md.mirror_reacher_states(s) - ms).max())
        rewards.append((r, mr))
    assert max_err < 1e-5, max_err
    r, mr = np.array(rewards).T
    np.testing.assert_allclose(r, mr, atol=1e-6)  # the reward is mirror invariant too
    assert np.abs(s[[2, 3, 6, 7]]).max() > 1e-2  # the compared states are not trivially symmetric


def test_mirrored_policy_acts_as_reflection():
    class Linear:
        def act(self, states, greedy, generator=None):
            return np.clip(states[:, [2, 3]] * 0.5 + states[:, [5, 9]], -1, 1)

    states = np.stack([_reacher_state(0.4, 1.0, target=(0.1, 0.07), tip=(0.02, -0.03))])
    pol = md.MirroredPolicy(Linear())
    np.testing.assert_allclose(pol.act(states, True), -Linear().act(md.mirror_reacher_states(states), True))


# ---------------------------------------------------------------------------------------------------
# Tiny generation round trips through minari.load_dataset
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def few_ref_episodes(monkeypatch):
    monkeypatch.setattr(md, "REF_EPISODES", 3)


def _check_minari(env, name, n, trained_expert=True):
    ds = minari.load_dataset(envs.dataset_id(env, name))
    assert ds.total_steps == n
    meta = ds.storage.metadata
    if trained_expert:  # a tiny untrained "expert" may score below uniform random
        assert meta["ref_min_score"] < meta["ref_max_score"]
    data = envs.load_dataset(env, name)
    assert len(data) == n
    assert data.joint_actions.min() >= -1 and data.joint_actions.max() <= 1
    # stored episodes are consistent: next state of row t is the state of row t+1 inside an episode
    same = data.episode_ids[1:] == data.episode_ids[:-1]
    np.testing.assert_array_equal(data.next_states[:-1][same], data.states[1:][same])
    return ds, data


def test_reacher_expert_mix_round_trip(few_ref_episodes):
    info = md.build("reacher", "expert-mix", n_transitions=400, seed=0)
    ds, data = _check_minari("reacher", "expert-mix", 400)
    assert ds.total_episodes == 8  # 50-step episodes, 4 from the expert, 4 from its mirror
    assert data.timeouts.sum() == 8 and data.terminals.sum() == 0
    # The builder promises half the episodes from the expert (bending counter-clockwise, θ2 > 0 at the target)
    # then half from its mirror image (clockwise, θ2 < 0). Measured here from the stored states alone, θ2 =
    # atan2(sin θ2, cos θ2) over each episode's last 10 states, with a margin, so that the two shares are
    # counted separately (an episode ending near θ2 = 0 counts for neither); the shipped expert ends at
    # |θ2| >= 0.26 rad in every one of 80 measured episodes, its mirror likewise.
    theta2 = np.array([np.arctan2(data.next_states[data.episode_ids == e, 3],
                                  data.next_states[data.episode_ids == e, 1])[-10:].mean()
                       for e in np.unique(data.episode_ids)])
    ccw, cw = theta2 > 0.1, theta2 < -0.1
    assert ccw.mean() == pytest.approx(0.5, abs=0.125), theta2  # one episode of 8 may miss
    assert cw.mean() == pytest.approx(0.5, abs=0.125), theta2
    assert ccw[:4].mean() >= 0.75 and cw[4:].mean() >= 0.75, theta2  # the expert first, then its mirror
    # and the builder's report agrees with what was stored
    assert info["counter_clockwise_share"] == pytest.approx(np.mean(theta2 >= 0))
    assert info["expert_ccw_share"] >= 0.75 and info["mirror_ccw_share"] <= 0.25, info
    builds = md.build_records()
    assert builds["moma/reacher/expert-mix-v0"]["build_time_s"] >= 0
    # true metadata only: no made-up code permalink or author e-mail (Minari accepts None)
    assert ds.storage.metadata.get("code_permalink") is None and ds.storage.metadata.get("author_email") is None


def test_shipped_reacher_expert_bends_one_way_and_mirror_the_other():
    expert = md.load_policy(md.SHIPPED["reacher_expert"])
    a = md.collect_episodes("reacher", expert, 500, seed=5)
    b = md.collect_episodes("reacher", md.MirroredPolicy(expert), 500, seed=5)
    ca = np.array([envs.reacher_convention(e["observations"][1:]) for e in a])
    cb = np.array([envs.reacher_convention(e["observations"][1:]) for e in b])
    # the shipped expert bends counter-clockwise (θ2 >= 0) for (nearly) every target, its mirror clockwise
    assert (ca == 1).mean() >= 0.8, (ca == 1).mean()
    assert (cb == -1).mean() >= 0.8, (cb == -1).mean()
    # and both reach: sampled-action returns well above uniform random torques (about -43)
    assert np.mean([e["rewards"].sum() for e in a + b]) > -10


@pytest.mark.parametrize("name", ["random", "expert"])
def test_ant_round_trip(name, few_ref_episodes):
    md.build("ant", name, n_transitions=300, seed=0)
    _check_minari("ant", name, 300)


def test_reference_scores_sane(few_ref_episodes):
    lo, hi = md.reference_scores("reacher")
    assert hi > lo
    assert -60 < lo < -20  # uniform random torques: distance plus a large control cost per 50 steps
    assert -10 < hi < 0  # the expert reaches the target
    lo_a, hi_a = md.reference_scores("ant")
    assert hi_a > lo_a + 500  # the shipped Ant expert walks


def test_collect_is_exact_and_reproducible():
    pol = md.UniformRandomPolicy(2, seed=1)
    eps = md.collect_episodes("reacher", pol, 120, seed=7)
    assert sum(len(e["rewards"]) for e in eps) == 120
    assert eps[-1]["truncations"][-1]  # the cut episode ends as a timeout
    eps2 = md.collect_episodes("reacher", md.UniformRandomPolicy(2, seed=1), 120, seed=7)
    np.testing.assert_array_equal(eps[0]["observations"], eps2[0]["observations"])


def test_reference_episodes_in_worker_processes_match_the_serial_ones():
    """`make_datasets.py build --workers 2` plays the reference episodes (random, expert, zero torque) in separate
    processes: each part draws only from its own generators, so the scores are those of the serial computation."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {part: pool.submit(md.reference_returns, "reacher", 0, part) for part in md.REFERENCE_PARTS}
        parallel = {part: job.result() for part, job in jobs.items()}
    for part in md.REFERENCE_PARTS:
        assert len(parallel[part]) == md.REF_EPISODES
        np.testing.assert_array_equal(parallel[part], md.reference_returns("reacher", 0, part))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lean_ant_step_is_bit_identical_to_gymnasium(dtype):
    """The dataset builds step Ant through make_datasets.LeanAntStep: the same observation, reward and terminal as
    gymnasium's Ant-v5 step, bit for bit, over random episodes that fall (uniform random torques fall within a few
    hundred steps) and with actions of either float width."""
    rng = np.random.default_rng(0)
    falls = steps = 0
    for episode in range(4):
        reference, lean_sim = envs.make_single_agent_env("ant"), envs.make_single_agent_env("ant")
        lean = md.LeanAntStep(lean_sim)
        np.testing.assert_array_equal(reference.reset(seed=episode)[0], lean_sim.reset(seed=episode)[0])
        for _ in range(1000):
            action = rng.uniform(-1, 1, 8).astype(dtype)
            o1, r1, term1, _, _ = reference.step(action)
            o2, r2, term2 = lean.step(action)
            steps += 1
            np.testing.assert_array_equal(o1, o2)
            assert r1 == r2 and type(r1) is type(r2) and bool(term1) == bool(term2)
            if term1:
                falls += 1
                break
    assert falls >= 3 and steps > 200


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lean_reacher_step_is_bit_identical_to_gymnasium(dtype):
    rng = np.random.default_rng(1)
    for episode in range(3):
        reference, lean_sim = envs.make_single_agent_env("reacher"), envs.make_single_agent_env("reacher")
        lean = md.LeanReacherStep(lean_sim)
        np.testing.assert_array_equal(reference.reset(seed=episode)[0], lean_sim.reset(seed=episode)[0])
        for _ in range(50):
            action = rng.uniform(-1, 1, 2).astype(dtype)
            o1, r1, term1, _, _ = reference.step(action)
            o2, r2, term2 = lean.step(action)
            np.testing.assert_array_equal(o1, o2)
            assert r1 == r2 and type(r1) is type(r2) and term1 is False and term2 is False


def test_reacher_collection_replays_step_for_step_in_gymnasium():
    episodes = md.collect_episodes("reacher", md.load_policy(md.SHIPPED["reacher_expert"]), 230, seed=4, n_envs=3)
    assert [len(e["rewards"]) for e in episodes] == [50, 50, 50, 50, 30] and episodes[-1]["truncations"][-1]
    for k, ep in enumerate(episodes):
        sim = envs.make_single_agent_env("reacher")
        np.testing.assert_array_equal(ep["observations"][0], sim.reset(seed=4 * 1_000_003 + k)[0].astype(np.float32))
        for t, action in enumerate(ep["actions"]):
            o, r, term, trunc, _ = sim.step(action)
            np.testing.assert_array_equal(ep["observations"][t + 1], o.astype(np.float32))
            assert ep["rewards"][t] == float(r) and not ep["terminations"][t]
            cut_here = k == len(episodes) - 1 and t == len(ep["actions"]) - 1  # the cut episode ends as a timeout
            assert ep["truncations"][t] == (trunc or cut_here)


@pytest.mark.parametrize("policy,n", [(md.ZeroPolicy(8), 1100), (md.UniformRandomPolicy(8, seed=3), 700)])
def test_ant_collection_replays_step_for_step_in_gymnasium(policy, n):
    """Each collected Ant episode, its actions replayed in a plain gymnasium env from the same reset seed, gives the
    same observations, rewards and terminals; a standing team's first episode ends at the 1,000-step time limit."""
    episodes = md.collect_episodes("ant", policy, n, seed=5, n_envs=3)
    assert sum(len(e["rewards"]) for e in episodes) == n
    if isinstance(policy, md.ZeroPolicy):
        assert len(episodes[0]["rewards"]) == 1000 and episodes[0]["truncations"][-1]
        assert not episodes[0]["truncations"][:-1].any() and not episodes[0]["terminations"].any()
    else:
        assert any(e["terminations"].any() for e in episodes)
    for k, ep in enumerate(episodes):
        sim = envs.make_single_agent_env("ant")
        np.testing.assert_array_equal(ep["observations"][0], sim.reset(seed=5 * 1_000_003 + k)[0].astype(np.float32))
        for t, action in enumerate(ep["actions"]):
            o, r, term, trunc, _ = sim.step(action)
            np.testing.assert_array_equal(ep["observations"][t + 1], o.astype(np.float32))
            assert ep["rewards"][t] == float(r) and ep["terminations"][t] == term
            if t < len(ep["actions"]) - 1:
                assert ep["truncations"][t] == trunc


# ---------------------------------------------------------------------------------------------------
# The Ant learner: checkpoint / resume and the replay it keeps for full-replay
# ---------------------------------------------------------------------------------------------------
def test_ant_learner_checkpoint_resume_and_replay(tmp_path):
    cfg = td3_ant.Args(total_steps=1200, learning_starts=500, batch_size=32, hidden=16, checkpoint_every_s=0.2,
                       snapshot_every=600, snapshot_eval_episodes=1, stop_above=None)
    logs = []
    td3_ant.train(cfg, out_dir=tmp_path, log=logs.append)
    with pytest.raises(envs.MomaError):
        td3_ant.train(cfg, out_dir=tmp_path, log=logs.append)  # refuses to overwrite without --resume
    # The replay chunks are the learner's whole buffer: replaying its actions in a fresh simulator with the
    # learner's reset seeds reproduces every stored state, reward and flag exactly (Ant is deterministic).
    buf = td3_ant.load_td3_replay(tmp_path, 1200)
    sim = envs.make_single_agent_env("ant")
    obs = sim.reset(seed=cfg.seed * 100_003)[0]
    for t in range(1200):
        np.testing.assert_array_equal(buf["obs"][t], obs.astype(np.float32))
        nxt, r, term, trunc, _ = sim.step(buf["act"][t])
        np.testing.assert_array_equal(buf["next_obs"][t], nxt.astype(np.float32))
        assert buf["rew"][t] == np.float32(r) and buf["term"][t] == term and buf["trunc"][t] == trunc
        obs = sim.reset()[0] if (term or trunc) else nxt
    assert (np.abs(buf["act"][:500]) <= 1).all() and buf["act"][:500].std() > 0.5  # uniform warm-up
    td3_ant.train(dataclasses.replace(cfg, total_steps=1500, resume=True), out_dir=tmp_path, log=logs.append)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 1500 and ck["n_resumes"] == 1
    assert ck["config"] == dict(td3_ant.learner_config(cfg), total_steps=1500)  # the settings, not the switches
    np.testing.assert_array_equal(td3_ant.load_td3_replay(tmp_path, 1500)["obs"][:1200], buf["obs"])  # kept on resume
    assert [s[0] for s in td3_ant.list_snapshots(tmp_path)] == [600, 1200]
    episodes = md.replay_episodes(tmp_path, 1500, 10**9)
    total = sum(len(e["rewards"]) for e in episodes)
    assert 1200 - 1000 <= total <= 1500  # all but the episodes still open at the end
    for e in episodes:
        T = len(e["rewards"])
        assert e["observations"].shape == (T + 1, 27) and e["actions"].shape == (T, 8)
        assert e["terminations"][-1] or e["truncations"][-1]
        assert not (e["terminations"][:-1].any() or e["truncations"][:-1].any())
    # the shipped-policy format: a relu, tanh-squashed actor whose sampled actions carry the exploration noise
    snap = md.load_gaussian_policy(torch.load(td3_ant.list_snapshots(tmp_path)[-1][2], weights_only=False))
    assert snap.activation == "relu" and snap.squash
    states = buf["obs"][:64]
    greedy = snap.act(states, greedy=True)
    noisy = snap.act(states, greedy=False, generator=torch.Generator().manual_seed(0))
    assert np.abs(greedy).max() <= 1 and 0.05 < np.std(noisy - greedy) < 0.15  # noise std 0.1 (clipped at ±1)


# ---------------------------------------------------------------------------------------------------
# mappo.py: a tiny run writes the summary, a loadable policy file, and resumes
# ---------------------------------------------------------------------------------------------------
def test_mappo_smoke_resume_and_policy_file(tmp_path):
    import mappo

    run = tmp_path / "run"
    args = mappo.Args(env="reacher", total_steps=2 * 4 * 50, num_envs=4, hidden=16, minibatch_size=64,
                      update_epochs=1, eval_every=1, eval_episodes=2, checkpoint_every=1, run_dir=str(run),
                      policy_out=str(tmp_path / "policy.pt"))
    summary = mappo.main(args)
    keys = {"algorithm", "env", "obs", "dataset_id", "seed", "config", "eval_episodes", "normalized_score_mean",
            "normalized_score_std", "episode_returns", "episode_normalized_scores", "train_steps", "wall_time_s",
            "git_commit"}
    assert set(json.loads((run / "summary.json").read_text())) == keys
    assert summary["train_steps"] == 400 and len(summary["episode_returns"]) == 2
    args.total_steps, args.resume = 3 * 4 * 50, True
    assert mappo.main(args)["train_steps"] == 600
    policy = md.load_policy(tmp_path / "policy.pt")  # read by the dataset builder, without mappo.py
    states = np.stack([_reacher_state(0.1, 0.2), _reacher_state(-1.0, 2.0), _reacher_state(2.5, -0.4)])
    a = policy.act(states, greedy=True)
    assert a.shape == (3, 2) and np.abs(a).max() <= 1
    np.testing.assert_array_equal(a, policy.act(states, greedy=True))  # greedy is deterministic
    # the same actions as mappo's own networks, greedy and sampled (the file holds the final policy)
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    agents = mappo.MAPPOAgents(envs.obs_dims("reacher", "all-observant"), 1, envs.STATE_DIM["reacher"], 16,
                               envs.obs_indices("reacher", "all-observant"))
    agents.load_state_dict(ck["agents"])
    with torch.no_grad():
        d = agents.dist(agents.stack_obs(envs.split_state("reacher", "all-observant", states)))
        noise = torch.randn(d.mean.shape, generator=torch.Generator().manual_seed(5))
    sampled = d.mean + d.stddev * noise
    for greedy, ours in ((True, d.mean), (False, sampled)):
        expected = np.clip(envs.join_actions("reacher", [ours[i].numpy() for i in range(2)]), -1, 1)
        got = policy.act(states, greedy=greedy, generator=torch.Generator().manual_seed(5))
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(envs.MomaError):
        mappo.main(mappo.Args(env="coordination", run_dir=str(tmp_path / "x")))


# ---------------------------------------------------------------------------------------------------
# Shipping the Ant policies: expert choice, the medium search, and full-replay re-enacted from snapshots
# ---------------------------------------------------------------------------------------------------
def test_export_then_full_replay_from_snapshots_round_trips(tmp_path, monkeypatch, few_ref_episodes):
    cfg = td3_ant.Args(total_steps=1500, learning_starts=500, batch_size=32, hidden=16, checkpoint_every_s=1e9,
                       snapshot_every=250, snapshot_eval_episodes=1, stop_above=None)
    td3_ant.train(cfg, out_dir=tmp_path / "learner", log=lambda *a: None)
    # the export goes into the learner's folder by default: the shipped files stay as they are
    before = {f.name: f.read_bytes() for f in md.POLICY_DIR.glob("*.pt")}
    export = tmp_path / "learner" / "export"
    shipped = {k: export / f"{k}.pt" for k in ("reacher_expert", "ant_expert", "ant_medium")}
    monkeypatch.setattr(md, "SHIPPED", shipped)
    monkeypatch.setattr(md, "ANT_REPLAY_SNAPSHOTS", export / "ant_replay_snapshots.pt")
    monkeypatch.setattr(td3_ant, "ANT_TD3_RESUME", export / "ant_td3_resume.pt")
    logs = []
    info = td3_ant.export(tmp_path / "learner", n_replay_snapshots=4, eval_episodes=1, expert_min_step=1000,
                          medium_search=dict(noises=(0.1, 0.3), n_episodes=1, n_confirm=1, greedy_range=(-1e9, 1e9)),
                          log=logs.append)
    assert {f.name: f.read_bytes() for f in md.POLICY_DIR.glob("*.pt")} == before
    assert sorted(f.name for f in export.iterdir()) == sorted(f"{k}.pt" for k in td3_ant.SHIPPED_FILES)
    # expert: the best of the snapshots at >= 1000 steps and the final policy; medium: a snapshot before it
    assert info["expert_step"] in (1000, 1250, 1500)
    assert 500 < info["medium_step"] < info["expert_step"] and info["medium_noise"] in (0.1, 0.3)
    medium = md.load_policy(shipped["ant_medium"])
    assert np.isclose(medium.log_std.exp().mean().item(), info["medium_noise"])  # the dataset acts with σ
    search = medium.meta["search"]
    assert len(search["candidates"]) == 2 * len([s for s in td3_ant.list_snapshots(tmp_path / "learner")
                                                 if 500 < s[0] < info["expert_step"]])
    assert search["choice"] == min(search["confirmed"], key=lambda r: r["distance"])
    # replay snapshots: 4 equal intervals of the learner's steps from its warm-up to the expert, each played by
    # the snapshot nearest its middle
    blob = torch.load(md.ANT_REPLAY_SNAPSHOTS, weights_only=False)
    covers = [b["meta"]["covers"] for b in blob["snapshots"]]
    assert covers[0][0] == 500 and covers[-1][1] == info["expert_step"]
    assert all(a[1] == b[0] for a, b in zip(covers, covers[1:]))
    for b in blob["snapshots"]:
        assert abs(b["meta"]["step"] - sum(b["meta"]["covers"]) / 2) <= 125 + 1e-9
    assert blob["buffer_stats"]["transitions"] == info["expert_step"]
    # a fresh-clone build of a small slice: warm-up share uniform random, the rest by the snapshots
    built = md.build("ant", "full-replay", n_transitions=400, seed=0)
    assert built["source"] == "snapshots"
    _check_minari("ant", "full-replay", 400, trained_expert=False)
    # another machine continues the learner from the shipped state, its buffer re-enacted from the snapshots
    logs = []
    td3_ant.train(dataclasses.replace(cfg, total_steps=1700, resume=True), out_dir=tmp_path / "elsewhere", log=logs.append)
    assert any("resumed the shipped learner state" in line for line in logs)
    ck = torch.load(tmp_path / "elsewhere" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 1700 and ck["n_resumes"] == 1
    shipped = torch.load(td3_ant.ANT_TD3_RESUME, weights_only=False)
    assert shipped["step"] == 1500
    replay = td3_ant.load_td3_replay(tmp_path / "elsewhere", 1700)  # rows [0, 1500) re-enacted, then 200 new ones
    assert len(replay["rew"]) == 1700 and np.abs(replay["obs"][:1500]).sum() > 0


def test_zero_action_score_is_computed_from_the_simulator(few_ref_episodes):
    """Standing still on Ant-v5: zero torque keeps the torso healthy for 1000 steps (healthy reward 1 per step,
    minus a small contact cost), computed here from the simulator, never copied."""
    lo, hi = md.reference_scores("ant")
    zero = md.zero_action_return("ant")
    direct = md.policy_returns("ant", md.ZeroPolicy(8), 3, seed=20202)
    assert zero == pytest.approx(direct.mean())
    assert 900 < zero <= 1000
    assert 0 < (zero - lo) / (hi - lo) < 0.5  # the expert walks far beyond standing still
def test_shipped_ant_policies_have_table2_shape(few_ref_episodes):
    """The shipped medium, acting with its noise, scores about Table 2's share of the expert set's mean (68%), and
    the expert walks: a handful of seeded episodes; fails if a wrong snapshot (or the expert) is shipped as medium."""
    ref_min, ref_max = md.reference_scores("ant")
    expert = md.load_policy(md.SHIPPED["ant_expert"])
    medium = md.load_policy(md.SHIPPED["ant_medium"])
    to_pct = lambda r: 100 * (r - ref_min) / (ref_max - ref_min)  # noqa: E731
    expert_set = to_pct(md.episode_returns(expert, "ant", 6, seed=123, greedy=False)[0]).mean()
    medium_set = to_pct(md.episode_returns(medium, "ant", 6, seed=123, greedy=False)[0]).mean()
    share = 100 * medium_set / expert_set
    assert abs(share - md.ANT_MEDIUM_TARGET[0]) < 15, share
    assert md.episode_returns(expert, "ant", 3, seed=321, greedy=True)[0].mean() > 3000


def test_partial_build_leaves_the_dataset_page_alone(monkeypatch, few_ref_episodes):
    # `make_datasets.py build --only ant/random` on a machine without the other four sets must not rewrite
    # docs/datasets.md with one row (it did: the committed page lost four datasets' cards)
    written = []
    monkeypatch.setattr(md, "dataset_cards", lambda *a, **k: written.append(a))
    md.main(md.Build(only="ant/random", n_transitions=300))
    assert envs.dataset_exists("ant", "random")
    assert not all(envs.dataset_exists(e, n) for e, n in md.MUJOCO_DATASETS)
    assert written == []


def test_a_parallel_build_writes_the_datasets_a_serial_build_writes(monkeypatch):
    """`make_datasets.py build --workers 2` (one pool: reference episodes, the builds, full-replay split into its
    snapshot collections and written here) gives every dataset the content fingerprint of `--workers 1`."""
    monkeypatch.setattr(md, "dataset_cards", lambda *a, **k: None)  # never the repository's docs/datasets.md
    # The workers are new processes (REF_EPISODES = 100 there): give both builds the same cached reference scores,
    # so that this test plays no reference episodes; the scores only enter the metadata, not the fingerprints.
    cache = envs.CACHE_DIR / "reference_scores.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(cache.read_text()) if cache.exists() else {}
    for env, lo, hi in (("reacher", -43.0, -4.0), ("ant", -53.0, 4861.0)):
        key = f"{env}:{md._file_key(md.SHIPPED[f'{env}_expert'])}:0:{md.REF_EPISODES}"
        table.setdefault(key, dict(ref_min=lo, ref_max=hi, ref_min_std=1.0, ref_max_std=1.0, zero_action=0.0))
    cache.write_text(json.dumps(table))
    fingerprints = {}
    for workers in (1, 2):
        md.main(md.Build(n_transitions=1500, workers=workers))
        fingerprints[workers] = {d: envs.dataset_fingerprint(*d) for d in md.MUJOCO_DATASETS}
    assert fingerprints[1] == fingerprints[2] and None not in fingerprints[1].values()
    builds = json.loads((envs.DATA_DIR / "moma" / "builds" / "moma__ant__full-replay-v0.json").read_text())
    assert builds["cpu_time_s"] > 0 and builds["source"] == "snapshots"


def test_shipped_policies_load_without_any_training_script():
    """make_datasets.py reads every shipped policy file on its own: neither it nor envs imports mappo.py,
    td3_ant.py or an algorithm script (no import circle through a training script)."""
    code = ("import sys, numpy as np, envs, make_datasets as md\n"
            "for key, path in md.SHIPPED.items():\n"
            "    env = key.split('_')[0]\n"
            "    a = md.load_policy(path).act(np.zeros((2, envs.STATE_DIM[env]), np.float32), greedy=True)\n"
            "    assert a.shape == (2, envs.JOINT_ACTION_DIM[env]), a.shape\n"
            "scripts = {'mappo', 'td3_ant', 'moma_ppo', 'world_model', 'iql', 'maiql', 'ibc', 'itd3bc', 'icql', 'omar'}\n"
            "print(sorted(scripts & set(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=md.REPO_DIR, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_make_datasets_command_line_has_subcommands():
    import tyro

    parse = lambda argv: tyro.cli(md.Command, args=argv, default=md.Build())  # noqa: E731 (as its __main__)
    assert parse([]) == md.Build()  # no subcommand: build all five
    assert parse(["build", "--only", "ant/medium", "--n-transitions", "2000"]) == md.Build(only="ant/medium",
                                                                                          n_transitions=2000)
    assert parse(["cards"]) == md.Cards() and parse(["update-refs", "--seed", "1"]) == md.UpdateRefs(seed=1)



# ---------------------------------------------------------------------------------------------------
# make_datasets.py build: checked arguments, the per-dataset build lock, no import of results.py
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, flag", [(dict(n_transitions=0), "--n-transitions"), (dict(n_transitions=-5), "--n-transitions"),
                                       (dict(seed=-1), "--seed"), (dict(workers=0), "--workers")])
def test_build_refuses_bad_arguments_before_any_work(monkeypatch, bad, flag):
    """--n-transitions 0 was a silent 1M build (`n_transitions or 1_000_000`)."""
    work = []
    monkeypatch.setattr(md, "reference_scores", lambda *a, **k: work.append(a))
    monkeypatch.setattr(md, "build_locked", lambda *a, **k: work.append(a))
    with pytest.raises(envs.MomaError, match=flag):
        md.main(md.Build(only="ant/random", **bad))
    assert work == []
    if "workers" not in bad:
        with pytest.raises(envs.MomaError, match=flag):  # envs.build_dataset's hook checks too
            md.build("ant", "random", **bad)
    with pytest.raises(envs.MomaError, match="--seed"):
        md.main(md.UpdateRefs(seed=-1))


def test_make_datasets_build_holds_the_dataset_lock(monkeypatch):
    """`make_datasets.py build` takes the lock envs.build_dataset takes, so it never writes a dataset at the same
    time as a script that found it missing (the second waits, then finds it built)."""
    import fcntl

    held = []

    def fake_build(env, dataset, *a):
        lock = envs.DATA_DIR / ".locks" / (envs.dataset_id(env, dataset).replace("/", "__") + ".lock")
        with open(lock, "w") as other:  # another open file: blocks if anyone (this process included) holds it
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
                fcntl.flock(other, fcntl.LOCK_UN)
            except BlockingIOError:
                held.append(True)
        return dict(build_time_s=0.0)
    monkeypatch.setattr(md, "build", fake_build)
    monkeypatch.setattr(md, "reference_scores", lambda *a, **k: (0.0, 1.0))
    monkeypatch.setattr(md, "_report_build", lambda *a: None)
    monkeypatch.setattr(md, "dataset_cards", lambda *a, **k: None)
    md.main(md.Build(only="ant/medium", n_transitions=10, workers=1))
    assert held == [True]


def test_cards_read_world_model_reports_without_results_py(tmp_path):
    """The cards' world-model rows come from results/world_models/*.json read here, in the format results.py's table
    shows too (it calls this module's row function), and building the cards never imports results.py."""
    import results

    reports = results.load_world_model_reports()
    assert "\n".join(md.WORLD_MODEL_HEADER + [md.world_model_row(r) for r in reports]) in "\n".join(
        results.world_model_tables(reports))
    code = "import sys, make_datasets as md\nmd._world_model_rows()\nmd.dataset_cards(path=None)\nprint('results' in sys.modules)\n"
    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "none"))  # no dataset: no reference scores to compute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=md.REPO_DIR, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_shipped_policy_files_load_as_plain_tensors():
    """Every shipped file loads with torch.load(weights_only=True): nothing in them is unpickled as code."""
    files = sorted(md.POLICY_DIR.glob("*.pt"))
    assert len(files) == 5
    for f in files:
        torch.load(f, weights_only=True)


def test_a_missing_mujoco_dataset_is_built_by_make_datasets_as_a_program(monkeypatch):
    """envs.build_dataset hands MuJoCo datasets to `make_datasets.py build` in a process of its own (which takes the
    dataset's lock itself), so envs never imports the generator that imports it: no import circle."""
    import subprocess as sp

    calls = []
    monkeypatch.setattr(sp, "run", lambda command, **kw: calls.append((command, kw)) or sp.CompletedProcess(command, 0))
    envs.build_dataset("ant", "medium", n_transitions=300, seed=2, only_if_missing=True)
    (command, kw), = calls
    assert command[1:] == [str(md.REPO_DIR / "make_datasets.py"), "build", "--only", "ant/medium", "--seed", "2",
                           "--n-transitions", "300", "--if-missing"]
    assert kw["env"]["MINARI_DATASETS_PATH"] == str(envs.DATA_DIR) and kw["env"]["MOMA_CACHE_DIR"] == str(envs.CACHE_DIR)
    monkeypatch.setattr(sp, "run", lambda command, **kw: sp.CompletedProcess(command, 3))
    with pytest.raises(envs.MomaError, match="building dataset moma/ant/medium-v0 failed \\(exit status 3"):
        envs.build_dataset("ant", "medium")
    assert "import make_datasets" not in (md.REPO_DIR / "envs.py").read_text()


def test_build_if_missing_skips_a_dataset_another_process_built(monkeypatch):
    built = []
    monkeypatch.setattr(md, "build", lambda env, dataset, *a: built.append(dataset) or dict(build_time_s=0.0))
    monkeypatch.setattr(md, "reference_scores", lambda *a, **k: (0.0, 1.0))
    monkeypatch.setattr(md, "dataset_cards", lambda *a, **k: None)
    monkeypatch.setattr(envs, "dataset_exists", lambda env, dataset: dataset == "medium")
    reported = []
    monkeypatch.setattr(md, "_report_build", lambda env, name, info, log: reported.append((name, info)))
    md.main(md.Build(only="ant/medium", if_missing=True, workers=1))
    md.main(md.Build(only="ant/expert", if_missing=True, workers=1))
    assert built == ["expert"] and reported == [("medium", None), ("expert", dict(build_time_s=0.0))]
