"""Tests of world_model.py: the paper's ensemble statistics (§3.1) against NumPy on hand-made predictions,
clipping, elites, learning a tiny known system, the coordination payoff, and the artifact (save, load,
wrong task, corrupt file).

Budget: about 20 s on 2 cores (tiny networks; the coordination model trains for at most 1,500 steps).
"""

import dataclasses
import types

import numpy as np
import pytest
import torch

import envs
import world_model as wm


# --------------------------------------------------------------------------------------------------
# The paper's formulas, against NumPy
# --------------------------------------------------------------------------------------------------
def _hand_made_predictions(seed=0, n=5, batch=7, s=3):
    rng = np.random.default_rng(seed)
    next_states = rng.normal(size=(n, batch, s))
    rewards = rng.normal(size=(n, batch))
    p_not_terminal = rng.uniform(size=(n, batch))
    return next_states, rewards, p_not_terminal


def test_epistemic_uncertainties_match_numpy():
    next_states, rewards, p = _hand_made_predictions()
    n, batch, _ = next_states.shape
    choice = np.array([0, 1, 2, 3, 4, 0, 3])
    out = wm.ensemble_statistics(torch.tensor(next_states), torch.tensor(rewards), torch.tensor(p), torch.tensor(choice))
    for b in range(batch):
        # ε_r = Σ_m (r̂_m - r̄)² / (N - 1)
        r_bar = rewards[:, b].mean()
        assert out["rewards"][b].item() == pytest.approx(r_bar)
        assert out["eps_r"][b].item() == pytest.approx(((rewards[:, b] - r_bar) ** 2).sum() / (n - 1))
        # ε_g = || cov(x_i, x_j) ||_F over the elites, x = [ŝ', r̂]
        x = np.concatenate([next_states[:, b], rewards[:, b, None]], axis=1)  # [N, S+1]
        cov = np.cov(x, rowvar=False, ddof=1)  # [S+1, S+1]
        assert out["eps_g"][b].item() == pytest.approx(np.linalg.norm(cov, "fro"), rel=1e-9)
        # the next state is the drawn elite's prediction, not the mean of the elites
        np.testing.assert_allclose(out["next_states"][b].numpy(), next_states[choice[b], b])


def test_eps_g_in_standardised_units_divides_each_dimension_by_its_scale():
    next_states, rewards, p = _hand_made_predictions()
    scale = np.array([10.0, 0.1, 2.0, 0.5])  # 3 state dims, then the reward
    out = wm.ensemble_statistics(torch.tensor(next_states), torch.tensor(rewards), torch.tensor(p),
                                 torch.zeros(7, dtype=torch.long), torch.tensor(scale))
    for b in range(7):
        x = np.concatenate([next_states[:, b], rewards[:, b, None]], axis=1) / scale
        assert out["eps_g"][b].item() == pytest.approx(np.linalg.norm(np.cov(x, rowvar=False, ddof=1), "fro"), rel=1e-9)
    model = _tiny_model()  # the model's own scale: the dataset's state std and reward std
    with torch.no_grad():
        model.input_std.fill_(2.0)
    s_, a_ = torch.randn(9, model.state_dim), torch.rand(9, model.joint_action_dim) * 2 - 1
    raw = model.step(s_, a_, generator=torch.Generator().manual_seed(0))
    std = model.step(s_, a_, generator=torch.Generator().manual_seed(0), eps_g_units="standardised")
    torch.testing.assert_close(raw["next_states"], std["next_states"])  # only ε_g changes
    assert not torch.allclose(raw["eps_g"], std["eps_g"])
    with pytest.raises(envs.MomaError, match="eps_g_units"):
        model.step(s_, a_, eps_g_units="whitened")


def test_eps_g_is_zero_when_the_elites_agree_and_grows_with_disagreement():
    same = torch.ones(5, 2, 4)
    out = wm.ensemble_statistics(same, torch.zeros(5, 2), torch.ones(5, 2), torch.zeros(2, dtype=torch.long))
    assert torch.all(out["eps_g"] == 0) and torch.all(out["eps_r"] == 0)
    spread = same.clone()
    spread[:, 1] += torch.arange(5.0)[:, None]  # transition 1: the elites disagree on every dimension
    out = wm.ensemble_statistics(spread, torch.zeros(5, 2), torch.ones(5, 2), torch.zeros(2, dtype=torch.long))
    # cov of 4 identical columns with variance 2.5 -> a 4x4 block of 2.5 (reward column 0): ||.||_F = 4 * 2.5
    assert out["eps_g"][0].item() == 0 and out["eps_g"][1].item() == pytest.approx(10.0)


