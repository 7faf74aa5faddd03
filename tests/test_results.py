"""results/ and results.py: a finished cell's record round-trips into docs/results.md, stale records are flagged,
the plots are drawn from a results/ tree, resumed runs keep a consistent curve, and the README's result section
holds no number that results/ does not."""

import json
import pathlib
import re
import shutil

import numpy as np
import pytest

import envs
import results

REPO = pathlib.Path(__file__).resolve().parents[1]


def _fake_record(root: pathlib.Path, table: str, method: str, seed: int, score: float, obs: str = "full",
                 env: str = "coordination", dataset: str = "favorable", budget: str = "quick", code=None) -> pathlib.Path:
    folder = root / table / envs.record_name(env, obs, dataset, method, seed)
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "algorithm": method.split("-")[0], "method": method, "env": env, "obs": obs, "seed": seed,
        "dataset_id": f"moma/{env}/{dataset}-v0", "budget": budget, "normalized_score_mean": score,
        "train_steps": 1000, "wall_time_s": 12.0, "config": {"iterations": 20},
        "code_fingerprint": code if code is not None else {"iql.py": envs.file_hash(REPO / "iql.py")},
        "dataset_fingerprint": "f00d"}))
    rows = "".join(f"{s},{s * 256},{s / 100:.1f},{score * s / 1000:.3f},10\n" for s in (250, 500, 750, 1000))
    (folder / "curve.csv").write_text("step,samples,wall_time_s,normalized_score,episodes\n" + rows)
    (folder / "command.txt").write_text(f"python iql.py --seed {seed}\n")
    return folder


def test_a_real_run_round_trips_from_its_record_into_the_table(tmp_path):
    import iql

    results_dir = tmp_path / "results"
    summary = iql.main(iql.Args(env="coordination", dataset="favorable", total_steps=200, eval_every=100,
                                eval_episodes=20, run_dir=str(tmp_path / "run"), results_dir=str(results_dir / "3"),
                                budget="quick"))
    record = results_dir / "3" / "coordination__full__favorable__iql__1"
    # no checkpoint, no TensorBoard; the critic's log (training.csv) travels with the record
    assert sorted(p.name for p in record.iterdir()) == sorted(envs.RECORD_FILES + ("training.csv",))
    kept = json.loads((record / "summary.json").read_text())
    assert kept["budget"] == "quick" and kept["method"] == "iql" and len(kept["episode_lengths"]) == 20
    assert kept["dataset_fingerprint"] == envs.dataset_fingerprint("coordination", "favorable")
    assert kept["code_fingerprint"] == envs.code_fingerprint("iql.py")
    curve = (record / "curve.csv").read_text().splitlines()
    assert curve[0] == ",".join(envs.CURVE_COLUMNS) and [r.split(",")[0] for r in curve[1:]] == ["100", "200"]
    assert curve[-1].endswith(",20")  # the last row is the final evaluation (20 episodes here)
    assert "--results-dir" in (record / "command.txt").read_text() or (record / "command.txt").read_text().startswith("python")

    table = results.generate_markdown(results_dir=results_dir, plots_dir=tmp_path / "plots", repo=REPO)
    row = next(line for line in table.splitlines() if line.startswith("| full | favorable |"))
    assert f"{summary['normalized_score_mean']:.2f} ± – (1) (paper 1.00 ± 0.00)" in row and "†" not in row
    assert "missing" in row  # MAIQL, IBC and MOMA-PPO have no record here
    assert "budget `quick`" in table and "200" not in row


def test_stale_records_are_flagged_and_budgets_never_mix(tmp_path, monkeypatch):
    root = tmp_path / "results"
    _fake_record(root, "3", "iql", 1, 1.0)
    _fake_record(root, "3", "iql", 2, 0.5)
    _fake_record(root, "3", "ibc", 1, 0.25, code={"ibc.py": "0000000000000000", "envs.py": envs.file_hash(REPO / "envs.py")})
    _fake_record(root, "3", "maiql", 1, 0.0, budget="paper")

    monkeypatch.setattr(envs, "dataset_fingerprint", lambda env, dataset: None)  # not built here
    table = results.generate_markdown(results_dir=root, plots_dir=tmp_path / "plots", repo=REPO)
    quick = table[table.index("budget `quick`"):table.index("budget `paper`")]
    row = next(line for line in quick.splitlines() if line.startswith("| full | favorable |"))
    assert "0.75 ± 0.25 (2) (paper" in row and "0.75 ± 0.25 (2) †" not in row  # IQL: fresh
    assert "0.25 ± – (1) †" in row  # IBC: its script changed since the run
    assert "full favorable IBC, seeds 1: code changed since the run: ibc.py" in quick
    assert "dataset not built here, fingerprint not checked" in quick
    maiql_cell = [c.strip() for c in row.split("|")][4]  # | | obs | dataset | IQL | MAIQL | ...
    assert maiql_cell.startswith("missing")  # the paper-budget MAIQL record is in its own table, not in the quick one
    paper = table[table.index("budget `paper`"):]
    assert "0.00 ± – (1)" in paper

    monkeypatch.setattr(envs, "dataset_fingerprint", lambda env, dataset: "beef")  # the dataset was rebuilt
    table = results.generate_markdown(results_dir=root, plots_dir=tmp_path / "plots", repo=REPO)
    assert "dataset rebuilt since the run (fingerprint f00d -> beef)" in table
    row = next(line for line in table.splitlines() if line.startswith("| full | favorable |"))
    assert "0.75 ± 0.25 (2) †" in row


