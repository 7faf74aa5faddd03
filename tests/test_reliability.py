"""Run safety (docs/usage.md): no wrong result ever exits 0. One test per class of failure: a bad value,
non-finite losses or weights, a resume of another configuration, a full disk, colliding run folders, a corrupt
checkpoint.
(`python tests/probe_reliability.py` measures the same classes end to end, one subprocess per case.)"""

import dataclasses
import errno
import json
import pathlib

import pytest
import torch

import envs
import ibc
import icql
import iql
import itd3bc
import maiql
import moma_ppo
import omar

SCRIPTS = [iql, ibc, maiql, itd3bc, icql, omar, moma_ppo]


def _game(module, run_dir, **changes):
    """A run of the coordination game small enough to take a second or two."""
    args = module.Args(env="coordination", dataset="neutral", seed=3, total_steps=200, hidden=32, eval_every=0,
                       eval_episodes=10, checkpoint_every=50, torch_threads=1, run_dir=str(run_dir))
    return dataclasses.replace(args, **changes)


# --------------------------------------------------------------------------------------------------
# Bad values: refused before any folder or data, naming the flag and a valid value.
# --------------------------------------------------------------------------------------------------
BAD_VALUES = [("eval_episodes", 0, "--eval-episodes must be an integer >= 1"),
              ("learning_rate", float("nan"), "--learning-rate must be a finite number > 0"),
              ("learning_rate", -1.0, r"--learning-rate must be a finite number > 0, got -1.0 \(e.g. --learning-rate 0\.000?3\)"),
              ("seed", -1, "--seed must be an integer >= 0"),
              ("torch_threads", 0, "--torch-threads must be an integer >= 1"),
              ("checkpoint_every", -1, "--checkpoint-every must be")]


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("field,value,message", BAD_VALUES, ids=lambda v: str(v)[:20])
def test_bad_values_are_refused_before_any_folder(module, field, value, message, tmp_path):
    env = "reacher" if module in (itd3bc, icql, omar) else "coordination"
    run_dir = tmp_path / "run"
    args = dataclasses.replace(module.Args(env=env, run_dir=str(run_dir)), **{field: value})
    with pytest.raises(envs.MomaError, match=message):
        module.main(args)
    assert not run_dir.exists()


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_script_specific_counts_and_floats(module, tmp_path):
    env = "reacher" if module in (itd3bc, icql, omar) else "coordination"
    length = "iterations" if module is moma_ppo else "total_steps"
    batch = "minibatch_size" if module is moma_ppo else "batch_size"
    for field, value in [(length, 0), (length, -5), (batch, 0)] + ([] if module is ibc else [("gamma", float("nan"))]):
        with pytest.raises(envs.MomaError, match=f"--{field.replace('_', '-')} must be"):
            module.main(dataclasses.replace(module.Args(env=env, run_dir=str(tmp_path / "run")), **{field: value}))
    assert not (tmp_path / "run").exists()


def test_moma_ppo_refuses_its_own_bad_values(tmp_path):
    for field, value in (("rollout_horizon", 0), ("lambda_g", float("nan")), ("eval_every", 0),
                         ("uncertainty_threshold", -1.0)):
        with pytest.raises(envs.MomaError, match=f"--{field.replace('_', '-')} must be"):
            moma_ppo.main(moma_ppo.Args(env="coordination", run_dir=str(tmp_path / "run"), **{field: value}))
    # the coordination preset's l_ε = inf (no cut) stays valid
    envs.check_args(moma_ppo.resolve(moma_ppo.Args(env="coordination")), examples=moma_ppo.PRESETS["coordination"])


