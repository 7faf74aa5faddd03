"""run_all.sh --slurm: the cells of a target as a Slurm job array, one task per cell that is not done.

`./run_all.sh 4b --slurm [--partition P] [--account A] [--time T] [--mem M] [--dry-run] [extra flags]` runs the plan
as usual, then calls `python slurm.py TARGET PLAN_FILE STALE_FILE [options] -- [extra flags]`, which writes a folder
runs/run_all/<budget>/slurm/<target>-<date>/:

  cells.txt       the cells to run, one a line, as run_all.sh's run() takes them (table script env obs dataset seed
                  [flags]); array task i runs line i with `./run_all.sh --cell cells.txt i`, so the task does exactly
                  what the local run does for that cell (done: skipped, stopped: resumed with --resume, finished:
                  record copied to results/<table>/ by the script's --results-dir)
  array.sbatch    the array script (one log per task: runs/run_all/<budget>/logs/slurm-<target>-<job>_<task>.log)
  prepare.txt     the datasets and world models the cells need that are missing now, one (env, dataset) a line
  prepare.sbatch  builds them (one task per line) before the array starts (--dependency=afterok)
  submit.sh       the sbatch commands; run here unless --dry-run

Resources: each task asks for the CPUs its script uses (--torch-threads, or the script's default), the memory of its
env (results.MEMORY_MB) and TIME_FACTOR x its estimated CPU time (results.py SECONDS_PER_STEP, the plan's estimate)
plus TIME_MARGIN_S, rounded up to a step of TIME_STEPS_MIN. One array script, submitted once per resource class
(sbatch's --array, --cpus-per-task, --mem and --time on the command line). --time and --mem replace the estimates;
--partition, --account and --gres (e.g. gpu:1, with the scripts' --cuda; not for the prepare job) go into the
scripts. A task that runs out of time left its last checkpoint: the next `./run_all.sh <target> --slurm` resumes it.

Why a prepare job: datasets (envs.build_dataset) and world models (world_model.load_or_train) are lock-protected, so
concurrent tasks build each once and the others wait, but a waiting task holds its allocation idle for up to the
build time (up to ~20 min per Ant dataset, ~15 min per world model), and 4b has 45 cells per dataset. The prepare job
builds each missing (env, dataset) and its world models once, one task per dataset in parallel, and the array waits
for it without holding anything.

`python slurm.py prepare prepare.txt LINE` is what a prepare task runs.
"""

import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import results

REPO = pathlib.Path(__file__).resolve().parent
TIME_FACTOR = 2.0  # the estimates are CPU seconds on the project's shared 2-core machine; 2x covers a slower node
TIME_MARGIN_S = 600  # start-up: imports, the first read of a dataset (flattened into the cache), writing the record
TIME_STEPS_MIN = (15, 30, 60, 120, 240, 480, 720, 1440)  # then whole days: few classes, still close to the estimate
SBATCH_OPTIONS = ("--partition", "--account", "--time", "--mem", "--gres")


def script_threads(script: str) -> int:
    """The script's default --torch-threads (its Args field)."""
    found = re.search(r"torch_threads: int = (\d+)", (REPO / script).read_text())
    return int(found.group(1)) if found else 1


def last_value(flags: list, name: str):
    """The value of the last `name VALUE` / `name=VALUE` in flags (as the scripts' command line reads it)."""
    value = None
    for i, flag in enumerate(flags):
        if flag == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif flag.startswith(name + "="):
            value = flag.split("=", 1)[1]
    return value


def slurm_minutes(seconds: float) -> int:
    minutes = math.ceil((TIME_FACTOR * seconds + TIME_MARGIN_S) / 60)
    for step in TIME_STEPS_MIN:
        if minutes <= step:
            return step
    return 1440 * math.ceil(minutes / 1440)


def slurm_time(minutes: int) -> str:
    days, rest = divmod(minutes, 1440)
    return (f"{days}-" if days else "") + f"{rest // 60:02d}:{rest % 60:02d}:00"


def index_ranges(indices: list) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3,7,9-10' (sbatch --array)."""
    parts, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            parts.append(f"{start}-{n}" if n > start else f"{n}")
            start = None
    return ",".join(parts)