def test_a_moma_ppo_cell_made_before_its_preset_iterations_changed_is_stale(tmp_path, monkeypatch):
    """Run names leave --iterations out and a recheck runs 2 iterations, so a cell made at the old preset would pass
    both: its config's iterations flag it. Diagnosis rows and the quick budget (which sets its own) are not flagged."""
    root = tmp_path / "results"
    code = {"iql.py": envs.file_hash(REPO / "iql.py")}  # a file today's code has: only the iterations can flag it
    for table, budget, iterations in (("4a", "default", 400), ("4a", "default", 800), ("diagnosis", "default", 400),
                                      ("4a", "quick", 50)):
        folder = _fake_record(root, table, "moma_ppo", iterations, 0.9, obs="leader-only", env="reacher",
                              dataset="expert-mix", budget=budget, code=code)
        summary = json.loads((folder / "summary.json").read_text())
        summary["config"]["iterations"] = iterations
        (folder / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(envs, "dataset_fingerprint", lambda env, dataset: "f00d")
    monkeypatch.setitem(results.MOMA_PRESET_ITERATIONS, "reacher", 800)
    staleness = results.Staleness(repo=REPO, equivalences=[])
    reasons = {(r.table, r.summary["budget"], r.summary["config"]["iterations"]): staleness.check(r)[0]
               for r in results.load_records(root)}
    assert reasons[("4a", "default", 400)] == ["made at 400 iterations; the preset is now 800"]
    assert reasons[("4a", "default", 800)] == [] and reasons[("diagnosis", "default", 400)] == []
    assert reasons[("4a", "quick", 50)] == []


def test_plots_are_drawn_from_a_results_tree(tmp_path, monkeypatch):
    root = tmp_path / "results"
    for seed in (1, 2):
        _fake_record(root, "3", "iql", seed, 1.0)
        _fake_record(root, "3", "moma_ppo", seed, 0.5 * seed)
        for method in results.ABLATION_METHODS:
            for obs in ("full", "partial"):
                _fake_record(root, "ablation", method, seed, 0.2 * seed, obs=obs, env="ant", dataset="full-replay")
    (root / "datasets").mkdir()
    (root / "datasets" / "ant__full-replay.json").write_text(json.dumps(
        {"env": "ant", "name": "full-replay", "mean_score_pct": 30.0, "standing_still_score": 0.05}))
    plots = tmp_path / "docs" / "plots"
    written = results.make_plots(results_dir=root, plots_dir=plots)
    names = sorted(p.name for p in written)
    assert names == ["3__quick__coordination__full__favorable.png", "ablation__quick.png"], names
    for p in written:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000  # small images for the docs
    monkeypatch.setattr(envs, "dataset_fingerprint", lambda env, dataset: None)
    table = results.generate_markdown(results_dir=root, plots_dir=plots, repo=REPO)
    assert "![3__quick__coordination__full__favorable](plots/3__quick__coordination__full__favorable.png)" in table
    assert "(plots/ablation__quick.png)" in table


def test_curve_of_a_resumed_run_drops_the_rows_of_the_lost_part(tmp_path):
    curve = envs.CurveLog(tmp_path)
    for step in (10, 20, 30):
        curve.add(step, step * 256, step / 10, step / 100, 10)
    resumed = envs.CurveLog(tmp_path, resume_step=20)  # the checkpoint was at step 20: step 30 is trained again
    resumed.add(30, 30 * 256, 3.5, 0.5, 10)
    resumed.add(30, 30 * 256, 3.6, 0.6, 100)  # the final evaluation at the same step replaces the in-training one
    rows = (tmp_path / "curve.csv").read_text().splitlines()
    assert rows == ["step,samples,wall_time_s,normalized_score,episodes", "10,2560,1.0,0.1,10", "20,5120,2.0,0.2,10",
                    "30,7680,3.6,0.6,100"]


def test_readme_result_section_holds_no_number_that_results_does_not():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## Results"):]
    section = section[:section.index("\n## ", 1)]
    # Scores (decimals) in the section must be scores of committed records; the hand-typed ones moved to
    # results/legacy.md, which docs/results.md shows under its own heading.
    numbers = set(re.findall(r"(?<![\w.§])-?\d+\.\d+", section))  # §6.3 is a section, not a number
    held = set()
    for r in results.load_records(REPO / "results"):
        held |= {f"{r.score:.2f}", f"{r.score:.3f}"}
    assert numbers <= held, f"numbers in README's result section without a record in results/: {sorted(numbers - held)}"
    assert "docs/results.md" in section


@pytest.mark.parametrize("flags, expected", [
    ([], "moma_ppo"), (["--penalty", "aleatoric"], "moma_ppo-aleatoric"),
    (["--no-adaptive-rollout"], "moma_ppo-no_adaptive_rollout"),
    (["--penalty", "aleatoric", "--no-adaptive-rollout"], "moma_ppo-aleatoric-no_adaptive_rollout"),
    (["--lambda-g", "1.0", "--iterations", "7"], "moma_ppo-lambda_g=1"),  # a diagnosis cell; the budget is not named
    (["--start-history", "policy", "--history-actions", "mean"], "moma_ppo-start_history=policy-history_actions=mean"),
    # Ant's preset cut is the terminal one: the paper's timeout is the named variant; where no cut can happen (no
    # adaptive rollouts, or the simulator's ε_g = 0) the cut is not named
    (["--uncertainty-cut", "terminal"], "moma_ppo"), (["--uncertainty-cut", "timeout"], "moma_ppo-uncertainty_cut=timeout"),
    (["--ground-truth", "--uncertainty-cut", "timeout"], "moma_ppo-ground_truth"),
    (["--bf16"], "moma_ppo-bf16=True")])  # bfloat16 runs never land in the fp32 cell
def test_run_all_names_ablation_cells_as_moma_ppo_names_its_records(flags, expected, tmp_path):
    """run_all.sh decides a cell is done by its record's folder name, so both must agree."""
    import subprocess

    import tyro

    import moma_ppo

    args = moma_ppo.resolve(tyro.cli(moma_ppo.Args, args=["--env", "ant", "--obs", "full", "--dataset", "full-replay"] + flags))
    assert moma_ppo.method_name(args) == expected
    script = (REPO / "run_all.sh").read_text()
    method_of = script[script.index("method_of() {"):script.index("\n}\n", script.index("method_of() {")) + 3]
    out = subprocess.run(["bash", "-c", method_of + 'method_of "$@"', "_", "moma_ppo.py", "ant", "full"] + flags,
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("script, flags, expected", [
    ("iql.py", [], "iql"), ("itd3bc.py", [], "itd3bc"), ("itd3bc.py", ["--mixer"], "matd3bc"),
    ("maiql.py", [], "maiql"), ("maiql.py", ["--finetune"], "maiql_ft")])
def test_run_all_names_variant_cells_as_the_scripts_name_their_records(script, flags, expected):
    """The model-free scripts file their records under their file name, with the variants' suffixes; run_all.sh
    names the cells alike (tests/test_*_family.py check the scripts' side)."""
    import subprocess

    script_text = (REPO / "run_all.sh").read_text()
    method_of = script_text[script_text.index("method_of() {"):script_text.index("\n}\n", script_text.index("method_of() {")) + 3]
    out = subprocess.run(["bash", "-c", method_of + 'method_of "$@"', "_", script, "reacher", "leader-only"] + flags,
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == expected


def test_code_fingerprint_ignores_comments_and_docs_but_not_code(tmp_path):
    """Records go stale when the code that made them changes, not when a comment or a help text does."""
    original = 'class Args:\n    lr: float = 1e-3\n    """learning rate"""\n\n\ndef f(x):\n    """Doc."""\n    return x * 2\n'
    reworded = ('"""A module docstring."""\n\nclass Args:\n    lr: float = 1e-3\n    """the step size"""\n\n'
                'def f(x):\n    # why: doubling\n    return x * 2\n')
    changed = original.replace("x * 2", "x * 3")
    hashes = []
    for i, text in enumerate((original, reworded, changed)):
        (tmp_path / f"m{i}.py").write_text(text)
        hashes.append(envs.file_hash(tmp_path / f"m{i}.py"))
    assert hashes[0] == hashes[1] and hashes[0] != hashes[2]


def test_a_record_of_changed_code_is_fresh_only_where_a_recheck_vouches_for_its_code_env_and_settings(tmp_path,
                                                                                                     monkeypatch):
    """results/code_equivalence.json (written by `results.py recheck`) clears the stale mark of exactly the records
    whose code, env, observability and settings a bit-identical short rerun covered; they are shown with ≡."""
    root = tmp_path / "results"
    old_code = {"iql.py": "0000000000000000", "envs.py": envs.file_hash(REPO / "envs.py")}
    for seed in (1, 2):
        _fake_record(root, "3", "iql", seed, 1.0, code=old_code)
    other = _fake_record(root, "3", "iql", 3, 1.0, code=old_code, dataset="neutral")
    summary = json.loads((other / "summary.json").read_text())
    summary["config"] = {"iterations": 20, "learning_rate": 0.1}  # another setting: not covered by the check
    (other / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(envs, "dataset_fingerprint", lambda env, dataset: None)

    table = results.generate_markdown(results_dir=root, plots_dir=tmp_path / "plots", repo=REPO)
    assert "full favorable IQL, seeds 1, 2: code changed since the run: iql.py" in table

    current = {"iql.py": envs.file_hash(REPO / "iql.py"), "envs.py": envs.file_hash(REPO / "envs.py")}
    entry = {"script": "iql.py", "env": "coordination", "obs": "full", "from": old_code, "to": current,
             "config_key": results.config_key({"config": {"iterations": 999, "seed": 7}}),  # budget, seed: volatile
             "from_commit": "a" * 40, "to_commit": "b" * 40}
    (root / results.EQUIVALENCE_FILE).write_text(json.dumps([entry]))
    table = results.generate_markdown(results_dir=root, plots_dir=tmp_path / "plots", repo=REPO)
    favorable = next(line for line in table.splitlines() if line.startswith("| full | favorable |"))
    neutral = next(line for line in table.splitlines() if line.startswith("| full | neutral |"))
    assert "1.00 ± 0.00 (2) ≡" in favorable and "†" not in favorable
    assert "1.00 ± – (1) †" in neutral  # its learning rate differs from the checked settings
    assert "* full favorable IQL, seeds 1, 2: aaaaaaaa -> bbbbbbbb" in table

    stale = results.Staleness(REPO, equivalences=[dict(entry, to={**current, "iql.py": "1" * 16})])
    record = next(r for r in results.load_records(root) if r.summary["seed"] == 1)
    assert stale.code_reason(record.summary) == "code changed since the run: iql.py"  # checked against other code
    assert stale.vouched(record.summary) is None


def test_recheck_does_not_rerun_a_group_it_already_found_different_until_asked_again(tmp_path, monkeypatch):
    """results/code_differences.json keeps the groups a recheck found to differ; a later recheck names them and skips
    them while their code and today's are the same as then (each costs minutes of CPU), and `--again` reruns them."""
    root = tmp_path / "results"
    old_code = {"iql.py": "0000000000000000"}
    for seed in (1, 2):
        _fake_record(root, "3", "iql", seed, 1.0, code=old_code)
    _fake_record(root, "3", "iql", 1, 1.0, code=old_code, dataset="neutral", obs="partial")  # another observability
    monkeypatch.setattr(envs, "dataset_fingerprint", lambda env, dataset: None)
    current = {"iql.py": envs.file_hash(REPO / "iql.py")}
    entry = {"script": "iql.py", "env": "coordination", "obs": "full", "from": old_code, "to": current,
             "config_key": results.config_key({"config": {"iterations": 20}}), "from_commit": "a" * 40,
             "to_commit": "b" * 40, "checked": "2026-12-01", "found": "greedy episodes differ"}
    (root / results.DIFFERENCES_FILE).write_text(json.dumps([entry]))

    lines = results.recheck(results_dir=root, work_dir=tmp_path / "work" / "recheck", dry_run=True)
    skipped = [line for line in lines if "DIFFERENT when checked on 2026-12-01" in line]
    assert skipped == ["3/coordination__full__favorable__iql__1, 3/coordination__full__favorable__iql__2: DIFFERENT "
                       "when checked on 2026-12-01 at aaaaaaaa against today's code: stays stale, not rerun "
                       "(`--again` reruns it)"]
    assert any(line.startswith("3/coordination__partial__neutral__iql__1: ") and "DIFFERENT" not in line
               for line in lines)  # not covered by the entry: checked as usual
    # the same group against other code today, or asked again: checked as usual
    assert not any("DIFFERENT when" in line
                   for line in results.recheck(results_dir=root, work_dir=tmp_path / "w", dry_run=True, again=True))
    (root / results.DIFFERENCES_FILE).write_text(json.dumps([dict(entry, to={"iql.py": "1" * 16})]))
    assert not any("DIFFERENT when" in line
                   for line in results.recheck(results_dir=root, work_dir=tmp_path / "w", dry_run=True))
    # and it is no equivalence: the records stay stale
    table = results.generate_markdown(results_dir=root, plots_dir=tmp_path / "plots", repo=REPO)
    assert "full favorable IQL, seeds 1, 2: code changed since the run: iql.py" in table


def test_recheck_gives_todays_run_the_records_settings_where_a_preset_moved_since():
    """A record made before Ant's preset got the terminal-height margin ran without it, and its command.txt has no
    flag for it: today's rerun of that command gets `--terminal-height-margin 0` (the record's value, or the off value
    of a setting the record predates), so the recheck compares the same computation, not the new preset."""
    argv = ["moma_ppo.py", "--env", "ant", "--obs", "partial", "--dataset", "medium", "--seed", "1"]
    assert results.settings_flags(argv, {"config": {"terminal_height_margin": 0.0}}) == ["--terminal-height-margin", "0"]
    assert results.settings_flags(argv, {"config": {}}) == ["--terminal-height-margin", "0"]  # made before the flag
    assert results.settings_flags(argv, {"config": {"terminal_height_margin": 0.1, "lambda_g": 0.1}}) == []
    assert results.settings_flags(argv, {"config": {"terminal_height_margin": 0.1, "lambda_g": 1.0,
                                                    "minibatch_size": 4096, "anneal_lr": True}}) == [
        "--lambda-g", "1", "--minibatch-size", "4096"]  # a switch (anneal_lr) is left to differ
    reacher = ["moma_ppo.py", "--env", "reacher", "--obs", "leader-only"]
    assert results.settings_flags(reacher, {"config": {"terminal_height_margin": 0.0}}) == []
    assert results.settings_flags(["iql.py", "--env", "ant"], {"config": {"learning_rate": 1.0}}) == []


def test_recheck_reruns_the_records_own_command_shortened_and_finds_the_commit_of_its_code(tmp_path):
    folder = _fake_record(tmp_path / "results", "4b", "moma_ppo", 1, 0.5, env="ant", dataset="medium")
    (folder / "command.txt").write_text(
        "python moma_ppo.py --env ant --obs partial --dataset medium --seed 1 --exp-name moma_ppo --run-dir runs/x "
        "--results-dir results/4b --budget default --torch-threads 1 --lambda-g 1.0\n"
        "python moma_ppo.py --resume --iterations 240 --run-dir runs/x\n")
    record = results.load_records(tmp_path / "results")[0]
    argv = results.recheck_argv(record)
    assert argv == ["moma_ppo.py", "--env", "ant", "--obs", "partial", "--dataset", "medium", "--seed", "1",
                    "--exp-name", "moma_ppo", "--lambda-g", "1.0", *results.RECHECK_BUDGET["moma_ppo.py"]]
    (folder / "command.txt").write_text("run it by hand\n")
    with pytest.raises(envs.MomaError, match="command.txt"):
        results.recheck_argv(results.load_records(tmp_path / "results")[0])

    import torch
    checkpoint = {"agent": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}, "step": 300,
                  "optimizer": {"state": [torch.ones(2)]}}
    torch.save(checkpoint, tmp_path / "old.pt")
    torch.save({**checkpoint, "new_field": torch.ones(1)}, tmp_path / "same.pt")  # a field only new code writes
    checkpoint["optimizer"]["state"][0] = torch.tensor([1.0, 1.0 + 2 ** -20])  # one moment off by one ulp-ish
    torch.save(checkpoint, tmp_path / "other.pt")
    assert results._compare_checkpoints(tmp_path / "old.pt", tmp_path / "same.pt") == (3, [])
    assert results._compare_checkpoints(tmp_path / "old.pt", tmp_path / "other.pt") == (3, ["/optimizer/state/0"])
    assert results._compare_checkpoints(tmp_path / "old.pt", tmp_path / "missing.pt") == (0, [])

    import fcntl
    (tmp_path / "work").mkdir()
    with open(tmp_path / "work" / "recheck.lock", "w") as held:  # another recheck is running
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(envs.MomaError, match="another `results.py recheck` is running"):
            results.recheck(results_dir=tmp_path / "results", work_dir=tmp_path / "work" / "recheck")
    assert results.recheck(results_dir=tmp_path / "empty", work_dir=tmp_path / "work" / "recheck") == [
        "nothing to recheck: every record's code is today's or checked equivalent"]

    if not (REPO / ".git").exists():
        pytest.skip("not a git clone")
    import subprocess
    blob = subprocess.run(["git", "show", "HEAD:iql.py"], cwd=REPO, capture_output=True, check=True).stdout
    (tmp_path / "iql.py").write_bytes(blob)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    found = results.commit_with_code({"iql.py": envs.file_hash(tmp_path / "iql.py")}, {})
    assert found is not None and subprocess.run(["git", "merge-base", "--is-ancestor", found, head], cwd=REPO).returncode == 0
    assert results.commit_with_code({"iql.py": "0" * 16}, {}) is None


def test_a_diagnosis_record_shows_its_changes_reach_and_curve(tmp_path):
    record = tmp_path / "results" / "diagnosis" / "ant__partial__medium__moma_ppo-lambda_g=1__1"
    record.mkdir(parents=True)
    (record / "summary.json").write_text(json.dumps({
        "env": "ant", "obs": "partial", "dataset_id": "moma/ant/medium-v0", "seed": 1, "method": "moma_ppo-lambda_g=1",
        "budget": "quick", "normalized_score_mean": 0.41, "normalized_score_std": 0.2, "train_steps": 1000,
        "wall_time_s": 60.0, "episode_lengths": [1000, 1000, 1000, 250]}))
    (record / "curve.csv").write_text("step,samples,wall_time_s,normalized_score,episodes\n10,100,5,0.1,5\n"
                                      "20,200,10,0.5,5\n30,300,15,0.4,5\n")
    (record / "command.txt").write_text("python moma_ppo.py --lambda-g 1.0\n")
    text = results.generate_markdown(tmp_path / "results", tmp_path / "plots", REPO)
    row = next(line for line in text.splitlines() if line.startswith("| lambda_g=1"))
    assert "0.410 ± 0.200" in row and "75%" in row and "0.10 → 0.50 → 0.40" in row


def test_table_log_keeps_whole_rows_and_drops_the_lost_part_on_resume(tmp_path):
    log = envs.TableLog(tmp_path / "training.csv", ("iteration", "loss", "score"))
    for i in range(1, 6):
        log.add({"iteration": i, "loss": 1.0 / i, **({"score": 0.5} if i % 2 == 0 else {})})
    lines = (tmp_path / "training.csv").read_text().splitlines()
    assert lines[0] == "iteration,loss,score" and lines[2] == "2,0.5,0.5" and lines[3] == "3,0.333333,"
    resumed = envs.TableLog(tmp_path / "training.csv", ("iteration", "loss", "score"), resume_step=3)
    resumed.add({"iteration": 4, "loss": 9.0})  # the run after its checkpoint at 3: rows 4 and 5 were lost
    assert (tmp_path / "training.csv").read_text().splitlines()[1:] == ["1,1,", "2,0.5,0.5", "3,0.333333,", "4,9,"]
    with pytest.raises(ValueError, match="unknown columns"):
        resumed.add({"iteration": 5, "los": 1.0})


def test_diagnosis_runs_get_a_figure_of_their_training_logs_in_the_results_page(tmp_path):
    root, plots = tmp_path / "results", tmp_path / "plots"
    for method, obs in (("moma_ppo", "partial"), ("moma_ppo-ground_truth", "partial"), ("moma_ppo", "full")):
        folder = _fake_record(root, "diagnosis", method, 1, 0.1, obs=obs, env="ant", dataset="medium")
        log = envs.TableLog(folder / "training.csv", ("iteration", "synthetic_steps", "eval_score", "lambda_return"))
        for i in range(1, 5):
            log.add({"iteration": i, "synthetic_steps": 1000 * i, "lambda_return": float(i),
                     **({"eval_score": 0.1 * i} if i % 2 == 0 else {})})
    written = results.make_plots(results_dir=root, plots_dir=plots)
    figure = plots / "diagnosis_training__quick.png"
    assert figure in written and figure.stat().st_size > 10_000
    log = results.read_training_log(root / "diagnosis" / envs.record_name("ant", "full", "medium", "moma_ppo", 1))
    assert log["lambda_return"].tolist() == [1.0, 2.0, 3.0, 4.0] and np.isnan(log["eval_score"][0])
    assert "plots/diagnosis_training__quick.png" in results.generate_markdown(root, plots)


def test_each_envs_diagnosis_gets_its_own_section_and_figure_and_a_longer_run_says_so(tmp_path):
    import moma_ppo

    assert results.MOMA_PRESET_ITERATIONS == {env: p["iterations"] for env, p in moma_ppo.PRESETS.items()}
    root, plots = tmp_path / "results", tmp_path / "plots"
    runs = (("ant", "partial", "medium", "moma_ppo", 80), ("reacher", "leader-only", "expert-mix", "moma_ppo", 1600),
            ("reacher", "leader-only", "expert-mix", "moma_ppo-ground_truth", 800),
            ("reacher", "independent", "expert-mix", "icql-15k", None))  # a baseline's record, extended
    for env, obs, dataset, method, iterations in runs:
        folder = _fake_record(root, "diagnosis", method, 1, 0.9, obs=obs, env=env, dataset=dataset)
        summary = json.loads((folder / "summary.json").read_text())
        summary["config"]["iterations"] = iterations
        summary["episode_returns"] = [-4.237, -11.145] if env == "reacher" else [1.0]
        (folder / "summary.json").write_text(json.dumps(summary))
        log = envs.TableLog(folder / "training.csv", ("iteration", "synthetic_steps", "eval_score"))
        for i in range(1, 5):
            log.add({"iteration": i, "synthetic_steps": 1000 * i, "eval_score": 0.2 * i})
    written = results.make_plots(results_dir=root, plots_dir=plots)
    assert plots / "diagnosis_training__quick.png" in written and plots / "diagnosis_training__quick__reacher.png" in written
    text = results.generate_markdown(root, plots)
    ant, reacher = text.split(f"## {results.DIAGNOSIS_TITLES['reacher']}")
    # (a row may carry a stale mark: the fake records' dataset fingerprint is not this machine's build)
    rows = lambda text: [line.split(" | ")[:2] for line in text.splitlines() if line.startswith("| ")]  # noqa: E731
    names = lambda text, where: [n.removeprefix("| ").removesuffix(" †") for n, w in rows(text) if w == where]  # noqa: E731
    assert results.DIAGNOSIS_TITLES["ant"] in ant and names(ant, "partial, medium") == ["(the preset)"]
    assert "leader-only, expert-mix" not in ant
    assert "episodes reaching 50 steps" in reacher and "partial, medium" not in reacher
    assert sorted(names(reacher, "leader-only, expert-mix")) == ["ground_truth", "iterations=1600"]
    icql = next(line for line in reacher.splitlines()  # (stale mark or not: see above)
                if re.match(r"\| ICQL, 15k( †)? \| independent, expert-mix \|", line))
    assert "| 1k grad steps |" in icql  # a baseline's training in gradient steps, not synthetic ones
    assert "plots/diagnosis_training__quick__reacher.png" in reacher
    assert "(paper's scale 0.500)" in reacher and "paper's scale" not in ant.split("## Diagnosis")[-1]


def test_rename_moves_a_record_to_its_new_method_name_and_refuses_anything_else(tmp_path):
    # a preset change makes a setting's records the preset's: only the method part of the name may change
    folder = _fake_record(tmp_path, "diagnosis", "moma_ppo-minibatch_size=1024", 2, 0.58, env="ant", dataset="medium")
    old, new = folder.name, folder.name.replace("moma_ppo-minibatch_size=1024", "moma_ppo")
    moved = results.rename_record(tmp_path / "diagnosis", old, new, "1,024 became the preset")
    assert moved.name == new and not folder.exists()
    summary = json.loads((moved / "summary.json").read_text())
    assert summary["method"] == "moma_ppo" and summary["renamed_from"].startswith(old)
    assert (moved / "curve.csv").exists() and summary["normalized_score_mean"] == 0.58
    other = _fake_record(tmp_path, "diagnosis", "moma_ppo-x", 2, 0.1, env="ant", dataset="medium")
    with pytest.raises(envs.MomaError, match="exists already"):  # the target exists: refused, nothing moved
        results.rename_record(tmp_path / "diagnosis", other.name, new, "x")
    assert other.exists() and json.loads((moved / "summary.json").read_text())["normalized_score_mean"] == 0.58
    with pytest.raises(envs.MomaError, match="only its method"):  # another seed is another run
        results.rename_record(tmp_path / "diagnosis", new, new.replace("__2", "__9"), "x")
    with pytest.raises(envs.MomaError, match="not a record"):
        results.rename_record(tmp_path / "diagnosis", new.replace("__2", "__7"), new.replace("__2", "__7").replace(
            "moma_ppo", "moma_ppo-x"), "x")


def test_table4b_bars_judge_moma_ppo_against_the_references_and_the_best_baseline_so_far(tmp_path):
    root = tmp_path / "results"

    def add(method, obs, dataset, seed, score, lengths):
        folder = _fake_record(root, "4b", method, seed, score, obs=obs, env="ant", dataset=dataset, budget="default")
        summary = json.loads((folder / "summary.json").read_text())
        summary["episode_lengths"] = lengths
        (folder / "summary.json").write_text(json.dumps(summary))

    # full/medium: 3 seeds at 0.9 (9 of 10 episodes full length) against ITD3+BC 0.85 and a dataset mean of 0.67
    for seed in (1, 2, 3):
        add("moma_ppo", "full", "medium", seed, 0.9, [1000] * 9 + [300])
    add("itd3bc", "full", "medium", 1, 0.85, [1000] * 10)
    # partial/medium: 2 seeds at 0.30 / 0.40 (mean 0.35), all full length, against IBC 0.30: a margin of +0.05 < 0.1
    add("moma_ppo", "partial", "medium", 1, 0.30, [1000] * 4)
    add("moma_ppo", "partial", "medium", 2, 0.40, [1000] * 4)
    add("ibc", "partial", "medium", 1, 0.30, [1000] * 4)
    (root / "datasets").mkdir()
    (root / "datasets" / "ant__medium.json").write_text(json.dumps(
        {"env": "ant", "name": "medium", "mean_score_pct": 67.0, "standing_still_score": 0.2}))
    text = results.generate_markdown(root, tmp_path / "plots", REPO)
    full = next(line for line in text.splitlines() if line.startswith("| full | medium | 0.900"))
    cols = [c.strip() for c in full.strip("|").split("|")]
    assert cols[3] == "90%" and cols[4] == "dataset mean 0.670" and cols[5] == "yes"
    assert cols[6] == "ITD3+BC 0.85 (1)" and cols[7] == "+0.05 (≥ +0.0): yes" and cols[8] == "yes" and cols[9] == "yes"
    assert "IQL" in cols[10] and "ITD3+BC" not in cols[10]
    partial = next(line for line in text.splitlines() if line.startswith("| partial | medium | 0.350"))
    cols = [c.strip() for c in partial.strip("|").split("|")]
    assert cols[2].startswith("0.350 ± 0.050 (2)") and cols[4] == "standing still 0.200" and cols[5] == "yes"
    assert cols[7] == "+0.05 (≥ +0.1): **no**" and cols[8] == "yes" and cols[9] == "**no**"
    assert "IQL" not in cols[10].split(", ")  # no centralised IQL under partial observability


def test_table4a_shows_the_paper_scale_and_the_agents_conventions(tmp_path):
    root = tmp_path / "results"

    def add(method, obs, seed, returns, agents):
        folder = _fake_record(root, "4a", method, seed, 0.0, obs=obs, env="reacher", dataset="expert-mix",
                              budget="default")
        summary = json.loads((folder / "summary.json").read_text())
        summary["episode_returns"] = returns
        if agents is not None:
            summary["conventions"] = envs.convention_summary(np.array(agents))
        (folder / "summary.json").write_text(json.dumps(summary))

    # the paper's expert return (-4.237) reads 1.0 on its scale, its zero-torque arm (-11.145) 0.0
    add("moma_ppo", "leader-only", 1, [-4.237, -11.145], [[1, 1], [-1, 1]])
    add("moma_ppo", "leader-only", 2, [-4.237, -4.237], [[-1, -1], [-1, -1]])
    add("itd3bc", "independent", 1, [-11.145], None)  # a record from before the conventions were measured
    text = results.generate_markdown(root, tmp_path / "plots", REPO)
    moma = next(line for line in text.splitlines() if line.startswith("| leader-only | MOMA-PPO | 1,2"))
    cols = [c.strip() for c in moma.strip("|").split("|")]
    assert cols[4] == "0.75 ± 0.25"  # seeds 0.5 and 1.0 on the paper's scale
    assert cols[5] == "75% (2 of 2 seeds)"  # same convention in 1 of 2 and 2 of 2 episodes
    assert cols[6] == "25% / 50%"  # both counter-clockwise: 1/2 and 0; both clockwise: 0 and 2/2
    # agreeing episodes (pooled over seeds): 1.0, 1.0, 1.0; the one differing episode: the zero-torque 0.0
    assert cols[7] == "1.00 (3) / 0.00 (1)"
    itd3bc = next(line for line in text.splitlines() if line.startswith("| independent | ITD3+BC | 1"))
    assert "not recorded" in itd3bc and "0.00 ± –" in itd3bc and itd3bc.endswith("| n/a |")
    # the main table leads with the paper's scale too (comparable with its number), ours in square brackets
    main = next(line for line in text.splitlines() if line.startswith("| leader-only | expert-mix |"))
    assert re.search(r"\| 0\.75 ± 0\.25 \(2\)( †)? \[ours 0\.00 ± 0\.00\] \(paper 1\.00 ± 0\.01\) \|", main)


def test_a_world_models_held_out_report_is_kept_in_results_and_shown(tmp_path):
    import world_model

    small = dict(hidden_dim=16, n_hidden_layers=1, max_steps=60, eval_every=30, rollout_eval_starts=10)
    # seed 23: a model of its own (the cache is shared by the test session; the presets' seed-0 models stay untouched)
    world_model.load_or_train("coordination", "neutral", seed=23, **small)
    model = world_model.load(world_model.artifact_path("coordination", "neutral", 23), "coordination", "neutral")
    written = results.write_world_model_reports(tmp_path / "results", seed=23)
    kept = tmp_path / "results" / "world_models" / "coordination__neutral__seed23.json"
    assert kept in written
    report = json.loads(kept.read_text())
    assert report["dataset_fingerprint"] == envs.dataset_fingerprint("coordination", "neutral")
    assert report["holdout_mse"] == model.metrics["holdout_mse"] and report["train_steps"] == 60
    assert "history" not in report and report["hyper"]["hidden_dim"] == 16
    text = results.generate_markdown(tmp_path / "results", tmp_path / "plots", REPO)
    row = next(line for line in text.splitlines() if line.startswith("| `moma/coordination/neutral-v0`"))
    assert f"{min(report['holdout_mse']):.4f}-{max(report['holdout_mse']):.4f}" in row and "| 60 (step cap) |" in row
    import make_datasets

    assert row.count("|") == make_datasets.WORLD_MODEL_HEADER[0].count("|")


def test_the_plans_moma_ppo_iterations_are_its_presets():
    import moma_ppo

    assert results.MOMA_PPO_ITERATIONS == {env: preset["iterations"] for env, preset in moma_ppo.PRESETS.items()}


def test_the_cell_details_name_a_bfloat16_record(tmp_path):
    """The model-free scripts' --bf16 runs file into the same cell as fp32 ones: the table says which were bf16."""
    import results

    _fake_record(tmp_path, "3", "iql", 1, 1.0)
    folder = _fake_record(tmp_path, "3", "iql", 2, 1.0)
    summary = json.loads((folder / "summary.json").read_text())
    summary["config"]["bf16"] = True
    (folder / "summary.json").write_text(json.dumps(summary))
    steps = sorted(results.fmt_steps(r) for r in results.load_records(tmp_path))
    assert steps == ["1k grad steps", "1k grad steps, bfloat16 (--bf16)"]


@pytest.mark.parametrize("argv", [["--help"], ["recheck", "--help"], ["recheck", "-h", "--only", "x"], ["table", "--help"]])
def test_help_prints_the_usage_and_runs_nothing(argv, capsys, monkeypatch):
    # `results.py recheck --help` used to start the whole recheck (every subcommand reads its options by hand)
    def must_not_run(*args, **kwargs):
        raise AssertionError("a subcommand ran on --help")

    for name in ("recheck", "write_markdown", "make_plots", "plan"):
        monkeypatch.setattr(results, name, must_not_run)
    results.main(argv)
    assert "usage: python results.py" in capsys.readouterr().out


def test_run_all_asks_moma_ppo_for_a_name_once_per_version_of_the_code(tmp_path):
    """method_of keeps moma_ppo.py's answers in NAME_CACHE keyed by NAME_CODE: a second ask with the same code is
    answered from the file (here python is a stub that fails), one with other code asks moma_ppo.py again."""
    import subprocess

    script = (REPO / "run_all.sh").read_text()
    method_of = script[script.index("method_of() {"):script.index("\n}\n", script.index("method_of() {")) + 3]
    flags = ["--lambda-g", "1"]
    cache = tmp_path / "names.tsv"
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python").write_text("#!/bin/sh\nexit 3\n")
    (stub / "python").chmod(0o755)

    def ask(code, path=None):
        env = {**__import__("os").environ, "NAME_CACHE": str(cache), "NAME_CODE": code}
        if path:
            env["PATH"] = f"{path}:{env['PATH']}"
        return subprocess.run(["bash", "-c", method_of + 'method_of "$@"', "_", "moma_ppo.py", "ant", "full"] + flags,
                              capture_output=True, text=True, cwd=REPO, env=env)

    first = ask("aaaa")
    assert first.returncode == 0 and first.stdout.strip() == "moma_ppo-lambda_g=1"
    assert cache.read_text().splitlines() == ["aaaa ant full --lambda-g 1\tmoma_ppo-lambda_g=1"]
    cached = ask("aaaa", path=stub)  # python would fail: the answer comes from the cache
    assert cached.returncode == 0 and cached.stdout.strip() == "moma_ppo-lambda_g=1"
    other_code = ask("bbbb", path=stub)  # another version of the code is asked again (and the stub fails)
    assert other_code.returncode != 0 and other_code.stdout.strip() == ""
    assert len(cache.read_text().splitlines()) == 1


def test_a_collapsed_run_is_counted_apart_never_averaged_nor_a_baseline(tmp_path):
    root = tmp_path / "results"

    def add(method, seed, score, diverged=None, obs="full"):
        folder = _fake_record(root, "4b", method, seed, score, obs=obs, env="ant", dataset="medium", budget="default")
        summary = json.loads((folder / "summary.json").read_text())
        summary.update(episode_lengths=[1000] * 4, critic_value_bound=132.5, critic_diverged=diverged)
        (folder / "summary.json").write_text(json.dumps(summary))

    verdict = {"step": 37000, "td_loss": 1.66e5, "value_mean": None, "reason": "TD loss 1.662e+05 above 1.404e+05"}
    add("maiql", 1, 0.40)
    add("maiql", 2, 0.95, verdict)  # the diverged seed's score must not lift the mean
    add("icql", 1, 0.99, verdict)  # a baseline whose only run collapsed
    for seed in (1, 2, 3):
        add("moma_ppo", seed, 0.90)
    text = results.generate_markdown(root, tmp_path / "plots", REPO)
    row = next(line for line in text.splitlines() if line.startswith("| full | medium | missing"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in text.splitlines() if line.startswith("| obs | dataset | IQL"))
    col = {name.strip(): i for i, name in enumerate(header.strip("|").split("|"))}
    # († where the session's tiny test datasets make the fake fingerprint stale: not what is checked here)
    assert re.match(r"0\.40 ± – \(1\)( †)? \+ 1 collapsed ‡", cols[col["MAIQL"]]), cols[col["MAIQL"]]
    assert cols[col["ICQL"]].startswith("collapsed (1) ‡")
    assert "* full medium MAIQL, seed 2: diverged by step 37000 (TD loss 1.662e+05 above 1.404e+05); its final " \
           "score 0.950" in text
    bars = next(line for line in text.splitlines() if line.startswith("| full | medium | 0.900"))
    assert "MAIQL 0.40 (1)" in bars and "ICQL" in bars.split("|")[-2]  # ICQL: no usable record, so still missing
    # a critic record made before the verdict existed is named as unchecked, not silently trusted
    folder = _fake_record(root, "4b", "itd3bc", 1, 0.5, env="ant", dataset="medium", budget="default")
    text = results.generate_markdown(root, tmp_path / "plots", REPO)
    unchecked = next(line for line in text.splitlines() if line.startswith("Critics not checked"))
    assert "full medium ITD3+BC (seeds 1)" in unchecked and "MAIQL" not in unchecked and folder.exists()


def test_budget_details_show_the_learning_curve_half_way_and_at_the_end(tmp_path, monkeypatch):
    """Issue 15's 'budgets at which each curve has flattened': the evaluation nearest half the run, and the last."""
    root = tmp_path / "results"
    _fake_record(root, "3", "iql", 1, 1.0)  # curve at steps 250..1000: score · step / 1000
    _fake_record(root, "3", "iql", 2, 0.5)
    record = results.load_records(root)[0]
    assert results.half_to_end(record) == (record.score * 0.5, record.score)  # step 500 of 1000
    monkeypatch.setattr(envs, "dataset_fingerprint", lambda env, dataset: None)
    table = results.generate_markdown(results_dir=root, plots_dir=tmp_path / "plots", repo=REPO)
    row = next(line for line in table.splitlines() if line.startswith("| full | favorable | IQL | 1,2 |"))
    assert "| 0.38 → 0.75 (2) |" in row  # seeds' means: (0.5 + 0.25) / 2 half-way, (1.0 + 0.5) / 2 at the end
    (root / "3" / "coordination__full__favorable__iql__2" / "curve.csv").write_text(
        "step,samples,wall_time_s,normalized_score,episodes\n1000,256000,10.0,0.5,100\n")
    assert results.half_to_end(results.load_records(root)[1]) is None  # one evaluation: no curve to read


def test_a_curve_still_rising_at_the_end_of_its_budget_is_marked(tmp_path, monkeypatch):
    """Issue 15: 'where a method cannot reach [a flat curve] within the CPU budget, say so in the table'. A weighted
    straight line through the second half's evaluations (variance s² / episodes, s² from the final episodes),
    against hand-computed values."""
    root = tmp_path / "results"

    def record(seed, scores):
        folder = _fake_record(root, "3", "iql", seed, scores[-1])
        summary = json.loads((folder / "summary.json").read_text())
        summary["episode_normalized_scores"] = [0.6, 1.0]  # s² = 0.08 (ddof 1)
        (folder / "summary.json").write_text(json.dumps(summary))
        (folder / "curve.csv").write_text("step,samples,wall_time_s,normalized_score,episodes\n" + "".join(
            f"{step},1,1.0,{score},{n}\n" for step, score, n in zip((250, 500, 750, 1000), scores, (10, 10, 10, 100))))

    record(1, [0.9, 0.2, 0.5, 0.8])  # from step 500 (half-way) on: a line rising 0.6 over 500 steps
    rising = results.load_records(root)
    gain, se = results.second_half_gain(rising[0])  # step 250's 0.9 lies before the half: left out
    # weights 125, 125, 1250 at steps 500, 750, 1000: mean step 937.5, Sxx 33,203,125; s.e. = 500 / sqrt(Sxx)
    assert gain == pytest.approx(0.6) and se == pytest.approx(500 / np.sqrt(33_203_125))
    assert results.still_rising(rising) == pytest.approx((0.6, 500 / np.sqrt(33_203_125), True))
    record(2, [0.0, 0.5, 0.5, 0.5])  # flat: gain 0; with seed 1 the seeds' spread (s.e. 0.3) outweighs the mean
    both = results.load_records(root)
    assert results.second_half_gain(both[1])[0] == pytest.approx(0.0, abs=1e-12)
    gain, sem, up = results.still_rising(both)
    assert gain == pytest.approx(0.3) and sem == pytest.approx(0.3) and not up
    monkeypatch.setattr(envs, "dataset_fingerprint", lambda env, dataset: None)
    table = results.generate_markdown(results_dir=root, plots_dir=tmp_path / "plots", repo=REPO)
    row = next(line for line in table.splitlines() if line.startswith("| full | favorable |"))
    assert "| +0.30 ± 0.30 |" in table and "↗" not in row  # shown, not marked
    import shutil
    shutil.rmtree(root / "3" / "coordination__full__favorable__iql__2")
    table = results.generate_markdown(results_dir=root, plots_dir=tmp_path / "plots", repo=REPO)
    row = next(line for line in table.splitlines() if line.startswith("| full | favorable |"))
    assert "0.80 ± – (1) ↗" in row and "| +0.60 ± 0.09 ↗ |" in table


def test_a_longer_run_of_a_cells_seed_is_shown_beside_the_cell(tmp_path, monkeypatch):
    """Deliverable 2: what a budget cut, measured by a copy of one run resumed to a longer training."""
    root = tmp_path / "results"

    def add(table, method, seed, steps, returns, agents, budget="default"):
        folder = _fake_record(root, table, method, seed, 0.0, obs="independent", env="reacher", dataset="expert-mix",
                              budget=budget)
        summary = json.loads((folder / "summary.json").read_text())
        summary.update(train_steps=steps, episode_returns=returns, critic_diverged=None,
                       conventions=envs.convention_summary(np.array(agents)))
        (folder / "summary.json").write_text(json.dumps(summary))

    add("4a", "icql", 1, 5000, [-4.237, -11.145], [[1, 1], [-1, 1]])
    add("4a", "icql", 2, 5000, [-4.237, -4.237], [[1, 1], [1, 1]])
    add("diagnosis", "icql-15k", 1, 15000, [-11.145, -11.145], [[1, 1], [1, 1]])
    add("diagnosis", "icql-15k", 3, 15000, [-4.237], [[1, 1]])  # no cell of seed 3: not paired
    add("diagnosis", "icql-ground_truth", 2, 15000, [-4.237], [[1, 1]])  # another setting, not a longer budget
    monkeypatch.setattr(envs, "dataset_fingerprint", lambda env, dataset: None)
    text = results.generate_markdown(root, tmp_path / "plots", REPO)
    section = text.split("#### Longer runs of a cell's seed")[1].split("####")[0]
    lines = [line for line in section.splitlines() if line.startswith("* ")]
    assert len(lines) == 1 and lines[0].startswith("* independent expert-mix ICQL, seed 1: 5k grad steps: 0.50 [ours ")
    assert "50% same convention, agreeing episodes 1.00, critic bounded → 15k grad steps: 0.00 [ours " in lines[0]
    assert "100% same convention, agreeing episodes 0.00" in lines[0]


def test_a_reacher_curve_is_read_on_the_papers_scale_from_the_records_own_episodes(tmp_path):
    """Both scales are affine in the return; a record's episodes (returns and our scores) fix ours, so its curve's
    scores convert exactly: our refs -42.97 / -4.0 here, the paper's -11.145 / -4.237."""
    root = tmp_path / "results"
    folder = _fake_record(root, "4a", "itd3bc", 1, 0.0, obs="independent", env="reacher", dataset="expert-mix",
                          budget="default")
    ours = lambda r: (r + 42.97) / (-4.0 + 42.97)  # noqa: E731
    summary = json.loads((folder / "summary.json").read_text())
    summary["episode_returns"] = [-11.145, -4.237, -20.0]
    summary["episode_normalized_scores"] = [ours(r) for r in summary["episode_returns"]]
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "curve.csv").write_text("step,samples,wall_time_s,normalized_score,episodes\n"
                                      f"500,1,1.0,{ours(-11.145)},10\n1000,2,2.0,{ours(-4.237)},100\n")
    record = results.load_records(root)[0]
    assert results.to_paper_scale_reacher(record, results.half_to_end(record)) == pytest.approx([0.0, 1.0])
    assert results.fmt_half_to_end([record]) == "0.00 → 1.00 [ours 0.82 → 0.99] (1)"


def test_a_cross_play_report_of_runs_other_than_the_records_is_left_out_of_the_table(tmp_path):
    """A cross-play report copies the scores of the runs it stitched; once a record is rerun (another preset), the
    report describes agents that are gone and must not stand beside the new record as its cross-play."""
    root = tmp_path / "results"
    scores = {1: 0.95, 2: 0.97, 3: 0.99}
    for seed, score in scores.items():
        _fake_record(root, "4a", "ibc", seed, score, obs="independent", env="reacher", dataset="expert-mix",
                     budget="default")

    def report(seed, own, partners):
        (root / "4a" / "crossplay").mkdir(parents=True, exist_ok=True)
        (root / "4a" / "crossplay" / f"reacher__independent__expert-mix__ibc__{seed}.json").write_text(json.dumps(dict(
            method="ibc", env="reacher", obs="independent", seed=seed, budget="default",
            code_fingerprint=envs.code_fingerprint("ibc.py"), self_play=dict(normalized_score_mean=own, conventions=None),
            partners=[dict(partner_seed=s, partner_self_play_score=p, normalized_score_mean=0.5,
                           episode_returns=[-11.145]) for s, p in partners.items()])))

    report(1, 0.95, {2: 0.97})  # made from the records' runs
    report(2, 0.97, {1: 0.95})
    report(3, 0.80, {1: 0.95})  # seed 3's record was rerun since: its own score moved
    text = results.generate_markdown(root, tmp_path / "plots", REPO)
    row = next(line for line in text.splitlines() if line.startswith("| default | independent | IBC |"))
    assert "| 1,2 | 2 |" in row and "†" not in row  # seed 3's report is not averaged in
    left_out = text.split("Left out, made from runs other than the records")[1]
    assert "reacher__independent__expert-mix__ibc__3.json`: its run scored 0.8000, the record 0.9900" in left_out
    # a partner whose record moved makes the report outdated too
    report(2, 0.97, {1: 0.90})
    text = results.generate_markdown(root, tmp_path / "plots", REPO)
    assert "ibc__2.json`: partner seed 1 scored 0.9000, its record 0.9500" in text
    assert "| default | independent | IBC | 1 | 1 |" in text


def test_a_cross_play_report_of_changed_code_is_vouched_for_by_its_records_recheck(tmp_path, monkeypatch):
    """A report made with code a recheck found equivalent (for the record's env, observability and settings) keeps
    its row, marked ≡ like its records; changed code without such a check is marked †."""
    root = tmp_path / "results"
    monkeypatch.setattr(envs, "dataset_fingerprint", lambda env, dataset: None)
    old_code = {"ibc.py": "0000000000000000", "envs.py": envs.file_hash(REPO / "envs.py")}
    for seed, score in ((1, 0.95), (2, 0.97)):
        _fake_record(root, "4a", "ibc", seed, score, obs="independent", env="reacher", dataset="expert-mix",
                     budget="default", code=old_code)
    (root / "4a" / "crossplay").mkdir(parents=True)
    for seed, own, partner, theirs in ((1, 0.95, 2, 0.97), (2, 0.97, 1, 0.95)):
        (root / "4a" / "crossplay" / f"reacher__independent__expert-mix__ibc__{seed}.json").write_text(json.dumps(dict(
            method="ibc", env="reacher", obs="independent", seed=seed, budget="default", code_fingerprint=old_code,
            self_play=dict(normalized_score_mean=own, conventions=None),
            partners=[dict(partner_seed=partner, partner_self_play_score=theirs, normalized_score_mean=0.5,
                           episode_returns=[-11.145])])))
    row = lambda text: next(line for line in text.splitlines() if line.startswith("| default | independent | IBC |"))  # noqa: E731
    assert "| 1,2 † | 2 |" in row(results.generate_markdown(root, tmp_path / "plots", REPO))
    current = {"ibc.py": envs.file_hash(REPO / "ibc.py"), "envs.py": envs.file_hash(REPO / "envs.py")}
    entry = {"script": "ibc.py", "env": "reacher", "obs": "independent", "from": old_code, "to": current,
             "config_key": results.config_key({"config": {"iterations": 20}}), "from_commit": "a" * 40,
             "to_commit": "b" * 40}
    (root / results.EQUIVALENCE_FILE).write_text(json.dumps([entry]))
    assert "| 1,2 ≡ | 2 |" in row(results.generate_markdown(root, tmp_path / "plots", REPO))
    (root / results.EQUIVALENCE_FILE).write_text(json.dumps([dict(entry, obs="leader-only")]))  # another row's check
    assert "| 1,2 † | 2 |" in row(results.generate_markdown(root, tmp_path / "plots", REPO))


def test_compare_training_logs_finds_the_first_differing_row_and_ignores_timings(tmp_path):
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    import compare_training_logs as ctl

    head = "iteration,wall_time_s,sps,value_loss\n"
    (tmp_path / "a.csv").write_text(head + "1,1.0,100,0.5\n2,2.0,100,0.25\n3,3.0,100,0.125\n")
    (tmp_path / "b.csv").write_text(head + "1,1.7,90,0.5\n2,2.9,80,0.25\n")  # other timings, one row fewer
    (tmp_path / "c.csv").write_text(head + "1,1.0,100,0.5\n2,2.0,100,0.250001\n")
    assert ctl.main(str(tmp_path / "a.csv"), str(tmp_path / "b.csv")) == 0
    assert ctl.main(str(tmp_path / "a.csv"), str(tmp_path / "c.csv")) == 1
    rows = lambda p: list(__import__("csv").DictReader(open(p)))  # noqa: E731
    i, diff, n = ctl.first_difference(rows(tmp_path / "a.csv"), rows(tmp_path / "c.csv"))
    assert (i, diff, n) == (1, [("value_loss", "0.25", "0.250001")], 2)
