"""Cross-play (envs.py, "Cross-play"; Table 4a's strategy agreement): teams stitched from the agents of two runs.

The coordination game makes the expected scores hand-computable: a round pays 1 when both agents pick the same
direction, so a team whose agents follow different conventions scores 0 and one whose agents agree scores 1.
Budget: a few seconds (tiny IBC runs and two 6-iteration MOMA-PPO runs).
"""

import json
import shutil

import numpy as np
import pytest
import torch

import envs
import ibc
import moma_ppo
import world_model


def constant(action):
    """A team whose every agent always picks `action` (0 = left, 1 = right)."""
    return lambda observations, histories: [np.full(len(o), action) for o in observations]


def test_a_stitched_team_takes_even_agents_from_this_run_and_odd_agents_from_the_partner():
    rounds = envs.COORDINATION_ROUNDS
    left_with_right = envs.stitch_teams(constant(0), constant(1), 2)
    right_with_left = envs.stitch_teams(constant(1), constant(0), 2)
    left_with_left = envs.stitch_teams(constant(0), constant(0), 2)
    assert left_with_right([np.zeros(3)] * 2, None)[0].tolist() == [0, 0, 0]
    assert left_with_right([np.zeros(3)] * 2, None)[1].tolist() == [1, 1, 1]
    assert envs.evaluate("coordination", "full", left_with_right, 3).tolist() == [0.0] * 3  # never agree
    assert envs.evaluate("coordination", "full", right_with_left, 3).tolist() == [0.0] * 3
    assert envs.evaluate("coordination", "full", left_with_left, 3).tolist() == [float(rounds)] * 3
    # Ant: legs 0 and 2 from this run, 1 and 3 from the partner
    four = envs.stitch_teams(constant(0), constant(1), 4)([np.zeros(2)] * 4, None)
    assert [a[0] for a in four] == [0, 1, 0, 1]


def _ibc(run_dir, dataset="favorable", seed=1, **kw):
    return ibc.main(ibc.Args(env="coordination", dataset=dataset, seed=seed, total_steps=100, hidden=16,
                             eval_every=0, eval_episodes=4, checkpoint_every=0, run_dir=str(run_dir), **kw))


