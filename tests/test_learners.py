"""Run safety of the two online learners, mappo.py (the reacher expert, an online upper bound) and td3_ant.py (the
Ant behaviour learner), as in the offline scripts (docs/usage.md, "Run safety"): a bad argument is refused before
any folder exists; --resume refuses another configuration, naming the fields; a non-finite loss stops the run
before a checkpoint, a summary or a policy file; temporary files carry the process id. Tiny budgets (seconds)."""

import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest
import torch

import envs
import make_datasets as md
import mappo
import td3_ant


# ---------------------------------------------------------------------------------------------------
# mappo.py
# ---------------------------------------------------------------------------------------------------
def _mappo_args(run_dir, **kw):
    base = dict(env="reacher", total_steps=2 * 2 * 50, num_envs=2, hidden=8, minibatch_size=50, update_epochs=1,
                eval_every=1, eval_episodes=1, checkpoint_every=1, run_dir=str(run_dir))
    return mappo.Args(**{**base, **kw})


@pytest.mark.parametrize("bad, flag", [
    (dict(eval_episodes=0), "--eval-episodes"),  # wrote NaN (invalid JSON) into summary.json
    (dict(eval_every=-1), "--eval-every"),
    (dict(checkpoint_every=-2), "--checkpoint-every"),
    (dict(num_envs=0), "--num-envs"),
    (dict(minibatch_size=0), "--minibatch-size"),
    (dict(minibatch_size=101), "--minibatch-size"),  # more than an iteration's 2 x 50 samples: no update at all
    (dict(learning_rate=-1.0), "--learning-rate"),
    (dict(gamma=float("nan")), "--gamma"),
    (dict(stop_steps=0), "--stop-steps"),
    (dict(seed=-1), "--seed"),
    (dict(torch_threads=0), "--torch-threads"),
    (dict(elbow_convention=2), "--elbow-convention"),
    (dict(env="ant", elbow_convention=1), "--elbow-convention"),  # failed only after the first iteration
])
def test_mappo_refuses_a_bad_argument_before_any_folder(tmp_path, bad, flag):
    run = tmp_path / "run"
    with pytest.raises(envs.MomaError, match=flag):
        mappo.main(_mappo_args(run, **bad))
    assert not run.exists()


def test_mappo_run_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(envs.MomaError, match="is a file"):
        mappo.main(_mappo_args(tmp_path / "file"))


def test_mappo_zero_eval_and_checkpoint_cadence_mean_only_at_the_end(tmp_path):
    """--eval-every 0 / --checkpoint-every 0 divided by zero; now they mean "only the final one"."""
    run = tmp_path / "run"
    summary = mappo.main(_mappo_args(run, eval_every=0, checkpoint_every=0))
    assert summary["train_steps"] == 200 and (run / "checkpoint.pt").exists()
    on_disk = json.loads((run / "summary.json").read_text())  # valid JSON, finite returns
    assert np.isfinite(on_disk["episode_returns"]).all()
    assert not list(run.glob("*.tmp*"))


def test_mappo_resume_refuses_another_configuration_naming_the_fields(tmp_path):
    run = tmp_path / "run"
    mappo.main(_mappo_args(run))
    ckpt = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(envs.MomaError, match="--learning-rate 0.0003 in the checkpoint, 0.001 now") as e:
        mappo.main(_mappo_args(run, total_steps=300, learning_rate=1e-3, seed=7, resume=True))
    assert "--seed 1 in the checkpoint, 7 now" in str(e.value) and "--total-steps" not in str(e.value)
    with pytest.raises(envs.MomaError, match="--total-steps"):  # a shorter run than the checkpoint's
        mappo.main(_mappo_args(run, total_steps=100, resume=True))
    assert (run / "checkpoint.pt").read_bytes() == ckpt  # nothing was trained or written
    # what may change: the length (it grows), the evaluation and checkpoint cadence, where to stop, the elbow
    # shaping (the reacher expert's second stage, docs/usage.md)
    assert mappo.main(_mappo_args(run, total_steps=300, eval_every=0, stop_steps=300, elbow_convention=1,
                                  resume=True))["train_steps"] == 300


def test_mappo_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(envs.MomaError, match="corrupt"):
        mappo.main(_mappo_args(run, resume=True))


def test_mappo_non_finite_loss_stops_before_checkpoint_summary_and_policy(tmp_path, monkeypatch):
    v_tot = mappo.MAPPOAgents.v_tot
    monkeypatch.setattr(mappo.MAPPOAgents, "v_tot", lambda self, *a: v_tot(self, *a) * float("nan"))  # a NaN critic
    run = tmp_path / "run"
    with pytest.raises(envs.MomaError, match="training diverged: policy_loss is nan at step 100"):
        mappo.main(_mappo_args(run, policy_out=str(tmp_path / "policy.pt")))
    assert not (run / "summary.json").exists() and not (run / "checkpoint.pt").exists()
    assert not (run / "policy.pt").exists() and not (tmp_path / "policy.pt").exists()


