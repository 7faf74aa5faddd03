"""run_all.sh: the tables come from runs/paper only, and a finished cell is not run again."""

import json
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _summary(path: pathlib.Path, algorithm: str, dataset: str, score: float) -> None:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({
        "algorithm": algorithm, "env": "coordination", "obs": "full", "dataset_id": f"moma/coordination/{dataset}-v0",
        "config": {"exp_name": algorithm}, "normalized_score_mean": score}))


def test_tables_only_count_the_paper_runs_and_finished_cells_are_skipped(tmp_path):
    shutil.copy(REPO / "run_all.sh", tmp_path / "run_all.sh")
    bin_dir = tmp_path / "bin"  # `python` on PATH must be this interpreter (the table printer is Python)
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SEEDS_GAME": "1 2"}
    for seed, score in ((1, 1.0), (2, 0.5)):
        for algorithm in ("moma_ppo", "iql", "ibc", "maiql"):
            for dataset in ("favorable", "neutral", "unfavorable"):
                _summary(tmp_path / f"runs/paper/coordination__full__{dataset}__{algorithm}__{seed}", algorithm, dataset, score)
    _summary(tmp_path / "runs/my_quick_try", "iql", "favorable", 0.0)  # outside runs/paper: must not enter the table

    out = subprocess.run(["bash", "run_all.sh", "3"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("done already") == 24 and ">>>" not in out.stdout  # nothing was run again
    row = next(line for line in out.stdout.splitlines() if "favorable-v0" in line and "unfavorable" not in line)
    # mean of 1.0 and 0.5 over the two seeds, s.e.m. 0.25; the 0.0 run outside runs/paper is ignored
    assert row.count("0.75 ± 0.25 (2)") == 4, row