def test_cross_play_loads_the_partners_agents_and_leaves_the_record_alone(tmp_path):
    """Run A learns the favorable dataset's convention (both agents pick the majority direction: self-play 1.0).
    Run B is A with its agent 1 flipped to the other direction (last layer negated): B's own team disagrees (0.0).
    Cross-play A with B = A's agent 0 + B's agent 1 = disagree (0.0); B with A = B's agent 0 + A's agent 1 = agree (1.0)."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert _ibc(a)["normalized_score_mean"] == 1.0
    shutil.copytree(a, b)
    ck = torch.load(b / "checkpoint.pt", weights_only=False)
    for key in ("policy.weights.2", "policy.biases.2"):
        ck["agents"][key][1] *= -1  # agent 1's two logits negated: its greedy action flips
    torch.save(ck, b / "checkpoint.pt")
    summary_before = (a / "summary.json").read_bytes()
    results = tmp_path / "results"

    report = _ibc(a, resume=True, cross_play_with=(str(b),), results_dir=str(results))
    assert report["self_play"]["normalized_score_mean"] == 1.0
    (partner,) = report["partners"]
    assert partner["normalized_score_mean"] == 0.0 and partner["partner_run"] == str(b)
    assert report["cross_play_score_mean"] == 0.0 and len(partner["episode_returns"]) == 4
    assert json.loads((a / "cross_play.json").read_text()) == report
    assert json.loads((results / "crossplay" / "coordination__full__favorable__ibc__1.json").read_text()) == report
    # a finished run only plays the teams: its summary is untouched and no cell record is written
    assert (a / "summary.json").read_bytes() == summary_before
    assert not (results / "coordination__full__favorable__ibc__1").exists()

    other_way = _ibc(b, resume=True, cross_play_with=(str(a),))
    assert other_way["partners"][0]["normalized_score_mean"] == 1.0


def test_cross_play_refuses_what_is_not_another_finished_run_of_the_same_task(tmp_path):
    a = tmp_path / "a"
    _ibc(a)
    with pytest.raises(envs.MomaError, match="no checkpoint.pt"):  # before any training: no folder is made
        _ibc(tmp_path / "new", cross_play_with=(str(tmp_path / "missing"),))
    assert not (tmp_path / "new").exists()
    with pytest.raises(envs.MomaError, match="this run itself"):
        _ibc(a, resume=True, cross_play_with=(str(a),))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(a, unfinished)
    (unfinished / "summary.json").unlink()
    with pytest.raises(envs.MomaError, match="has not finished"):
        _ibc(a, resume=True, cross_play_with=(str(unfinished),))
    other_dataset = tmp_path / "unfavorable"
    _ibc(other_dataset, dataset="unfavorable")
    with pytest.raises(envs.MomaError, match="another task or method"):
        _ibc(a, resume=True, cross_play_with=(str(other_dataset),))
    wider = tmp_path / "wider"
    ibc.main(ibc.Args(env="coordination", dataset="favorable", seed=2, total_steps=20, hidden=32, eval_every=0,
                      eval_episodes=2, checkpoint_every=0, run_dir=str(wider)))
    with pytest.raises(envs.MomaError, match="do not fit"):
        _ibc(a, resume=True, cross_play_with=(str(wider),))


def test_moma_ppo_cross_plays_after_its_final_evaluation(monkeypatch, tmp_path):
    """A new run given a finished partner trains, records its own cell, then plays the mixed teams."""
    monkeypatch.setitem(world_model.PRESETS, "coordination",
                        dict(hidden_dim=32, n_hidden_layers=2, max_steps=300, eval_every=100, lr_decays=2, patience=2))
    common = dict(env="coordination", dataset="neutral", iterations=6, rollout_batch=256, eval_every=100,
                  eval_episodes=5, results_dir=str(tmp_path / "results"))
    first = moma_ppo.main(moma_ppo.Args(seed=1, run_dir=str(tmp_path / "s1"), **common))
    second = moma_ppo.main(moma_ppo.Args(seed=2, run_dir=str(tmp_path / "s2"), cross_play_with=(str(tmp_path / "s1"),),
                                         **common))
    cell = "coordination__full__neutral__moma_ppo-rollout_batch=256__2"  # the record names the non-preset batch
    assert (tmp_path / "results" / cell / "summary.json").exists()
    report = json.loads((tmp_path / "results" / "crossplay" / f"{cell}.json").read_text())
    assert report["self_play"]["normalized_score_mean"] == second["normalized_score_mean"]
    (partner,) = report["partners"]
    assert partner["partner_seed"] == 1 and partner["partner_self_play_score"] == first["normalized_score_mean"]
    assert 0.0 <= partner["normalized_score_mean"] <= 1.0 and len(partner["episode_returns"]) == 5


SCRIPTS = ["iql", "maiql", "ibc", "itd3bc", "icql", "omar"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_cross_plays_on_reacher(name, tiny_mujoco_datasets, tmp_path):
    """Every baseline rebuilds a partner's agents from its checkpoint and plays the mixed team on Reacher (with the
    agents' conventions, Table 4a's mechanism); iql's centralised actor plays all-observant, the others leader-only
    (history encoders)."""
    import importlib

    module = importlib.import_module(name)
    obs = "all-observant" if name == "iql" else "leader-only"
    extra = dict(cql_samples=2) if name in ("icql", "omar") else {}

    def run(seed, **kw):
        return module.main(module.Args(env="reacher", obs=obs, dataset="expert-mix", seed=seed, total_steps=4,
                                       batch_size=16, hidden=16, history_dim=8, eval_every=0, eval_episodes=2,
                                       checkpoint_every=0, run_dir=str(tmp_path / f"s{seed}"), **extra, **kw))

    run(1)
    summary = run(2, cross_play_with=(str(tmp_path / "s1"),))
    assert summary["seed"] == 2  # the run's own summary: cross-play comes after it
    report = json.loads((tmp_path / "s2" / "cross_play.json").read_text())
    (partner,) = report["partners"]
    assert report["method"] == summary["method"] and partner["partner_seed"] == 1
    assert np.isfinite(partner["normalized_score_mean"]) and len(partner["episode_lengths"]) == 2
    assert len(partner["conventions"]["agents"]) == 2