def missing_prerequisites(cells: list) -> list:
    """[(env, dataset, dataset missing?, [world-model seeds missing])] for what `cells` need and is not built."""
    import envs
    import world_model

    needed = {}
    for cell in cells:
        if envs._is_external_id(cell.dataset):
            continue  # not buildable here: the cell says so itself
        seeds = needed.setdefault((cell.env, cell.dataset), set())
        if cell.script == "moma_ppo.py" and "--ground-truth" not in cell.flags:
            seeds.add(int(last_value(cell.flags, "--world-model-seed") or 0))
    out = []
    for (env, dataset), seeds in needed.items():
        dataset_missing = not envs.dataset_exists(env, dataset)
        models = sorted(s for s in seeds if dataset_missing or not _world_model_current(env, dataset, s))
        if dataset_missing or models:
            out.append((env, dataset, dataset_missing, models))
    return out


def _world_model_current(env: str, dataset: str, seed: int) -> bool:
    """Is the cached world model of (env, dataset, seed) there and trained on today's local dataset? A stale one (the
    dataset was rebuilt since) would otherwise be retrained by the first array task that loads it, while every other
    task of the dataset waits on the training lock holding its allocation; an unreadable one goes to the prepare job
    too, where load_or_train says what is wrong once instead of in every task."""
    import envs
    import world_model

    path = world_model.artifact_path(env, dataset, seed)
    if not path.exists():
        return False
    try:
        return world_model._stale_reason(world_model._read_payload(path), env, dataset) is None
    except envs.MomaError:
        return False


def sbatch_header(job_name: str, log: pathlib.Path, options: dict) -> str:
    lines = [f"#SBATCH --job-name={job_name}", f"#SBATCH --output={log}"]
    lines += [f"#SBATCH {name}={options[name]}" for name in ("--partition", "--account", "--gres") if options.get(name)]
    return "\n".join(lines)


def environment_lines(cpus_var: str = "${SLURM_CPUS_PER_TASK:-1}") -> str:
    """What a task needs from the submitting shell, written out so that the script stands alone."""
    python_dir = pathlib.Path(shutil.which("python") or sys.executable).parent
    values = {"BUDGET": os.environ.get("BUDGET", "quick"), "RESULTS": os.environ.get("RESULTS", "results"),
              "RUNS": os.environ["RUNS"], "HF_HUB_OFFLINE": "1"}
    for name in ("MINARI_DATASETS_PATH", "MOMA_CACHE_DIR", "MOMA_PROGRESS_EVERY"):
        if os.environ.get(name):
            values[name] = os.environ[name]
    lines = [f"cd {shlex.quote(str(REPO))}", f"export PATH={shlex.quote(str(python_dir))}:\"$PATH\""]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
    lines.append(f"export OMP_NUM_THREADS={cpus_var} MKL_NUM_THREADS={cpus_var}")
    return "\n".join(lines)