def test_run_dir_that_is_a_file_or_under_a_file(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for run_dir, message in ((a_file, "is a file, not a folder"), (a_file / "run", "is a file, so no folder")):
        with pytest.raises(envs.MomaError, match=message):
            iql.main(_game(iql, run_dir))


def test_unwritable_run_dir_is_refused_before_any_work(tmp_path):
    import os
    import pathlib

    if os.geteuid() == 0:  # root writes into a read-only folder anyway; /proc refuses every new file
        run_dir = pathlib.Path("/proc/moma-test-run")
    else:
        (tmp_path / "read_only").mkdir(mode=0o555)
        run_dir = tmp_path / "read_only" / "run"
    for module in (iql, moma_ppo):
        args = _game(iql, run_dir) if module is iql else moma_ppo.Args(env="coordination", run_dir=str(run_dir))
        with pytest.raises(envs.MomaError, match="cannot write in .*choose a writable --run-dir"):
            module.main(args)
        assert not run_dir.exists()

@pytest.mark.parametrize("module", [iql, ibc, maiql, moma_ppo], ids=lambda m: m.__name__)
def test_a_results_dir_that_cannot_hold_the_record_is_refused_before_training(module, tmp_path):
    """The record is copied to --results-dir after training: a file there used to end a finished run in a
    NotADirectoryError traceback. Now it is refused before the run folder is made."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for results_dir, message in ((a_file, "--results-dir .* is a file, not a folder"),
                                 (a_file / "4b", "--results-dir .* is a file, so no folder can be made")):
        args = (moma_ppo.Args(env="coordination", run_dir=str(tmp_path / "run"), results_dir=str(results_dir))
                if module is moma_ppo else _game(module, tmp_path / "run", results_dir=str(results_dir)))
        with pytest.raises(envs.MomaError, match=message):
            module.main(args)
        assert not (tmp_path / "run").exists()


def test_every_script_checks_its_results_dir_before_making_its_run_folder():
    import inspect

    for module in SCRIPTS:
        source = inspect.getsource(module.main)
        assert source.index("envs.check_results_dir(") < source.index("envs.make_run_dir("), module.__name__


def test_a_data_error_leaves_no_run_folder(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise envs.MomaError("dataset is broken")
    monkeypatch.setattr(envs, "load_dataset", broken)
    with pytest.raises(envs.MomaError, match="broken"):
        ibc.main(_game(ibc, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Non-finite losses or weights: stop with a clear error, never write a summary (nor a NaN checkpoint).
# --------------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_without_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(iql, "expectile_loss", lambda diff, expectile: diff.mean() * float("nan"))
    with pytest.raises(envs.MomaError, match="training diverged: v_loss is nan at step"):
        iql.main(_game(iql, tmp_path / "run", checkpoint_every=0, total_steps=1000))
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("module", [iql, ibc, maiql], ids=lambda m: m.__name__)
def test_non_finite_weights_stop_without_summary_or_checkpoint(module, tmp_path, monkeypatch):
    adam_step = torch.optim.Adam.step

    def step(self, *a, **k):  # the weights turn NaN after the first update (a diverged training)
        out = adam_step(self, *a, **k)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(envs.MomaError, match="non-finite weights .* at step 50; no summary was written"):
        module.main(_game(module, tmp_path / "run"))
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_critic_verdict_is_the_first_step_beyond_the_bounds_any_return_allows(tmp_path):
    # rewards within ±2 and γ = 0.9: no return exceeds 2 / 0.1 = 20, and a loss summing 2 squared errors of values
    # within it stays below 2 · (2 · 20)² = 3,200
    log = envs.CriticLog(tmp_path, [0.5, -2.0, 1.0], gamma=0.9, td_terms=2, extra_columns=("v_loss",))
    assert log.value_bound == pytest.approx(20.0) and log.td_bound == pytest.approx(3200.0)
    log.add(1000, td_loss=1.0, value_mean=-19.0, v_loss=0.1)
    log.add(2000, td_loss=3000.0, value_mean=float("nan"))  # no value logged: only the loss is judged
    assert log.diverged() is None and log.record_fields() == {"critic_value_bound": log.value_bound, "critic_diverged": None}
    log.add(3000, td_loss=3300.0, value_mean=5.0)
    log.add(4000, td_loss=1e9, value_mean=-25.0)
    verdict = log.diverged()
    assert verdict["step"] == 3000 and "TD loss" in verdict["reason"] and "mean value" not in verdict["reason"]
    assert envs.critic_divergence([7], [0.0], [20.5], 20.0, 3200.0)["reason"].startswith("mean value 20.5 beyond")
    # resumed at step 2000: the rows of the lost part are dropped, and with them the verdict
    resumed = envs.CriticLog(tmp_path, [0.5, -2.0, 1.0], gamma=0.9, td_terms=2, extra_columns=("v_loss",),
                             resume_step=2000)
    assert [r[0] for r in resumed.rows] == ["1000", "2000"] and resumed.diverged() is None


def test_a_diverging_but_finite_critic_is_recorded_as_collapsed(tmp_path, monkeypatch):
    adam_step = torch.optim.Adam.step

    def step(self, *a, **k):  # every update also scales every weight by 1.05: the values grow geometrically, finite
        out = adam_step(self, *a, **k)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_(1.05)
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    summary = iql.main(_game(iql, tmp_path / "run", checkpoint_every=0))
    verdict = summary["critic_diverged"]
    assert verdict is not None and 0 < verdict["step"] <= 200 and summary["critic_value_bound"] == pytest.approx(100.0)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["critic_diverged"] == verdict


def test_summary_with_non_finite_scores_is_refused(tmp_path):
    summary = {"normalized_score_mean": float("nan"), "normalized_score_std": 0.0, "episode_returns": [1.0]}
    with pytest.raises(envs.MomaError, match="non-finite returns"):
        envs.write_summary(tmp_path, summary)
    assert list(tmp_path.iterdir()) == []


def test_summary_is_strict_json_even_with_an_infinite_setting(tmp_path):
    """The coordination game's l_ε = inf (no cut) used to be written as the bare word Infinity, which only Python's
    parser reads; it is now the string "inf"."""
    summary = {"normalized_score_mean": 1.0, "normalized_score_std": 0.0, "episode_returns": [1.0],
               "config": {"uncertainty_threshold": float("inf"), "nested": [float("-inf"), 2.0]}}
    envs.write_summary(tmp_path, summary)
    text = (tmp_path / "summary.json").read_text()
    assert "Infinity" not in text
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert strict["config"] == {"uncertainty_threshold": "inf", "nested": ["-inf", 2.0]}


def test_moma_ppo_resume_refuses_a_world_model_retrained_since(tmp_path, monkeypatch):
    """The checkpoint records the world model the run trained in; a resume after the cache was retrained (another
    model under the policy) is refused, naming what changed."""
    run = tmp_path / "run"
    args = moma_ppo.Args(env="coordination", dataset="neutral", iterations=2, eval_every=5, eval_episodes=10,
                         checkpoint_every=1, run_dir=str(run), torch_threads=1, seed=3)
    moma_ppo.main(args)
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ck["world_model"]["train_steps"] is not None
    real = __import__("world_model").provenance
    monkeypatch.setattr(__import__("world_model"), "provenance",
                        lambda model: dict(real(model), train_steps=-1, holdout_mse=[0.5]))
    with pytest.raises(envs.MomaError, match="world model changed since checkpoint .*train_steps, holdout_mse"):
        moma_ppo.main(dataclasses.replace(args, iterations=3, resume=True))


# --------------------------------------------------------------------------------------------------
# Resume: another configuration is refused (naming the fields); the same one, or a longer run, continues.
# --------------------------------------------------------------------------------------------------
def test_resume_refuses_another_configuration(tmp_path):
    run = tmp_path / "run"
    first = iql.main(_game(iql, run))
    other = _game(iql, run, dataset="unfavorable", seed=7, learning_rate=0.1, total_steps=300, resume=True)
    with pytest.raises(envs.MomaError, match=r"another configuration: --dataset 'neutral' in the checkpoint, "
                                             r"'unfavorable' now; --learning-rate .*; --seed 3 in the checkpoint, 7 now"):
        iql.main(other)
    assert json.loads((run / "summary.json").read_text())["episode_returns"] == first["episode_returns"]
    with pytest.raises(envs.MomaError, match="--total-steps 100 would end before it"):
        iql.main(_game(iql, run, total_steps=100, resume=True))
    # fields that may change (threads, evaluation, records) and a longer run are fine; wall time adds up
    trained_s = torch.load(run / "checkpoint.pt", weights_only=False)["wall_s"]
    extended = iql.main(_game(iql, run, total_steps=300, resume=True, eval_episodes=5, budget="x"))
    assert extended["train_steps"] == 300 and extended["wall_time_s"] > trained_s


def test_check_resume_names_every_difference():
    saved = {"seed": 1, "lambda_g": 0.1, "iterations": 20, "run_dir": "a", "torch_threads": 2}
    now = {"seed": 1, "lambda_g": 0.2, "iterations": 40, "run_dir": "b", "torch_threads": 1, "new_flag": 3}
    with pytest.raises(envs.MomaError, match=r"--lambda-g 0.1 in the checkpoint, 0.2 now\. Resume"):
        envs.check_resume(saved, now, "iterations", 20, 40)
    envs.check_resume(saved, dict(now, lambda_g=0.1), "iterations", 20, 40)  # extends the run


# --------------------------------------------------------------------------------------------------
# Full disk: fail at once before training; a failed checkpoint write leaves no partial file and the old one intact.
# --------------------------------------------------------------------------------------------------
def test_disk_full_at_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    save, calls = torch.save, []

    def full_disk_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) >= 2:  # the disk fills up during the second checkpoint: part of the file, then ENOSPC
            with open(f, "wb") as handle:
                handle.write(b"PK" + bytes(1000))
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk_save)
    run = tmp_path / "run"
    with pytest.raises(envs.MomaError, match="could not write the checkpoint .*No space left.*previous checkpoint is intact"):
        iql.main(_game(iql, run))
    assert sorted(p.name for p in run.glob("*.tmp")) == [] and not (run / "summary.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 50


def test_disk_full_at_start_fails_before_any_folder(tmp_path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**11, 10**11 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(envs.MomaError, match="only 5 MB free on the disk of .*needs about 50 MB"):
        iql.main(_game(iql, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Run folders: default names never collide; temporary files are per process.
# --------------------------------------------------------------------------------------------------
def test_default_run_dirs_never_collide(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_123_456_789)  # the same instant
    first = envs.default_run_dir("coordination", "full", "neutral", "iql", 1, base=tmp_path)
    monkeypatch.setattr(os, "getpid", lambda: 999_999)  # another process
    second = envs.default_run_dir("coordination", "full", "neutral", "iql", 1, base=tmp_path)
    assert first != second
    # every script names its default run folder alike: the record's name, then the time stamp
    assert first.name.startswith("coordination__full__neutral__iql__1__") and first.parent == tmp_path
    assert envs.default_run_dir("ant", "full", "D4RL/ant/medium", "iql", 1).parent == pathlib.Path("runs")  # no sub-folders
    envs.make_run_dir(first, given=False)
    with pytest.raises(envs.MomaError, match="already exists"):  # a default folder is never shared
        envs.make_run_dir(first, given=False)
    (first / "checkpoint.pt.999999999.tmp").write_bytes(b"half a checkpoint of a killed process")
    envs.make_run_dir(first, given=True)  # a given --run-dir may exist (a resume); dead processes' temp files go
    assert list(first.iterdir()) == []
    assert envs._unique_tmp(first / "checkpoint.pt").name == "checkpoint.pt.999999.tmp"


# --------------------------------------------------------------------------------------------------
# Corrupt checkpoints: a clear error in every script.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [iql, ibc, maiql], ids=lambda m: m.__name__)
@pytest.mark.parametrize("damage", ["garbage", "truncated", "nan weights"])
def test_corrupt_checkpoint_is_a_clear_error(module, damage, tmp_path):
    run = tmp_path / "run"
    module.main(_game(module, run, total_steps=50))
    path = run / "checkpoint.pt"
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        ck = torch.load(path, weights_only=False)
        for value in ck["agent" if module is iql else "agents"].values():
            value.fill_(float("nan"))
        torch.save(ck, path)
    message = "non-finite weights" if damage == "nan weights" else "is corrupt or not a checkpoint"
    with pytest.raises(envs.MomaError, match=message):
        module.main(_game(module, run, total_steps=100, resume=True))



# --------------------------------------------------------------------------------------------------
# Datasets: a dataset whose metadata.json was deleted is rebuilt, the same as before (it was a Minari traceback).
# --------------------------------------------------------------------------------------------------
def test_a_dataset_without_its_metadata_is_rebuilt():
    before = envs.load_dataset("coordination", "neutral")
    (envs.dataset_path("coordination", "neutral") / "data" / "metadata.json").unlink()
    assert not envs.dataset_exists("coordination", "neutral")
    after = envs.load_dataset("coordination", "neutral")
    assert after.fingerprint == before.fingerprint and envs.dataset_exists("coordination", "neutral")

# --------------------------------------------------------------------------------------------------
# Reproducibility: a run's result depends on its arguments, not on what its process did before (training the world
# model, loading it from the cache, building a dataset), nor on which file was placed at a model's path.
# --------------------------------------------------------------------------------------------------
SMALL_WORLD_MODEL = dict(hidden_dim=32, n_hidden_layers=2, max_steps=300, eval_every=100, patience=2,
                         rollout_eval_starts=20)


def test_moma_ppo_same_result_whether_its_world_model_was_trained_or_loaded(tmp_path, monkeypatch):
    import world_model

    monkeypatch.setattr(envs, "CACHE_DIR", tmp_path / "cache")  # no cached world model: the first run trains it
    # the world model's per-env training settings live in world_model.PRESETS (both scripts train the same model)
    monkeypatch.setitem(world_model.PRESETS, "coordination",
                        {k: v for k, v in SMALL_WORLD_MODEL.items() if k in world_model.PRESETS["coordination"]})
    args = moma_ppo.Args(env="coordination", dataset="neutral", seed=3, iterations=2, rollout_batch=256,
                         minibatch_size=256, eval_every=2, eval_episodes_during=2, eval_episodes=10, checkpoint_every=2,
                         torch_threads=1)
    path = world_model.artifact_path("coordination", "neutral", 0)
    assert not path.exists()
    trained = moma_ppo.main(dataclasses.replace(args, run_dir=str(tmp_path / "trained")))
    assert path.exists()
    # Loading a model leaves the caller's generator untouched, as training one does (constructing the network drew
    # its throwaway initialisation from it: the agents of the second run started from other weights, 0.5 vs 1.0).
    torch.manual_seed(3)
    before = torch.get_rng_state()
    world_model.load(path, "coordination", "neutral", seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    loaded = moma_ppo.main(dataclasses.replace(args, run_dir=str(tmp_path / "loaded")))
    assert loaded["episode_returns"] == trained["episode_returns"]
    a = torch.load(tmp_path / "trained" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "loaded" / "checkpoint.pt", weights_only=False)
    for key, value in a["agents"].items():
        assert torch.equal(value, b["agents"][key]), key
    # extended by a resume, the wall time counts both processes' training, not only the last one's
    extended = moma_ppo.main(dataclasses.replace(args, run_dir=str(tmp_path / "loaded"), iterations=3, resume=True))
    assert extended["train_steps"] > loaded["train_steps"] and extended["wall_time_s"] > b["wall_s"]


def test_a_dataset_build_leaves_the_callers_generators_untouched(monkeypatch):
    import random

    import numpy as np

    import make_datasets

    def build_drawing_from_global_generators(n_transitions, seed):  # as loading the shipped policies does
        torch.manual_seed(seed)
        torch.randn(10), np.random.rand(3), random.random()
        return {}

    monkeypatch.setattr(make_datasets, "build_reacher_expert_mix", build_drawing_from_global_generators)
    monkeypatch.setattr(make_datasets, "_record_build", lambda env, dataset, info: None)
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    make_datasets.build("reacher", "expert-mix", n_transitions=10, seed=0)
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])


def test_a_world_model_of_another_dataset_or_seed_is_refused_not_called_stale(tmp_path, monkeypatch):
    import shutil

    import world_model

    monkeypatch.setattr(envs, "CACHE_DIR", tmp_path / "cache")
    small = dict(hidden_dim=16, n_hidden_layers=1, max_steps=60, eval_every=30, rollout_eval_starts=10)
    world_model.load_or_train("coordination", "neutral", seed=4, **small)
    source = world_model.artifact_path("coordination", "neutral", 4)
    envs.load_dataset("coordination", "favorable")  # the other dataset exists: its fingerprint differs
    swapped = world_model.artifact_path("coordination", "favorable", 4)
    shutil.copy(source, swapped)
    with pytest.raises(envs.MomaError, match=r"trained on dataset moma/coordination/neutral-v0, not "
                                             r"moma/coordination/favorable-v0 \(a file copied from another model\?\)"):
        world_model.load_or_train("coordination", "favorable", seed=4, **small)
    assert swapped.read_bytes() == source.read_bytes()  # refused, not retrained over
    # a file of another seed from an earlier build of the dataset: named as another seed's, not as stale
    payload = torch.load(source, weights_only=True)
    payload["dataset_fingerprint"] = "an-earlier-build"
    other_seed = world_model.artifact_path("coordination", "neutral", 6)
    torch.save(payload, other_seed)
    with pytest.raises(envs.MomaError, match="trained with seed 4, not 6"):
        world_model.load_or_train("coordination", "neutral", seed=6, **small)


# --------------------------------------------------------------------------------------------------
# world_model.py and envs.py's own command lines: the same rules as the algorithm scripts.
# --------------------------------------------------------------------------------------------------
def test_world_model_bad_values_are_refused_before_any_work(tmp_path):
    import world_model as wm

    for field, value in (("max_steps", 0), ("eval_every", 0), ("checkpoint_every", 0), ("seed", -1),
                         ("torch_threads", 0), ("learning_rate", float("nan")), ("holdout_fraction", 1.0)):
        given = {"seed": 41, field: value}
        with pytest.raises(envs.MomaError, match=f"--{field.replace('_', '-')} must be"):
            wm.main(wm.Args(env="coordination", dataset="neutral", **given))
        with pytest.raises(envs.MomaError, match=f"--{field.replace('_', '-')} must be"):  # moma_ppo's path too
            wm.load_or_train("coordination", "neutral", seed=given.pop("seed"), **given)
    with pytest.raises(envs.MomaError, match="--n-elites \\(9\\) must be at most --ensemble-size \\(7\\)"):
        wm.main(wm.Args(env="coordination", dataset="neutral", seed=41, n_elites=9))
    assert not wm.artifact_path("coordination", "neutral", 41).exists()


def test_world_model_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    import world_model as wm

    target = tmp_path / "models" / "m.pt"
    wm._atomic_torch_save({"a": torch.zeros(3)}, target)

    def full_disk_save(obj, f, *a, **k):
        with open(f, "wb") as handle:
            handle.write(b"PK" + bytes(100))
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(envs.MomaError, match="could not write .*m.pt .*free some disk space"):
        wm._atomic_torch_save({"a": torch.ones(3)}, target)
    assert [p.name for p in target.parent.iterdir()] == ["m.pt"]  # no partial temporary file left behind
    assert torch.load(target)["a"].sum() == 0  # the previous file is intact


def test_dataset_command_line_refuses_bad_sizes_and_seeds():
    for changes, message in (({"n_transitions": 0}, "--n-transitions must be an integer >= 1"),
                             ({"seed": -1}, "--seed must be an integer >= 0")):
        with pytest.raises(envs.MomaError, match=message):
            envs.main(dataclasses.replace(envs.Args(env="coordination", dataset="neutral", force=True), **changes))


def test_code_fingerprint_names_the_modules_the_script_declares(tmp_path):
    copy = tmp_path / "moma_ppo_v2.py"  # a renamed copy keeps world_model.py in its fingerprint
    copy.write_text((pathlib.Path(moma_ppo.__file__)).read_text())
    code = envs.code_fingerprint(copy, extra=("world_model.py",))
    assert list(code) == ["moma_ppo_v2.py", "world_model.py", "envs.py"]
    assert code["moma_ppo_v2.py"] == envs.file_hash(pathlib.Path(moma_ppo.__file__))
    assert list(envs.code_fingerprint("iql.py")) == ["iql.py", "envs.py"]


def test_a_current_world_model_loads_while_another_process_holds_the_training_lock():
    """Loading a cached, current model does not queue behind the training lock (held, e.g., by a process training
    the model again with --force, or by a Slurm prepare task): saves are atomic, so the file is whole."""
    import threading

    import world_model as wm

    small = dict(hidden_dim=16, n_hidden_layers=1, max_steps=60, eval_every=30, rollout_eval_starts=10)
    envs.build_dataset("coordination", "neutral", seed=0, only_if_missing=True)
    wm.load_or_train("coordination", "neutral", seed=42, **small)
    loaded = []
    with wm.training_lock(wm.artifact_path("coordination", "neutral", 42)):
        # the same settings: a model cached with other ones is retrained (under the lock), not loaded
        worker = threading.Thread(target=lambda: loaded.append(wm.load_or_train("coordination", "neutral", seed=42,
                                                                                **small)), daemon=True)
        worker.start()
        worker.join(timeout=120)
        assert not worker.is_alive() and len(loaded) == 1