def test_terminal_is_a_majority_vote_of_the_elites():
    # columns: 3 of 5 say absorbing -> terminal; 2 of 5 -> not; 5 of 5 -> terminal; exactly 0.5 is "not absorbing"
    p_not_terminal = torch.tensor([[0.1, 0.1, 0.1, 0.5],
                                   [0.2, 0.2, 0.2, 0.5],
                                   [0.3, 0.9, 0.3, 0.5],
                                   [0.9, 0.9, 0.4, 0.1],
                                   [0.9, 0.9, 0.4, 0.1]])
    out = wm.ensemble_statistics(torch.zeros(5, 4, 1), torch.zeros(5, 4), p_not_terminal, torch.zeros(4, dtype=torch.long))
    assert out["terminals"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # An even number of elites: a tie counts as not terminal.
    tie = torch.tensor([[0.1], [0.1], [0.9], [0.9]])
    out = wm.ensemble_statistics(torch.zeros(4, 1, 1), torch.zeros(4, 1), tie, torch.zeros(1, dtype=torch.long))
    assert out["terminals"].tolist() == [0.0]


def test_aleatoric_uncertainty_is_mopos_max_norm_of_the_variance():
    rng = np.random.default_rng(3)
    state_var, reward_var = rng.uniform(size=(5, 6, 3)), rng.uniform(size=(5, 6))
    got = wm.aleatoric_uncertainty(torch.tensor(state_var), torch.tensor(reward_var)).numpy()
    expected = np.linalg.norm(np.concatenate([state_var, reward_var[..., None]], -1), axis=-1).max(0)
    np.testing.assert_allclose(got, expected)


def test_elites_are_the_members_with_the_lowest_holdout_error():
    mse = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.4])
    assert wm.select_elites(mse, 5).tolist() == [1, 4, 3, 6, 0]


# --------------------------------------------------------------------------------------------------
# Inference: clipping after the uncertainties, reproducibility
# --------------------------------------------------------------------------------------------------
def _tiny_model(env="reacher", seed=0):
    torch.manual_seed(seed)
    s, a = envs.STATE_DIM[env], envs.JOINT_ACTION_DIM[env]
    return wm.WorldModel(env, envs.dataset_id(env, envs.DEFAULT_DATASET[env]), s, a, ensemble_size=4, n_elites=3,
                         hidden_dim=8, n_hidden_layers=1).eval()


def test_clipping_to_the_bounding_box_happens_after_the_uncertainties():
    model = _tiny_model()
    with torch.no_grad():
        model.network.head.bias.normal_(0, 5.0)  # predictions far from the data
        model.state_min.fill_(-0.1), model.state_max.fill_(0.1)
        model.reward_bounds.copy_(torch.tensor([-0.2, 0.0]))
    states, actions = torch.randn(50, 10), torch.rand(50, 2) * 2 - 1
    raw = model.step(states, actions, clip=False, generator=torch.Generator().manual_seed(1))
    clipped = model.step(states, actions, clip=True, generator=torch.Generator().manual_seed(1))
    assert (raw["next_states"].abs() > 0.1).any() and ((raw["rewards"] < -0.2) | (raw["rewards"] > 0)).any()
    np.testing.assert_allclose(clipped["next_states"].numpy(), np.clip(raw["next_states"].numpy(), -0.1, 0.1))
    np.testing.assert_allclose(clipped["rewards"].numpy(), np.clip(raw["rewards"].numpy(), -0.2, 0.0))
    for k in ("eps_r", "eps_g", "aleatoric", "terminals", "elite"):  # computed on the unclipped predictions
        assert torch.equal(clipped[k], raw[k]), k