def write(target: str, plan_file: str, stale_file: str, options: dict, extra: list,
          dry_run: bool = False) -> pathlib.Path:
    budget = os.environ.get("BUDGET", "quick")
    results_dir = pathlib.Path(os.environ.get("RESULTS", "results"))
    runs = pathlib.Path(os.environ["RUNS"]).resolve()
    stale = set(pathlib.Path(stale_file).read_text().split())
    refresh = os.environ.get("REFRESH_STALE", "0") == "1"
    cells, lines = [], pathlib.Path(plan_file + ".args").read_text().splitlines()
    copied = 0
    for cell, line in zip(results.read_cells(plan_file), lines):
        state = results.cell_state(cell, budget, results_dir, str(runs))
        if state == "copy":
            # a finished run whose record is missing: copied here, as the local path does, not given a node
            # (a dry run writes the array folder only: it says what it would copy)
            if dry_run:
                print(f"would record the finished run {runs / cell.name} into {results_dir / cell.table}")
                copied += 1
                continue
            import envs

            envs.save_record(runs / cell.name, results_dir / cell.table, cell.name)
            copied += 1
            continue
        if state != "done" or (refresh and f"{cell.table}/{cell.name}" in stale):
            cells.append((cell, line))
    if copied and not dry_run:
        print(f"recorded {copied} finished run(s) into {results_dir} here (no Slurm task needed)")
    if not cells:
        print(f"nothing to submit: every cell of {target} is done at budget {budget}")
        return None

    folder = runs / "slurm" / f"{target}-{time.strftime('%Y%m%d-%H%M%S')}"
    while folder.exists():
        folder = folder.with_name(folder.name + "+")
    folder.mkdir(parents=True)
    (runs / "logs").mkdir(parents=True, exist_ok=True)  # Slurm does not create the log folder
    (folder / "cells.txt").write_text("".join(line.rstrip() + "\n" for _, line in cells))
    (folder / "stale.txt").write_text("".join(f"{name}\n" for name in sorted(stale)))

    # One resource class per (CPUs, memory, time); one sbatch of the same script per class.
    classes = {}
    for i, (cell, _) in enumerate(cells, start=1):
        threads = last_value(cell.flags + extra, "--torch-threads")
        cpus = int(threads) if threads else script_threads(cell.script)
        memory = options.get("--mem") or f"{cell.memory_mb}M"
        limit = options.get("--time") or slurm_time(slurm_minutes(cell.seconds))
        classes.setdefault((cpus, memory, limit), []).append(i)

    job = f"moma-{target}-{budget}"
    (folder / "array.sbatch").write_text(f"""#!/usr/bin/env bash
# run_all.sh {target} at budget {budget} as a Slurm array: task i runs the cell on line i of cells.txt exactly as
# `./run_all.sh {target}` runs it here (done: skipped, stopped: resumed, record copied to {results_dir}/<table>/).
# Written by `./run_all.sh {target} --slurm`; submit.sh submits it once per resource class (CPUs, memory, time).
{sbatch_header(job, runs / "logs" / f"slurm-{target}-%A_%a.log", options)}
set -euo pipefail
{environment_lines()}
export REFRESH_STALE={int(refresh)} STALE_FILE={shlex.quote(str(folder / "stale.txt"))}
exec ./run_all.sh --cell {shlex.quote(str(folder / "cells.txt"))} "$SLURM_ARRAY_TASK_ID"{"".join(" " + shlex.quote(e) for e in extra)}
""")

    submit = [f"#!/usr/bin/env bash",
              f"# Submits {len(cells)} cells of run_all.sh {target} (budget {budget}); written by run_all.sh --slurm.",
              "set -euo pipefail", f"cd {shlex.quote(str(folder))}", "dependency=()"]
    prepare = missing_prerequisites([cell for cell, _ in cells])
    if prepare:
        (folder / "prepare.txt").write_text("".join(f"{env} {dataset} {' '.join(map(str, seeds))}".rstrip() + "\n"
                                                    for env, dataset, _, seeds in prepare))
        seconds = max((results.BUILD_SECONDS[env] if missing else 0) + len(seeds) * results.WORLD_MODEL_SECONDS[env]
                      for env, _, missing, seeds in prepare)
        envs_needed = {env for env, *_ in prepare}
        memory = options.get("--mem") or f"{max(v for (env, _), v in results.MEMORY_MB.items() if env in envs_needed)}M"
        (folder / "prepare.sbatch").write_text(f"""#!/usr/bin/env bash
# The datasets and world models the cells of run_all.sh {target} need and that were missing when it was written
# (prepare.txt, one env and dataset a line, then the world-model seeds): task i builds line i, once, so that the
# array's tasks do not all wait for the same build.
{sbatch_header(f"{job}-prepare", runs / "logs" / f"slurm-{target}-prepare-%A_%a.log",
                {k: v for k, v in options.items() if k != "--gres"})}
set -euo pipefail
{environment_lines()}
exec python slurm.py prepare {shlex.quote(str(folder / "prepare.txt"))} "$SLURM_ARRAY_TASK_ID"
""")
        submit += [
            f"job=$(sbatch --parsable --array={index_ranges(list(range(1, len(prepare) + 1)))} --cpus-per-task=2 "
            f"--mem={memory} --time={options.get('--time') or slurm_time(slurm_minutes(seconds))} prepare.sbatch)",
            'echo "submitted prepare job ${job%%;*}: ' + f'{len(prepare)} dataset(s) and world models (prepare.txt)"',
            # a failed prepare task cancels the array instead of leaving it pending for ever
            'dependency=(--dependency="afterok:${job%%;*}" --kill-on-invalid-dep=yes)']
    for (cpus, memory, limit), indices in sorted(classes.items()):
        submit += [f"job=$(sbatch --parsable \"${{dependency[@]}}\" --array={index_ranges(indices)} --cpus-per-task={cpus} "
                   f"--mem={memory} --time={limit} array.sbatch)",
                   'echo "submitted job ${job%%;*}: ' + f'{len(indices)} cell(s), {cpus} CPU(s), {memory}, {limit} each"']
    (folder / "submit.sh").write_text("\n".join(submit) + "\n")
    for name in ("array.sbatch", "prepare.sbatch", "submit.sh"):
        if (folder / name).exists():
            (folder / name).chmod(0o755)

    print(f"slurm: {len(cells)} cells to run in {folder} (cells.txt; array.sbatch, one task per cell"
          + (f"; prepare.sbatch first: {len(prepare)} dataset(s) or world models missing" if prepare else "") + ")")
    for (cpus, memory, limit), indices in sorted(classes.items()):
        print(f"  {len(indices)} task(s): --cpus-per-task={cpus} --mem={memory} --time={limit}")
    if len(cells) > 1000:
        print(f"warning: task ids up to {len(cells)}; Slurm's default MaxArraySize (1001) allows up to 1000: ask for a "
              f"larger one, or submit the target in parts (SEEDS_*=..., ONLY=...)")
    return folder