def test_mappo_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    step, calls = torch.optim.Adam.step, []

    def poisoned(self, *a, **k):  # the last update leaves a NaN weight behind (its loss was finite)
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:  # 1 iteration x 1 epoch x 100 / 50 minibatches
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(envs.MomaError, match="non-finite weights"):
        mappo.main(_mappo_args(run, total_steps=100))
    assert not (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()


# ---------------------------------------------------------------------------------------------------
# td3_ant.py
# ---------------------------------------------------------------------------------------------------
def _td3_args(**kw):
    base = dict(total_steps=600, learning_starts=500, batch_size=16, hidden=8, checkpoint_every_s=1e9,
                snapshot_every=10**9, snapshot_eval_episodes=1)
    return td3_ant.Args(**{**base, **kw})


@pytest.mark.parametrize("bad, flag", [
    (dict(policy_freq=0), "--policy-freq"),  # ZeroDivisionError after the warm-up
    (dict(total_steps=0), "--total-steps"),
    (dict(learning_starts=0), "--learning-starts"),
    (dict(batch_size=-1), "--batch-size"),
    (dict(exploration_noise=0.0), "--exploration-noise"),  # log(0) in the shipped policy's noise
    (dict(learning_rate=float("inf")), "--learning-rate"),
    (dict(gamma=1.5), "--gamma"),
    (dict(tau=-0.1), "--tau"),
    (dict(stop_above=float("nan")), "--stop-above"),
    (dict(snapshot_every=0), "--snapshot-every"),
    (dict(seed=-3), "--seed"),
])
def test_td3_refuses_a_bad_argument_before_any_folder(tmp_path, monkeypatch, bad, flag):
    monkeypatch.chdir(tmp_path)
    learner = tmp_path / "learner"
    with pytest.raises(envs.MomaError, match=flag):
        td3_ant.main(_td3_args(learner_dir=str(learner), **bad))
    with pytest.raises(envs.MomaError, match=flag):  # train() checks too (it is called directly)
        td3_ant.train(_td3_args(**bad), out_dir=learner)
    assert not learner.exists() and not (tmp_path / "runs").exists()


def test_td3_folders_that_are_files_are_refused(tmp_path):
    (tmp_path / "file").write_text("")
    for flag in ("learner_dir", "policy_dir"):
        with pytest.raises(envs.MomaError, match=f"--{flag.replace('_', '-')} .* is a file"):
            td3_ant.main(_td3_args(**{flag: str(tmp_path / "file")}))


def test_td3_resume_refuses_another_configuration_naming_the_fields(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    learner = tmp_path / "learner"
    td3_ant.train(_td3_args(), out_dir=learner, log=lambda *a: None)
    ckpt = (learner / "checkpoint.pt").read_bytes()
    with pytest.raises(envs.MomaError, match="--learning-rate 0.0003 in the checkpoint, 0.001 now") as e:
        td3_ant.train(_td3_args(total_steps=700, learning_rate=1e-3, hidden=16, resume=True), out_dir=learner)
    assert "--hidden 8 in the checkpoint, 16 now" in str(e.value)  # today: only logged "resuming with changed settings"
    with pytest.raises(envs.MomaError, match="--total-steps"):
        td3_ant.train(_td3_args(total_steps=550, resume=True), out_dir=learner)
    assert (learner / "checkpoint.pt").read_bytes() == ckpt
    # the length may grow; when to checkpoint and when to stop may change; the TensorBoard run goes on
    td3_ant.train(_td3_args(total_steps=650, checkpoint_every_s=5.0, stop_above=1e9, resume=True), out_dir=learner,
                  log=lambda *a: None)
    ck = torch.load(learner / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 650 and ck["n_resumes"] == 1
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and str(runs[0]) == ck["tb_dir"]


def test_td3_resume_from_the_shipped_state_refuses_another_configuration(tmp_path, monkeypatch):
    """The shipped learner state (1.1M steps, 2x256) continued with other settings is refused before any work; a
    resume with nothing to resume is an error, not a silent fresh start."""
    monkeypatch.chdir(tmp_path)
    learner = tmp_path / "learner"
    assert td3_ant.ANT_TD3_RESUME.exists()
    with pytest.raises(envs.MomaError, match="--hidden 256 in the checkpoint, 8 now"):
        td3_ant.train(_td3_args(total_steps=2_000_000, resume=True), out_dir=learner)
    assert not learner.exists()
    monkeypatch.setattr(td3_ant, "ANT_TD3_RESUME", tmp_path / "missing.pt")
    with pytest.raises(envs.MomaError, match="no learner checkpoint"):
        td3_ant.train(_td3_args(resume=True), out_dir=learner)
    assert not learner.exists()


def test_td3_corrupt_checkpoint_is_a_clear_error(tmp_path):
    learner = tmp_path / "learner"
    learner.mkdir()
    (learner / "checkpoint.pt").write_bytes(b"\0" * 100)
    with pytest.raises(envs.MomaError, match="corrupt"):
        td3_ant.train(_td3_args(resume=True), out_dir=learner)
    with pytest.raises(envs.MomaError, match="corrupt"):
        td3_ant.main(_td3_args(export_only=True, learner_dir=str(learner)))


def test_td3_non_finite_loss_stops_before_any_checkpoint_or_snapshot(tmp_path, monkeypatch):
    make = envs.make_single_agent_env

    def nan_rewards(env):  # a simulator whose rewards turn NaN (a fault injected under the learner)
        sim = make(env)
        step = sim.step

        def bad_step(action):
            obs, r, term, trunc, info = step(action)
            return obs, float("nan"), term, trunc, info
        sim.step = bad_step
        return sim
    monkeypatch.setattr(envs, "make_single_agent_env", nan_rewards)
    monkeypatch.chdir(tmp_path)
    learner = tmp_path / "learner"
    with pytest.raises(envs.MomaError, match="training diverged: critic_loss is nan at step 600"):
        td3_ant.train(_td3_args(), out_dir=learner, log=lambda *a: None)
    assert not (learner / "checkpoint.pt").exists() and not list((learner / "replay").iterdir())
    # with a snapshot due first, the NaN policy is refused there (never a snapshot, the candidates of the export)
    with pytest.raises(envs.MomaError, match="non-finite weights"):
        td3_ant.train(_td3_args(snapshot_every=550), out_dir=learner, log=lambda *a: None)
    assert not list((learner / "snapshots").iterdir()) and not (learner / "checkpoint.pt").exists()


def test_td3_exp_name_and_tensorboard_in_runs(tmp_path, monkeypatch):
    """CleanRL's convention: exp_name is the file's name; TensorBoard logs go to runs/, not into the learner
    folder; a copy of the script (another exp_name) gets a learner folder of its own."""
    monkeypatch.chdir(tmp_path)
    assert td3_ant.Args().exp_name == "td3_ant"
    assert td3_ant.default_learner_dir("td3_ant") == md.ANT_TRAIN_DIR
    assert td3_ant.default_learner_dir("my_td3") == md.TRAIN_DIR / "my_td3"
    learner = tmp_path / "learner"
    td3_ant.train(_td3_args(exp_name="my_td3"), out_dir=learner, log=lambda *a: None)
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("ant__full__online__my_td3__1__") and list(run.glob("events.out.tfevents.*"))
    assert not (learner / "tb").exists()


def test_td3_export_only_without_checkpoint_and_default_export_folder(tmp_path, monkeypatch):
    """main() exports into the learner folder unless --policy-dir is given: behaviour_policies/ stays as shipped."""
    with pytest.raises(envs.MomaError, match="no learner checkpoint"):
        td3_ant.main(_td3_args(export_only=True, learner_dir=str(tmp_path / "none")))
    calls = []
    monkeypatch.setattr(td3_ant, "export", lambda out_dir, policy_dir, log: calls.append((out_dir, policy_dir)) or {})
    (tmp_path / "learner").mkdir()
    (tmp_path / "learner" / "checkpoint.pt").write_bytes(b"")
    td3_ant.main(_td3_args(export_only=True, learner_dir=str(tmp_path / "learner")))
    assert calls == [(tmp_path / "learner", None)]


# ---------------------------------------------------------------------------------------------------
# Temporary files: one name per process, removed when the write fails
# ---------------------------------------------------------------------------------------------------
def _failing_replace(monkeypatch, seen):
    def replace(src, dst):
        seen.append(pathlib.Path(src))
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("writer", ["td3_torch", "td3_npz", "mappo_policy", "make_datasets_json"])
def test_temporary_files_are_per_process_and_removed_on_failure(tmp_path, monkeypatch, writer):
    target = tmp_path / "out" / ("x.npz" if writer == "td3_npz" else "x.pt")
    target.parent.mkdir()
    write = {
        "td3_torch": lambda: td3_ant._atomic_torch_save({"a": torch.zeros(2)}, target),
        "td3_npz": lambda: td3_ant._atomic_npz(target, a=np.zeros(2)),
        "mappo_policy": lambda: mappo.save_policy_file(mappo.MAPPOAgents([4, 4], 1, 4, 8), "reacher", "all-observant",
                                                       target, {}),
        "make_datasets_json": lambda: md._write_atomic(target, "{}"),
    }[writer]
    seen = []
    _failing_replace(monkeypatch, seen)
    with pytest.raises((envs.MomaError, OSError)):
        write()
    assert len(seen) == 1 and f".tmp{os.getpid()}" in seen[0].name
    assert not seen[0].exists() and not target.exists()
    monkeypatch.undo()
    write()
    assert target.exists() and not [f for f in target.parent.iterdir() if f != target]


def test_learner_settings_in_the_checkpoint_exclude_command_line_switches():
    cfg = td3_ant.learner_config(td3_ant.Args(resume=True, export_only=True, exp_name="x", learner_dir="a",
                                              policy_dir="b"))
    assert cfg == td3_ant.learner_config(td3_ant.Args())
    shipped = torch.load(td3_ant.ANT_TD3_RESUME, weights_only=True)["config"]
    assert set(shipped) == set(cfg)  # the shipped state resumes with today's flags (no field gained or lost)
    assert dataclasses.asdict(td3_ant.Args())["exp_name"] == "td3_ant"