def test_step_draws_a_next_state_among_the_elites_only():
    model = _tiny_model()
    model.elites = torch.tensor([3, 1, 0])
    states, actions = torch.randn(400, 10), torch.zeros(400, 2)
    out = model.step(states, actions, clip=False, generator=torch.Generator().manual_seed(0))
    assert set(out["elite"].tolist()) == {0, 1, 3}
    pred = model.member_predictions(states, actions)  # all 4 members
    chosen = pred["next_states"][out["elite"], torch.arange(400)]
    torch.testing.assert_close(out["next_states"], chosen)
    torch.testing.assert_close(out["rewards"], pred["rewards"][[3, 1, 0]].mean(0))


def test_a_model_of_a_dataset_without_terminals_never_terminates():
    model = _tiny_model()
    with torch.no_grad():  # every member's terminal head says "absorbing" (p_not_terminal ~ 0)
        model.network.head.bias[:, :, -1] = -50.0
    states, actions = torch.randn(20, 10), torch.zeros(20, 2)
    assert model.step(states, actions)["terminals"].eq(1).all()  # can_terminate defaults to 1
    model.can_terminate.fill_(0)
    assert model.step(states, actions)["terminals"].eq(0).all()


def test_termination_rule_ends_rollouts_the_head_misses():
    """Ant: a predicted torso height outside [0.2, 1.0] is terminal even where every head says "not terminal"."""
    model = _tiny_model("ant")
    with torch.no_grad():  # every member predicts s' = s (zero state delta) and "not terminal" (p ~ 1)
        model.network.head.weight.zero_(), model.network.head.bias.zero_()
        model.network.head.bias[:, :, -1] = 50.0
    states = torch.zeros(5, 27)
    states[:, 0] = torch.tensor([0.1, 0.2, 0.55, 1.0, 1.05])
    actions = torch.zeros(5, 8)
    out = model.step(states, actions, clip=False)
    assert out["terminals"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert model.step(states, actions, clip=False, termination_rule=False)["terminals"].eq(0).all()  # the paper's head alone
    # The rule reads the unclipped prediction: a bounding box below z = 1.05 must not hide the jump.
    model.state_max.fill_(1.0)
    assert model.step(states, actions, clip=True)["terminals"][-1] == 1.0
    # Reacher never terminates, whatever its state.
    reacher = _tiny_model("reacher")
    with torch.no_grad():
        reacher.network.head.bias[:, :, -1] = 50.0
    assert reacher.step(torch.full((3, 10), 5.0), torch.zeros(3, 2))["terminals"].eq(0).all()


def test_bad_input_shapes_give_clear_errors():
    model = _tiny_model()
    with pytest.raises(envs.MomaError, match=r"states \[B, 10\]"):
        model.step(torch.zeros(4, 27), torch.zeros(4, 2))
    with pytest.raises(envs.MomaError, match=r"joint actions \[B, 2\]"):
        model.step(torch.zeros(4, 10), torch.zeros(4, 8))
    with pytest.raises(envs.MomaError, match="2 <= n_elites"):
        wm.WorldModel("reacher", "x", 10, 2, ensemble_size=3, n_elites=4)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def _known_system(n_episodes=40, steps=25, seed=0):
    """s' = s + 0.2 a (per dim, clipped to [-1, 1]), r = -||s||², absorbing once s_0 > 0.9."""
    rng = np.random.default_rng(seed)
    S, A = 2, 2
    states, next_states, actions, rewards, terminals, episode_ids = [], [], [], [], [], []
    for e in range(n_episodes):
        s = rng.uniform(-0.5, 0.5, S)
        for t in range(steps):
            a = rng.uniform(-1, 1, A)
            s2 = np.clip(s + 0.2 * a, -1, 1)
            done = s2[0] > 0.9
            states.append(s), actions.append(a), next_states.append(s2), rewards.append(-(s ** 2).sum())
            terminals.append(done), episode_ids.append(e)
            s = s2
            if done:
                break
    f32 = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    return types.SimpleNamespace(env="reacher", dataset_id="test/known-system-v0", states=f32(states),
                                 next_states=f32(next_states), joint_actions=f32(actions), rewards=f32(rewards),
                                 terminals=np.asarray(terminals), episode_ids=np.asarray(episode_ids))


def test_learns_a_tiny_known_system_and_elites_are_the_best_members():
    data = _known_system()
    args = wm.Args(env="reacher", ensemble_size=4, n_elites=3, hidden_dim=32, n_hidden_layers=2, max_steps=1500,
                   eval_every=250, patience=100, rollout_eval_starts=50, learning_rate=3e-3)
    model, metrics = wm.train(data, args, progress=False)
    assert metrics["elites"] == sorted(range(4), key=lambda i: metrics["holdout_mse"][i])[:3]
    assert model.elites.tolist() == metrics["elites"]
    assert model.can_terminate.item() == 1.0  # the data has terminal transitions (s_0 > 0.9)
    # Fresh states: the model knows s' = s + 0.2 a and r = -||s||² to a small error.
    rng = np.random.default_rng(1)
    s = rng.uniform(-0.6, 0.6, (500, 2)).astype(np.float32)
    a = rng.uniform(-1, 1, (500, 2)).astype(np.float32)
    out = model.step(torch.tensor(s), torch.tensor(a), clip=False)
    state_rmse = np.sqrt(((out["next_states"].numpy() - (s + 0.2 * a)) ** 2).mean())
    reward_rmse = np.sqrt(((out["rewards"].numpy() + (s ** 2).sum(1)) ** 2).mean())
    assert state_rmse < 0.03 and reward_rmse < 0.03, (state_rmse, reward_rmse)
    # ... and the uncertainty is larger far outside the data than inside it.
    far = model.step(torch.tensor(s * 8), torch.tensor(a), clip=False)
    assert far["eps_g"].mean() > 3 * out["eps_g"].mean()
    assert set(metrics["rollout"]) == {"h1", "h5", "h10"}


def test_plateaus_decay_the_learning_rate_then_stop_and_the_global_rng_is_untouched():
    data = _known_system(n_episodes=20, steps=20)
    args = wm.Args(env="reacher", ensemble_size=3, n_elites=2, hidden_dim=16, n_hidden_layers=1, max_steps=20_000,
                   eval_every=20, patience=1, min_improvement=0.5, rollout_eval_starts=10, lr_decays=2,
                   lr_decay_factor=0.1)
    torch.manual_seed(123)  # as MOMA-PPO does before it trains a missing model
    before = torch.get_rng_state()
    model, metrics = wm.train(data, args, progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # seeded locally: the caller's generator is not re-seeded
    decays = [h["lr_decayed_to"] for h in metrics["history"] if "lr_decayed_to" in h]
    assert decays == pytest.approx([args.learning_rate * 0.1, args.learning_rate * 0.01])
    assert metrics["stopped_early"] and metrics["train_steps"] < args.max_steps
    # a held-out plateau is reached after the two decays: the last `patience` evaluation(s) made no progress
    assert "lr_decayed_to" not in metrics["history"][-1]
    # the same seed gives the same model whatever the caller's global generator holds
    torch.manual_seed(999)
    again, _ = wm.train(data, args, progress=False)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_predicts_the_coordination_payoff_exactly():
    data = envs.load_dataset("coordination", "unfavorable")
    args = wm.Args(env="coordination", dataset="unfavorable", hidden_dim=64, n_hidden_layers=2, max_steps=600,
                   eval_every=200, patience=3, rollout_eval_starts=100)
    model, metrics = wm.train(data, args, progress=False)
    assert metrics["elite_reward_rmse"] < 0.05
    assert model.can_terminate.item() == 0.0  # the game's episodes only time out
    # Every joint action from every round: payoff 1 when the agents agree, else 0.
    rounds = np.unique(data.states[:, 0])
    joint = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    s = torch.tensor(np.repeat(rounds, 4)[:, None], dtype=torch.float32)
    a = torch.tensor(np.tile(joint, (len(rounds), 1)))
    out = model.step(s, a)
    payoff = (a[:, 0] == a[:, 1]).float()
    assert (out["rewards"] - payoff).abs().max().item() < 0.05


# --------------------------------------------------------------------------------------------------
# The artifact
# --------------------------------------------------------------------------------------------------
def test_save_load_gives_identical_predictions(tmp_path):
    model = _tiny_model()
    model.elites = torch.tensor([2, 0, 1])
    path = tmp_path / "model.pt"
    wm.save(model, path, seed=0, config={"note": "test"}, metrics={"elites": [2, 0, 1]})
    loaded = wm.load(path, "reacher", "expert-mix")
    states, actions = torch.randn(64, 10), torch.rand(64, 2) * 2 - 1
    a = model.step(states, actions, generator=torch.Generator().manual_seed(5))
    b = loaded.step(states, actions, generator=torch.Generator().manual_seed(5))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.elites.tolist() == [2, 0, 1] and loaded.metrics == {"elites": [2, 0, 1]}
    assert not any(p.name.endswith(".tmp") or ".tmp" in p.name for p in tmp_path.iterdir())  # atomic write


def test_wrong_task_and_corrupt_files_are_rejected(tmp_path):
    path = tmp_path / "model.pt"
    wm.save(_tiny_model(), path, seed=0, config={}, metrics={})
    with pytest.raises(envs.MomaError, match="trained on env 'reacher', not 'ant'"):
        wm.load(path, "ant")
    with pytest.raises(envs.MomaError, match="trained on dataset moma/reacher/expert-mix-v0"):
        wm.load(path, "reacher", "some-other-set")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(envs.MomaError, match="corrupt"):
        wm.load(truncated)
    not_a_model = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, not_a_model)
    with pytest.raises(envs.MomaError, match="not a moma-ppo world model"):
        wm.load(not_a_model)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["network.head.weight"] = torch.zeros(1)  # right kind, broken weights
    broken = tmp_path / "broken.pt"
    torch.save(payload, broken)
    with pytest.raises(envs.MomaError, match="corrupt"):
        wm.load(broken)
    with pytest.raises(envs.MomaError, match="no world model"):
        wm.load(tmp_path / "missing.pt")
    with pytest.raises(envs.MomaError, match="trained with seed 0, not 3"):  # a file copied to another seed's name
        wm.load(path, "reacher", seed=3)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["network.head.weight"][0, 0, 0] = float("nan")  # right shapes, a NaN weight
    nan_file = tmp_path / "nan.pt"
    torch.save(payload, nan_file)
    with pytest.raises(envs.MomaError, match="non-finite"):
        wm.load(nan_file)
    nan_model = _tiny_model()
    with torch.no_grad():
        nan_model.network.head.bias.fill_(float("nan"))
    with pytest.raises(envs.MomaError, match="non-finite"):  # never cached
        wm.save(nan_model, tmp_path / "never.pt", seed=0, config={}, metrics={})
    assert not (tmp_path / "never.pt").exists()


def test_load_or_train_caches_the_artifact_and_rejects_unknown_options():
    small = dict(hidden_dim=16, n_hidden_layers=1, max_steps=60, eval_every=30, rollout_eval_starts=10)
    with pytest.raises(envs.MomaError, match="unknown world-model training options"):
        wm.load_or_train("coordination", "favorable", seed=7, hidden_size=3)
    first = wm.load_or_train("coordination", "favorable", seed=7, **small)
    path = wm.artifact_path("coordination", "favorable", 7)
    assert path.exists() and not path.with_name(path.name + ".ckpt").exists()
    mtime = path.stat().st_mtime_ns
    second = wm.load_or_train("coordination", "favorable", seed=7, **small)  # from the cache, not retrained
    assert path.stat().st_mtime_ns == mtime
    for k, v in first.state_dict().items():
        assert torch.equal(v, second.state_dict()[k]), k
    assert dataclasses.asdict(wm.Args())["n_elites"] == 5 and dataclasses.asdict(wm.Args())["ensemble_size"] == 7


def test_help_shows_the_per_env_defaults_and_resolve_fills_them():
    import contextlib
    import io

    import tyro

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        tyro.cli(wm.Args, args=["--help"])
    text = " ".join(out.getvalue().replace("│", " ").split())
    assert "(default per env: coordination 64, reacher 200, ant 200)" in text  # hidden_dim
    assert "(default per env: coordination 3000, reacher 60000, ant 60000)" in text  # max_steps
    for env, preset in wm.PRESETS.items():
        assert {k: getattr(wm.resolve(wm.Args(env=env)), k) for k in preset} == preset
    assert wm.resolve(wm.Args(env="coordination", hidden_dim=8)).hidden_dim == 8  # a given value wins


def test_a_rebuilt_dataset_makes_its_world_model_stale():
    """A world model records the content hash of its training data: after the dataset is rebuilt with other
    content, `load` refuses the old model and `load_or_train` trains a new one instead of pairing them."""
    small = dict(hidden_dim=16, n_hidden_layers=1, max_steps=60, eval_every=30, rollout_eval_starts=10)
    envs.build_dataset("coordination", "neutral", seed=0)
    try:
        first = wm.load_or_train("coordination", "neutral", seed=8, **small)
        path = wm.artifact_path("coordination", "neutral", 8)
        assert first.dataset_fingerprint == envs.dataset_fingerprint("coordination", "neutral")
        wm.load(path, "coordination", "neutral")  # same data: loads
        envs.build_dataset("coordination", "neutral", seed=1)  # same size, other samples
        assert envs.dataset_fingerprint("coordination", "neutral") != first.dataset_fingerprint
        with pytest.raises(envs.MomaError, match="stale"):
            wm.load(path, "coordination", "neutral")
        second = wm.load_or_train("coordination", "neutral", seed=8, **small)  # retrained, not the stale one
        assert second.dataset_fingerprint == envs.dataset_fingerprint("coordination", "neutral")
        assert wm.load(path, "coordination", "neutral").dataset_fingerprint == second.dataset_fingerprint
    finally:
        envs.build_dataset("coordination", "neutral", seed=0)  # other tests expect the default build


def test_concurrent_processes_train_a_missing_world_model_once(tmp_path):
    """Two processes that find the same world model missing (two run_all.sh cells, two Slurm tasks): one trains it
    under its lock, the other waits, then loads the very model the first saved."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "minari"), MOMA_CACHE_DIR=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(envs.REPO_DIR))
    code = ("import torch, world_model as wm; torch.set_num_threads(1); m = wm.load_or_train('coordination', "
            "'favorable', seed=9, hidden_dim=16, n_hidden_layers=1, max_steps=300, eval_every=100, "
            "rollout_eval_starts=10); print('model', m.elites.tolist(), "
            "sum(float(v.double().sum()) for k, v in m.state_dict().items() if k.startswith('network.')))")
    # run from tmp_path: the training's TensorBoard log goes to ./runs
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=1200)[0] for p in procs]  # seconds on a free machine
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[-800:] for o in outs]
    trained = [o for o in outs if "saved " in o]
    assert len(trained) == 1, outs  # one trained and saved it; the other waited (or came after) and loaded it
    assert outs[0].splitlines()[-1] == outs[1].splitlines()[-1]  # the same model


def test_continue_world_model_trains_the_cached_model_further_into_its_own_cache(tmp_path):
    """bench/continue_world_model.py (docs/diagnosis.md row f): the cached model, trained further with its own
    settings, lands in the given folder with what MOMA_CACHE_DIR needs; the project's cached model is untouched."""
    import os
    import subprocess
    import sys

    import world_model as wm

    small = dict(hidden_dim=16, n_hidden_layers=1, max_steps=60, eval_every=30, rollout_eval_starts=10)
    envs.build_dataset("coordination", "neutral", seed=0, only_if_missing=True)
    wm.load_or_train("coordination", "neutral", seed=31, **small)
    cached = wm.artifact_path("coordination", "neutral", 31)
    first = wm.load(cached, "coordination", "neutral", seed=31)
    before = cached.read_bytes()
    out = subprocess.run([sys.executable, str(envs.REPO_DIR / "bench" / "continue_world_model.py"), "--env",
                          "coordination", "--dataset", "neutral", "--seed", "31", "--steps", "40", "--out",
                          str(tmp_path / "longer")], env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1000:]
    assert cached.read_bytes() == before
    cache = tmp_path / "longer" / "cache"
    longer = wm.load(cache / "world_models" / cached.name, "coordination", "neutral", seed=31)
    assert longer.metrics["train_steps"] == 40
    assert longer.metrics["continued_from"]["train_steps"] == first.metrics["train_steps"] == 60
    assert longer.config["hidden_dim"] == 16 and longer.config["n_hidden_layers"] == 1  # the cached model's sizes
    assert not torch.equal(longer.network.hidden[0].weight, first.network.hidden[0].weight)
    assert (cache / "reference_scores.json").exists() or not (envs.CACHE_DIR / "reference_scores.json").exists()
    assert (cache / "datasets").is_symlink() and (tmp_path / "longer" / "report.txt").read_text().startswith("World model")
    # MOMA-PPO run with MOMA_CACHE_DIR=<out>/cache loads it although its settings (steps, schedule) differ by design
    import unittest.mock

    with unittest.mock.patch.object(envs, "CACHE_DIR", cache):
        loaded = wm.load_or_train("coordination", "neutral", seed=31, **small)
    assert loaded.metrics["continued_from"] and torch.equal(loaded.network.hidden[0].weight, longer.network.hidden[0].weight)


def test_a_resumed_training_reports_the_time_of_every_segment(tmp_path):
    """train_time_s of a training resumed from its checkpoint is the sum of its segments, not the last one's (the
    Ant random model's card once showed 945 s for a training of several sessions)."""
    data = _known_system(n_episodes=20, steps=20)
    args = wm.Args(env="reacher", ensemble_size=2, n_elites=2, hidden_dim=8, n_hidden_layers=1, max_steps=200,
                   eval_every=50, patience=100, rollout_eval_starts=5, checkpoint_every=50)
    ckpt = tmp_path / "model.ckpt"
    _, first = wm.train(data, args, progress=False, checkpoint_path=ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 150 and 0 < saved["train_time_s"] <= first["train_time_s"]
    saved["train_time_s"] = 1000.0  # as if the segment before the interruption had run for 1,000 s
    torch.save(saved, ckpt)
    _, resumed = wm.train(data, dataclasses.replace(args, resume=True), progress=False, checkpoint_path=ckpt)
    assert resumed["train_steps"] == 200
    assert 1000.0 < resumed["train_time_s"] < 1000.0 + 10 * first["train_time_s"] + 60


def test_a_cached_model_trained_with_other_settings_is_retrained_and_records_say_which_model(monkeypatch):
    """load_or_train retrains a cached model whose training settings differ from those asked for (a changed preset
    or override), never for how it was trained (threads, checkpoints); provenance() names the file, seed and error."""
    small = dict(hidden_dim=8, n_hidden_layers=1, max_steps=40, eval_every=20, patience=1, rollout_eval_starts=5)
    model = wm.load_or_train("coordination", "neutral", seed=5, **small)
    first = wm.provenance(model)
    assert first["path"] == str(wm.artifact_path("coordination", "neutral", 5)) and first["seed"] == 5
    assert first["train_steps"] == 40 and len(first["holdout_mse"]) == model.hyper["ensemble_size"]
    trained = []
    real_train = wm.train_and_save
    monkeypatch.setattr(wm, "train_and_save", lambda *a, **k: trained.append(a[0]) or real_train(*a, **k))
    again = wm.load_or_train("coordination", "neutral", seed=5, torch_threads=2, **small)  # how, not what: cached
    assert trained == [] and wm.provenance(again) == first
    wm.load_or_train("coordination", "neutral", seed=5, **dict(small, max_steps=60))  # what: retrained
    assert len(trained) == 1 and trained[0].max_steps == 60
    assert wm.provenance(wm.load_or_train("coordination", "neutral", seed=5, **dict(small, max_steps=60)))["train_steps"] == 60


def test_a_training_checkpoint_of_another_model_is_not_resumed_and_says_why(tmp_path, capsys):
    """A checkpoint trained with other settings belongs to another artifact: training starts over and names the
    differing settings (it used to start over in silence); a changed --checkpoint-every (how, not what) resumes."""
    data = _known_system(n_episodes=20, steps=20)
    args = wm.Args(env="reacher", ensemble_size=2, n_elites=2, hidden_dim=8, n_hidden_layers=1, max_steps=200,
                   eval_every=50, patience=100, rollout_eval_starts=5, checkpoint_every=50)
    ckpt = tmp_path / "model.ckpt"
    wm.train(data, args, progress=False, checkpoint_path=ckpt)
    capsys.readouterr()
    wm.train(data, dataclasses.replace(args, resume=True, hidden_dim=16), progress=False, checkpoint_path=ckpt)
    out = capsys.readouterr().out
    assert "not resuming" in out and "--hidden-dim 8 in the checkpoint, 16 now" in out and "resuming world-model" not in out
    wm.train(data, args, progress=False, checkpoint_path=ckpt)  # the 8-wide model's checkpoint again
    capsys.readouterr()
    wm.train(data, dataclasses.replace(args, resume=True, checkpoint_every=40), progress=False, checkpoint_path=ckpt)
    assert "resuming world-model training from step 150" in capsys.readouterr().out