def prepare(items_file: str, line: int) -> None:
    """Build one (env, dataset) and its world models unless they exist (the locks make a concurrent build wait)."""
    import torch

    import envs
    import world_model

    env, dataset, *seeds = pathlib.Path(items_file).read_text().splitlines()[line - 1].split()
    torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", 2)))
    print(f"prepare {env}/{dataset}: dataset, then world model seed(s) {seeds or 'none'}", flush=True)
    envs.load_dataset(env, dataset)  # built if missing (only_if_missing, under the dataset's lock)
    for seed in seeds:
        world_model.load_or_train(env, dataset, seed=int(seed))  # world_model.PRESETS[env], as moma_ppo.py
    print(f"prepared {env}/{dataset}", flush=True)


def main(argv: list) -> None:
    usage = ("usage: python slurm.py TARGET PLAN_FILE STALE_FILE [--dry-run] [--partition=P] [--account=A] "
             "[--time=T] [--mem=M] [--gres=G] -- [extra flags]   |   python slurm.py prepare PREPARE_FILE LINE")
    if len(argv) == 3 and argv[0] == "prepare":
        prepare(argv[1], int(argv[2]))
        return
    if len(argv) < 3:
        raise SystemExit(usage)
    target, plan_file, stale_file, rest = argv[0], argv[1], argv[2], argv[3:]
    extra = rest[rest.index("--") + 1:] if "--" in rest else []
    rest = rest[:rest.index("--")] if "--" in rest else rest
    options, dry_run = {}, False
    for arg in rest:
        name, _, value = arg.partition("=")
        if arg == "--dry-run":
            dry_run = True
        elif name in SBATCH_OPTIONS and value:
            options[name] = value
        else:
            raise SystemExit(f"error: unknown option {arg!r}\n{usage}")
    if "--cuda" in extra and "--gres" not in options:
        print("note: --cuda without --gres: the tasks ask for no GPU (e.g. --gres gpu:1)")
    if not dry_run and shutil.which("sbatch") is None:
        raise SystemExit("error: sbatch not found: run this on a Slurm login node, or add --dry-run to only write the "
                         "array")
    folder = write(target, plan_file, stale_file, options, extra, dry_run)
    if folder is None:
        return
    if dry_run:
        print(f"--dry-run: nothing submitted; `bash {folder / 'submit.sh'}` submits it:")
        print((folder / "submit.sh").read_text(), end="")
        return
    subprocess.run(["bash", str(folder / "submit.sh")], check=True)
    print(f"logs: {pathlib.Path(os.environ['RUNS']).resolve() / 'logs'}/slurm-{target}-<job>_<task>.log; "
          f"when the array is done, `./run_all.sh table` writes docs/results.md")


if __name__ == "__main__":
    main(sys.argv[1:])
