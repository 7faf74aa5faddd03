"""run_all.sh: a cell whose record is in results/ at the current budget is not run again, the plan says what is
left, and the tables (docs/results.md) come from results/ only."""

import json
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _record(path: pathlib.Path, algorithm: str, dataset: str, seed: int, score: float, budget: str) -> None:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({
        "algorithm": algorithm, "method": algorithm, "env": "coordination", "obs": "full", "seed": seed,
        "dataset_id": f"moma/coordination/{dataset}-v0", "budget": budget, "config": {"exp_name": algorithm},
        "normalized_score_mean": score, "train_steps": 1000, "wall_time_s": 10.0}, indent=1))
    (path / "curve.csv").write_text(f"step,samples,wall_time_s,normalized_score,episodes\n1000,256000,10.0,{score},100\n")
    (path / "command.txt").write_text("python iql.py --env coordination\n")


def _repo_copy(tmp_path: pathlib.Path) -> dict:
    for name in ("run_all.sh", "results.py", "envs.py"):
        shutil.copy(REPO / name, tmp_path / name)
    bin_dir = tmp_path / "bin"  # `python` on PATH must be this interpreter, virtual environment included (a
    bin_dir.mkdir()  # symlink would lose the venv: Python finds pyvenv.cfg next to the path it was started by)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "SEEDS_GAME": "1 2", "MPLBACKEND": "Agg"}


def test_finished_cells_are_skipped_and_the_table_comes_from_results_only(tmp_path):
    env = _repo_copy(tmp_path)
    for seed, score in ((1, 1.0), (2, 0.5)):
        for algorithm in ("moma_ppo", "iql", "ibc", "maiql"):
            for dataset in ("favorable", "neutral", "unfavorable"):
                _record(tmp_path / f"results/3/coordination__full__{dataset}__{algorithm}__{seed}", algorithm, dataset,
                        seed, score, "quick")
    # A finished run outside results/ never enters the tables.
    _record(tmp_path / "runs/my_quick_try", "iql", "favorable", 3, 0.0, "quick")

    out = subprocess.run(["bash", "run_all.sh", "3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "24 cells, 24 done already at this budget, 0 to run" in out.stdout  # the plan, before anything runs
    assert out.stdout.count("done already:") == 24 and ">>>" not in out.stdout  # nothing was run again
    table = (tmp_path / "docs/results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| full | favorable |"))
    # mean of 1.0 and 0.5 over the two seeds, s.e.m. 0.25; the 0.0 run outside results/ is ignored
    assert row.count("0.75 ± 0.25 (2)") == 4, row
    assert "budget `quick`" in table


def test_plan_counts_records_of_another_budget_as_to_rerun(tmp_path):
    env = _repo_copy(tmp_path)
    _record(tmp_path / "results/3/coordination__full__favorable__iql__1", "iql", "favorable", 1, 1.0, "quick")
    out = subprocess.run(["bash", "run_all.sh", "plan", "3"], cwd=tmp_path, env={**env, "BUDGET": "paper"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "plan (budget paper): 24 cells, 0 done already at this budget, 23 to run" in out.stdout, out.stdout
    assert "1 to rerun whose record in results/ has another budget" in out.stdout
    assert "estimated CPU time" in out.stdout and not (tmp_path / "docs/results.md").exists()  # plan only: nothing ran
    bad = subprocess.run(["bash", "run_all.sh", "plan", "3"], cwd=tmp_path, env={**env, "BUDGET": "huge"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown BUDGET=huge" in bad.stderr
