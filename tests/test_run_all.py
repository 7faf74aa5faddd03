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


FAKE_SCRIPT = '''import json, os, pathlib, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
log = pathlib.Path(os.environ["FAKE_LOG"])
with open(log, "a") as f:
    f.write(f"start {os.getpid()}\\n")
    f.write("argv " + json.dumps([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]) + "\\n")
time.sleep(0.5)
if args["--dataset"] == "neutral" and args["--exp-name"] == "ibc":
    with open(log, "a") as f:
        f.write(f"end {os.getpid()}\\n")
    sys.exit("error: this cell fails")
name = pathlib.Path(args["--run-dir"]).name
out = pathlib.Path(args["--results-dir"]) / name
out.mkdir(parents=True)
(out / "summary.json").write_text(json.dumps({"algorithm": args["--exp-name"], "method": args["--exp-name"],
    "env": "coordination", "obs": "full", "seed": int(args["--seed"]), "budget": args["--budget"],
    "dataset_id": "moma/coordination/" + args["--dataset"] + "-v0", "normalized_score_mean": 1.0}))
(out / "curve.csv").write_text("step,samples,wall_time_s,normalized_score,episodes\\n1,1,1.0,1.0,1\\n")
(out / "command.txt").write_text("python fake\\n")
with open(log, "a") as f:
    f.write(f"end {os.getpid()}\\n")
'''


def test_jobs_run_cells_side_by_side_skip_cells_running_elsewhere_and_report_failures(tmp_path):
    import os

    env = _repo_copy(tmp_path)
    for script in ("moma_ppo.py", "iql.py", "ibc.py", "maiql.py"):
        (tmp_path / script).write_text(FAKE_SCRIPT)
    # one cell is being run by another run_all.sh right now (a live pid: this test's)
    (tmp_path / "runs/run_all/quick").mkdir(parents=True)
    (tmp_path / "runs/run_all/quick/coordination__full__favorable__iql__1.pid").write_text(str(os.getpid()))
    log = tmp_path / "fake.log"
    out = subprocess.run(["bash", "run_all.sh", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**env, "SEEDS_GAME": "1", "JOBS": "2", "FAKE_LOG": str(log)})
    assert out.returncode == 1 and "1 cell(s) failed" in out.stderr, (out.stdout, out.stderr)
    assert f"running already (pid {os.getpid()}): coordination__full__favorable__iql__1" in out.stdout
    assert not (tmp_path / "results/3/coordination__full__favorable__iql__1").exists()
    # the 10 other cells ran and left their records; the failing one left its error in its log
    records = sorted(p.name for p in (tmp_path / "results/3").iterdir())
    assert len(records) == 10 and "coordination__full__neutral__ibc__1" not in records
    assert "this cell fails" in (tmp_path / "runs/run_all/quick/logs/coordination__full__neutral__ibc__1.log").read_text()
    # never more than JOBS cells at once, and two at once at some point
    running, most = 0, 0
    for line in log.read_text().splitlines():
        running += 1 if line.startswith("start") else -1 if line.startswith("end") else 0
        most = max(most, running)
    assert most == 2, log.read_text()


def _slurm_copy(tmp_path: pathlib.Path, fake: bool = False) -> dict:
    env = _repo_copy(tmp_path)
    for name in ("slurm.py", "world_model.py"):
        shutil.copy(REPO / name, tmp_path / name)
    for script in ("moma_ppo.py", "iql.py", "ibc.py", "maiql.py"):
        if fake:
            (tmp_path / script).write_text(FAKE_SCRIPT + f"# torch_threads: int = {2 if script == 'moma_ppo.py' else 1}\n")
        else:
            shutil.copy(REPO / script, tmp_path / script)
    # no datasets or world models here: the array must be preceded by a prepare job
    return {**env, "MINARI_DATASETS_PATH": str(tmp_path / "minari"), "MOMA_CACHE_DIR": str(tmp_path / "cache")}


def _submissions(folder: pathlib.Path) -> list:
    """(script, indices, options) of each sbatch line of submit.sh."""
    out = []
    for line in (folder / "submit.sh").read_text().splitlines():
        if "sbatch --parsable" in line:
            words = line.replace(")", " ").split()
            options = dict(w.split("=", 1) for w in words if w.startswith("--") and "=" in w)
            indices = set()
            for part in options["--array"].split(","):
                lo, _, hi = part.partition("-")
                indices |= set(range(int(lo), int(hi or lo) + 1))
            out.append((words[-1], indices, options, line))
    return out


def test_slurm_dry_run_writes_one_array_task_per_cell_not_done(tmp_path):
    env = _slurm_copy(tmp_path)
    done = [("iql", "favorable"), ("ibc", "neutral"), ("moma_ppo", "unfavorable")]
    for algorithm, dataset in done:
        _record(tmp_path / f"results/3/coordination__full__{dataset}__{algorithm}__1", algorithm, dataset, 1, 1.0, "quick")
    out = subprocess.run(["bash", "run_all.sh", "3", "--slurm", "--dry-run", "--partition", "short", "--account=proj7",
                          "--eval-episodes", "50"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "24 cells, 3 done already at this budget, 21 to run" in out.stdout  # the plan, as without --slurm
    assert "21 cells to run" in out.stdout and "nothing submitted" in out.stdout
    (folder,) = (tmp_path / "runs/run_all/quick/slurm").iterdir()
    cells = (folder / "cells.txt").read_text().splitlines()
    assert len(cells) == 21 and "3 iql.py coordination full favorable 2" in cells
    assert not any(f"3 {a}.py coordination full {d} 1" in cells for a, d in done)
    script = (folder / "array.sbatch").read_text()
    assert "#SBATCH --partition=short\n" in script and "#SBATCH --account=proj7\n" in script
    assert f"/logs/slurm-3-%A_%a.log" in script  # one log per task
    assert f'./run_all.sh --cell {folder / "cells.txt"} "$SLURM_ARRAY_TASK_ID" --eval-episodes 50' in script
    assert f"export MINARI_DATASETS_PATH={tmp_path / 'minari'}" in script and "export BUDGET=quick" in script

    # submit.sh: the prepare job first (no datasets or world models here), then the array, one sbatch per
    # resource class, whose --array lists together cover every cell once
    prepare, *arrays = _submissions(folder)
    assert prepare[0] == "prepare.sbatch" and prepare[1] == {1, 2, 3}
    assert (folder / "prepare.txt").read_text().split("\n")[:3] == [
        "coordination favorable 0", "coordination neutral 0", "coordination unfavorable 0"]  # world-model seed 0
    assert "#SBATCH --partition=short\n" in (folder / "prepare.sbatch").read_text()
    assert arrays and all(a[0] == "array.sbatch" for a in arrays)
    assert sorted(i for a in arrays for i in a[1]) == list(range(1, 22))
    for _, indices, options, line in arrays:
        assert '"${dependency[@]}"' in line and options["--mem"] == "1024M" and options["--time"] == "00:15:00"
        moma = {("moma_ppo.py" in cells[i - 1]) for i in indices}
        assert moma == {options["--cpus-per-task"] == "2"}  # MOMA-PPO's 2 torch threads, the others' 1
    assert "--dependency=\"afterok:${job%%;*}\"" in (folder / "submit.sh").read_text()

    # --time and --mem replace the estimates; nothing left to run: nothing written
    out = subprocess.run(["bash", "run_all.sh", "3", "--slurm", "--dry-run", "--time", "2:00:00", "--mem=3G"],
                         cwd=tmp_path, env={**env, "SEEDS_GAME": "1", "ONLY": "__favorable__iql__ neutral__maiql__"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "2 cells, 1 done already at this budget, 1 to run" in out.stdout
    folder = max((tmp_path / "runs/run_all/quick/slurm").iterdir(), key=lambda p: p.stat().st_mtime)
    (array,) = [s for s in _submissions(folder) if s[0] == "array.sbatch"]
    assert array[1] == {1} and array[2]["--time"] == "2:00:00" and array[2]["--mem"] == "3G"
    out = subprocess.run(["bash", "run_all.sh", "3", "--slurm", "--dry-run"], cwd=tmp_path,
                         env={**env, "SEEDS_GAME": "1", "ONLY": "__favorable__iql__"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "nothing to submit: every cell of 3 is done" in out.stdout, out.stderr
    bad = subprocess.run(["bash", "run_all.sh", "3", "--partition", "short"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "is an option of --slurm" in bad.stderr


def test_a_slurm_task_runs_its_cell_as_the_local_run_does(tmp_path):
    """`./run_all.sh --cell cells.txt i` (what array task i runs) gives the cell's script the command the local
    run gives it, resumes a stopped cell, and skips a done one."""
    env = {**_slurm_copy(tmp_path, fake=True), "SEEDS_GAME": "1", "FAKE_LOG": str(tmp_path / "fake.log")}
    out = subprocess.run(["bash", "run_all.sh", "3", "--slurm", "--dry-run", "--torch-threads", "1"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (folder,) = (tmp_path / "runs/run_all/quick/slurm").iterdir()
    cells = (folder / "cells.txt").read_text().splitlines()
    assert len(cells) == 12

    def argv_of(*command, **more):
        log = tmp_path / "fake.log"
        log.unlink(missing_ok=True)
        out = subprocess.run(["bash", "run_all.sh", *command], cwd=tmp_path, env={**env, **more}, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        lines = [json.loads(l[5:]) for l in log.read_text().splitlines() if l.startswith("argv ")] if log.exists() else []
        return lines, out.stdout

    def cell_line(script, dataset):
        return next(i for i, c in enumerate(cells, 1) if c.startswith(f"3 {script} coordination full {dataset} 1"))

    name = "coordination__full__neutral__iql__1"
    (task,), _ = argv_of("--cell", str(folder / "cells.txt"), str(cell_line("iql.py", "neutral")), "--torch-threads", "1")
    assert (tmp_path / f"results/3/{name}/summary.json").exists()
    shutil.rmtree(tmp_path / f"results/3/{name}")
    shutil.rmtree(tmp_path / f"runs/run_all/quick/{name}", ignore_errors=True)
    (local,), _ = argv_of("3", "--torch-threads", "1", ONLY="neutral__iql__")
    assert task == local and "--resume" not in task  # the very same command
    # a done cell is skipped; a stopped one (a checkpoint, no record) is resumed
    runs, stdout = argv_of("--cell", str(folder / "cells.txt"), str(cell_line("iql.py", "neutral")))
    assert runs == [] and f"done already: results/3/{name}" in stdout
    stopped = tmp_path / "runs/run_all/quick/coordination__full__favorable__ibc__1"
    stopped.mkdir(parents=True)
    (stopped / "checkpoint.pt").write_text("")
    (task,), _ = argv_of("--cell", str(folder / "cells.txt"), str(cell_line("ibc.py", "favorable")), "--torch-threads", "1")
    assert "--resume" in task and task[task.index("--run-dir") + 1] == "runs/run_all/quick/" + stopped.name


def test_slurm_prepare_job_retrains_a_stale_world_model():
    """The prepare job covers a world model that exists but is stale (its dataset was rebuilt since) as well as a
    missing one: otherwise the first MOMA-PPO task to load it would retrain it while the dataset's other tasks wait
    on its lock, holding their allocations."""
    import envs
    import results
    import slurm
    import world_model as wm

    cell = results.Cell("3", "moma_ppo.py", "coordination", "full", "neutral", 1, "moma_ppo", [])
    small = dict(hidden_dim=16, n_hidden_layers=1, max_steps=60, eval_every=30, rollout_eval_starts=10)
    envs.build_dataset("coordination", "neutral", seed=0)
    try:
        wm.load_or_train("coordination", "neutral", seed=0, **small)
        assert slurm.missing_prerequisites([cell]) == []  # current: nothing to prepare
        envs.build_dataset("coordination", "neutral", seed=1)  # rebuilt with other samples: the model is stale
        assert slurm.missing_prerequisites([cell]) == [("coordination", "neutral", False, [0])]
        wm.artifact_path("coordination", "neutral", 0).write_bytes(b"not a model")  # unreadable: prepared too
        assert slurm.missing_prerequisites([cell]) == [("coordination", "neutral", False, [0])]
    finally:
        envs.build_dataset("coordination", "neutral", seed=0)  # other tests expect the default build
        wm.artifact_path("coordination", "neutral", 0).unlink(missing_ok=True)


def test_slurm_records_a_finished_run_here_instead_of_submitting_it(tmp_path):
    """A cell whose run finished but whose record is missing (the copy into results/ was lost) is recorded by
    `--slurm` itself, as the local path does, rather than given a node of its own to copy three files."""
    env = _slurm_copy(tmp_path)
    name = "coordination__full__favorable__iql__1"
    _record(tmp_path / "runs/run_all/quick" / name, "iql", "favorable", 1, 1.0, "quick")  # the finished run
    env = {**env, "SEEDS_GAME": "1", "ONLY": "__favorable__iql__ __neutral__iql__"}
    # --dry-run writes the array folder and nothing else: it names the run it would record
    out = subprocess.run(["bash", "run_all.sh", "3", "--slurm", "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"would record the finished run {tmp_path / 'runs/run_all/quick' / name}" in out.stdout
    assert not (tmp_path / "results/3" / name).exists()
    # a real submission (sbatch stood in for by a script that prints a job id) records it here
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    out = subprocess.run(["bash", "run_all.sh", "3", "--slurm"], cwd=tmp_path,
                         env={**env, "PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "recorded 1 finished run(s)" in out.stdout
    assert json.loads((tmp_path / "results/3" / name / "summary.json").read_text())["normalized_score_mean"] == 1.0
    folder = sorted((tmp_path / "runs/run_all/quick/slurm").iterdir())[-1]
    cells = [line.split()[:6] for line in (folder / "cells.txt").read_text().splitlines()]
    assert cells == [["3", "iql.py", "coordination", "full", "neutral", "1"]]  # only the cell left to run


def test_crossplay_plays_each_finished_seed_with_the_others_once(tmp_path, tiny_mujoco_datasets):
    """`./run_all.sh crossplay`: seeds with a finished run (summary.json and checkpoint) are stitched pairwise, a
    stopped seed is left out, each run's record stays as it was, and a second call finds everything up to date."""
    import os

    env = _repo_copy(tmp_path)
    shutil.copy(REPO / "ibc.py", tmp_path / "ibc.py")
    env.update({k: os.environ[k] for k in ("MINARI_DATASETS_PATH", "MOMA_CACHE_DIR", "HF_HUB_OFFLINE")})
    runs = tmp_path / "runs/run_all/quick"
    for seed in (1, 2, 3):
        subprocess.run(["python", "ibc.py", "--env", "reacher", "--obs", "independent", "--seed", str(seed),
                        "--total-steps", "4", "--batch-size", "16", "--hidden", "16", "--history-dim", "8",
                        "--eval-every", "0", "--eval-episodes", "2", "--results-dir", "results/4a",
                        "--run-dir", f"runs/run_all/quick/reacher__independent__expert-mix__ibc__{seed}"],
                       cwd=tmp_path, env=env, check=True, capture_output=True)
    (runs / "reacher__independent__expert-mix__ibc__3" / "summary.json").unlink()  # seed 3 stopped before the end
    records_before = {p: p.read_bytes() for p in (tmp_path / "results/4a").glob("*/summary.json")}

    out = subprocess.run(["bash", "run_all.sh", "crossplay"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count(">>>") == 2
    for seed, partner in ((1, 2), (2, 1)):
        report = json.loads((tmp_path / f"results/4a/crossplay/reacher__independent__expert-mix__ibc__{seed}.json").read_text())
        assert report["seed"] == seed and [p["partner_seed"] for p in report["partners"]] == [partner]
        assert len(report["partners"][0]["episode_returns"]) == 2
    assert not (tmp_path / "results/4a/crossplay/reacher__independent__expert-mix__ibc__3.json").exists()
    assert {p: p.read_bytes() for p in (tmp_path / "results/4a").glob("*/summary.json")} == records_before
    assert "Cross-play: teams stitched from different seeds" in (tmp_path / "docs/results.md").read_text()

    again = subprocess.run(["bash", "run_all.sh", "crossplay"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and ">>>" not in again.stdout and again.stdout.count("is up to date") == 2


def test_run_all_partial_observabilities_are_envs():
    """run_all.sh restates the partially observable settings (its quick budget shortens their runs): they must be
    envs.PARTIALLY_OBSERVABLE's, so a setting added there is not silently budgeted as a fully observable one."""
    import re

    sys.path.insert(0, str(REPO))
    import envs

    text = (REPO / "run_all.sh").read_text()
    match = re.search(r"case \$obs in ([^)]*)\) po=1", text)
    assert match, "run_all.sh's budget_flags no longer marks partially observable settings with po=1"
    listed = {name.strip() for name in match.group(1).split("|")}
    assert listed == {obs for _, obs in envs.PARTIALLY_OBSERVABLE}
