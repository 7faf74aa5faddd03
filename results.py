"""The results of this reproduction, generated from the committed records in results/ only.

    python results.py table       # docs/results.md: Tables 1-4 and the §6.3 ablation, beside the paper's numbers
    python results.py plots       # docs/plots/*.png learning curves, then docs/results.md again (it shows them)
    python results.py datasets    # results/datasets/*.json: Table 1-2 statistics of the datasets built here
    python results.py plan CELLS  # what run_all.sh is about to do: cells, done, estimated CPU hours

A table cell's record is results/<table>/<env>__<obs>__<dataset>__<method>__<seed>/ with summary.json (config,
dataset id and fingerprint, code fingerprint, budget, scores, per-episode returns and lengths, wall time,
commit), curve.csv (one row per greedy evaluation) and command.txt (the exact command). Every algorithm script
writes it when given --results-dir (run_all.sh passes results/<table>). Nothing here is typed in by hand except
the paper's numbers (PAPER_* below, from the AAMAS 2024 paper's Tables 1-4) and results/legacy.md, which holds
the earlier hand-typed measurements that have no record and is shown under its own heading.

A record is *stale* when the code of a file its run depended on (the algorithm script, envs.py, world_model.py
for MOMA-PPO) has changed since (envs.file_hash: the syntax tree, so comments and docs do not count), or when its dataset's content fingerprint differs from the dataset on disk; stale
cells are shown with a dagger, never silently mixed with fresh ones. Cells made at different budgets are in
different tables.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import pathlib
import re
import shlex
import sys
from typing import Optional

import numpy as np

import envs

REPO = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = REPO / "results"
DOCS_DIR = REPO / "docs"
PLOTS_DIR = DOCS_DIR / "plots"
TABLES = ("3", "4a", "4b", "ablation", "diagnosis")
BUDGETS = ("quick", "default", "paper")  # run_all.sh's budgets, smallest first; records of other names follow

# --------------------------------------------------------------------------------------------------
# The paper's numbers (Barde et al., AAMAS 2024): reference values to compare with, not our results.
# --------------------------------------------------------------------------------------------------
PAPER_TABLE1 = {"favorable": 0.623, "neutral": 0.502, "unfavorable": 0.375}  # average dataset score
# Table 2: normalised dataset scores (%) min / mean / median / max; reference returns expert / random.
PAPER_TABLE2 = {
    ("reacher", "expert-mix"): dict(min=38.8, mean=100.0, median=98.9, max=152.3, expert=-4.237, random=-11.145),
    ("ant", "random"): dict(min=-3.0, mean=6.4, median=7.2, max=10.3, expert=3879.7, random=-325.6),
    ("ant", "medium"): dict(min=-4.8, mean=80.2, median=95.1, max=107.2, expert=3879.7, random=-325.6),
    ("ant", "full-replay"): dict(min=-22.4, mean=72.0, median=77.8, max=134.3, expert=3879.7, random=-325.6),
    ("ant", "expert"): dict(min=-32.8, mean=117.4, median=129.4, max=142.5, expert=3879.7, random=-325.6),
}
# Tables 3 and 4: (mean, s.e.m.) over 10 seeds (coordination) or 3 seeds (MuJoCo), 100 greedy episodes.
PAPER_TABLE3 = {
    "favorable": dict(iql=(1.0, 0.0), maiql=(1.0, 0.0), ibc=(1.0, 0.0), moma_ppo=(1.0, 0.0)),
    "neutral": dict(iql=(1.0, 0.0), maiql=(0.9, 0.1), ibc=(0.55, 0.11), moma_ppo=(1.0, 0.0)),
    "unfavorable": dict(iql=(1.0, 0.0), maiql=(0.0, 0.0), ibc=(0.0, 0.0), moma_ppo=(1.0, 0.0)),
}
_4A_METHODS = ("iql", "maiql", "matd3bc", "ibc", "itd3bc", "icql", "omar", "moma_ppo")
_4B_METHODS = ("iql", "maiql", "maiql_ft", "ibc", "itd3bc", "icql", "omar", "moma_ppo")


def _row(methods, text: str) -> dict:
    """'1.07 ± 0.01 | | 0.92 ± 0.04 ...' (the paper's cells in column order, empty = no cell) -> {method: (m, s)}."""
    cells = [c.strip() for c in text.split("|")]
    assert len(cells) == len(methods), text
    return {m: tuple(float(x) for x in c.split("±")) for m, c in zip(methods, cells) if c}


PAPER_TABLE4A = {
    "all-observant": _row(_4A_METHODS, "1.07 ± 0.01 | 0.96 ± 0.05 | 1.04 ± 0.01 | 1.02 ± 0.01 | 0.78 ± 0.00 | 0.48 ± 0.06 | 0.73 ± 0.01 | 1.07 ± 0.01"),
    "independent": _row(_4A_METHODS, " | 0.92 ± 0.04 | 0.59 ± 0.03 | 0.76 ± 0.04 | 0.30 ± 0.11 | 0.46 ± 0.04 | 0.45 ± 0.02 | 0.95 ± 0.06"),
    "leader-only": _row(_4A_METHODS, " | 0.80 ± 0.05 | 0.73 ± 0.02 | 0.84 ± 0.02 | 0.48 ± 0.04 | 0.31 ± 0.05 | 0.39 ± 0.02 | 1.00 ± 0.01"),
}
PAPER_TABLE4B = {
    ("full", "random"): _row(_4B_METHODS, "0.12 ± 0.00 | 0.28 ± 0.01 | 0.28 ± 0.03 | 0.31 ± 0.00 | 0.22 ± 0.02 | 0.08 ± 0.00 | 0.08 ± 0.00 | 0.52 ± 0.07"),
    ("full", "medium"): _row(_4B_METHODS, "0.97 ± 0.02 | 0.85 ± 0.02 | 0.81 ± 0.02 | 0.84 ± 0.01 | 1.04 ± 0.00 | 0.88 ± 0.12 | 1.10 ± 0.03 | 1.29 ± 0.06"),
    ("full", "full-replay"): _row(_4B_METHODS, "1.22 ± 0.02 | 0.77 ± 0.21 | 0.95 ± 0.13 | 1.20 ± 0.01 | 1.33 ± 0.01 | 1.21 ± 0.02 | 1.30 ± 0.00 | 1.42 ± 0.07"),
    ("full", "expert"): _row(_4B_METHODS, "1.26 ± 0.01 | 1.24 ± 0.00 | 1.06 ± 0.07 | 1.24 ± 0.00 | 1.25 ± 0.02 | 0.73 ± 0.15 | 1.16 ± 0.01 | 1.49 ± 0.01"),
    ("partial", "random"): _row(_4B_METHODS, " | 0.31 ± 0.00 | 0.34 ± 0.04 | 0.31 ± 0.00 | 0.31 ± 0.00 | 0.17 ± 0.02 | 0.21 ± 0.02 | 0.42 ± 0.05"),
    ("partial", "medium"): _row(_4B_METHODS, " | 0.14 ± 0.02 | 0.11 ± 0.01 | 0.17 ± 0.01 | 0.22 ± 0.05 | 0.09 ± 0.02 | 0.06 ± 0.01 | 0.54 ± 0.19"),
    ("partial", "full-replay"): _row(_4B_METHODS, " | 0.18 ± 0.02 | -0.07 ± 0.10 | 0.21 ± 0.02 | 0.20 ± 0.01 | 0.09 ± 0.01 | 0.11 ± 0.02 | 0.46 ± 0.10"),
    ("partial", "expert"): _row(_4B_METHODS, " | -0.16 ± 0.01 | -0.23 ± 0.02 | 0.05 ± 0.04 | 0.16 ± 0.00 | 0.11 ± 0.03 | 0.10 ± 0.01 | 0.18 ± 0.00"),
}
# §6.3 gives no numbers: its Figure 6 (appendix, not in the text) shows learning curves on ant full-replay.
PAPER_ABLATION = ("epistemic beats aleatoric everywhere except FO with adaptive rollouts (not significant); "
                  "learning curves only (Figure 6, Appendix B.2), no numbers")

METHOD_LABELS = {
    "iql": "IQL", "maiql": "MAIQL", "maiql_ft": "MAIQL-ft", "matd3bc": "MATD3+BC", "ibc": "IBC",
    "itd3bc": "ITD3+BC", "icql": "ICQL", "omar": "IOMAR", "moma_ppo": "MOMA-PPO",
    "moma_ppo-no_adaptive_rollout": "epistemic, fixed rollouts",
    "moma_ppo-aleatoric": "aleatoric (λ_a 1), adaptive rollouts",
    "moma_ppo-aleatoric-no_adaptive_rollout": "aleatoric (λ_a 1), fixed rollouts",
}
# Methods with a learned critic: their records carry envs.CriticLog's verdict (critic_diverged) since 2026-12-05
CRITIC_METHODS = ("iql", "maiql", "maiql_ft", "matd3bc", "itd3bc", "icql", "omar")
ABLATION_METHODS = ("moma_ppo", "moma_ppo-no_adaptive_rollout", "moma_ppo-aleatoric",
                    "moma_ppo-aleatoric-no_adaptive_rollout")
# Rows (obs, dataset) and columns of each table, as in the paper.
LAYOUT = {
    "3": dict(env="coordination", rows=[("full", d) for d in envs.DATASETS["coordination"]],
              methods=("iql", "maiql", "ibc", "moma_ppo")),
    "4a": dict(env="reacher", rows=[(o, "expert-mix") for o in ("all-observant", "independent", "leader-only")],
               methods=_4A_METHODS),
    "4b": dict(env="ant", rows=[(o, d) for o in ("full", "partial") for d in ("random", "medium", "full-replay", "expert")],
               methods=_4B_METHODS),
    "ablation": dict(env="ant", rows=[("full", "full-replay"), ("partial", "full-replay")], methods=ABLATION_METHODS),
    "diagnosis": dict(env="ant", rows=[("partial", "medium"), ("full", "medium")], methods=("moma_ppo",)),
}
# The diagnosis records of each env get their own section, table and training figure (Ant: issue 12's rows; Reacher:
# Table 4a's leader-only gap); the learning-curve plots of their (obs, dataset) cells are drawn for these.
DIAGNOSIS_ROWS = {"ant": [("partial", "medium"), ("full", "medium")], "reacher": [("leader-only", "expert-mix")]}
MOMA_PRESET_ITERATIONS = {"coordination": 20, "reacher": 800, "ant": 80}  # moma_ppo.PRESETS (a test keeps them equal)
DIAGNOSIS_TITLES = {"ant": "Diagnosis: MOMA-PPO on ant medium, one run per hypothesis",
                    "reacher": "Diagnosis on reacher (Table 4a): MOMA-PPO's leader-only gap and the baselines' budgets, "
                               "one run per hypothesis"}
TITLES = {"3": "Table 3: Iterated Coordination Game", "4a": "Table 4a: two-agent Reacher, expert-mix",
          "4b": "Table 4b: four-agent Ant", "ablation": "§6.3 ablation: epistemic vs aleatoric penalty, ant full-replay"}


def paper_cell(table: str, obs: str, dataset: str, method: str) -> Optional[tuple]:
    if table == "3":
        return PAPER_TABLE3.get(dataset, {}).get(method)
    if table == "4a":
        return PAPER_TABLE4A.get(obs, {}).get(method)
    if table == "4b":
        return PAPER_TABLE4B.get((obs, dataset), {}).get(method)
    return None


# --------------------------------------------------------------------------------------------------
# Cost estimates for run_all.sh's plan: seconds per gradient step (model-free) or per iteration (MOMA-PPO) with
# 1 torch thread (MOMA-PPO: its default 2), plus a fixed cost per run (loading, the 100-episode evaluation).
# Where measured: the project's 2-core CPU, usually shared with one other training (the hand runs of
# results/legacy.md, the scripts' --total-steps docstrings, and coordination cells timed when the run records
# were introduced; docs/reproduction.md, "Budgets").
# "PO" = partially observable task, where the 10-step history encoder dominates the cost.
# --------------------------------------------------------------------------------------------------
SECONDS_PER_STEP = {
    # coordination game (5,000-step cells and MOMA-PPO's 20 iterations timed then, 1 thread, other core
    # busy: IQL 62 s, MAIQL 178 s, IBC 34 s, MOMA-PPO 17 s of which ~15 s loading its world model)
    ("coordination", "FO", "moma_ppo"): 0.6, ("coordination", "FO", "iql"): 0.0115,
    ("coordination", "FO", "maiql"): 0.035, ("coordination", "FO", "ibc"): 0.0058,
    # reacher all-observant, 50k-step runs (5k for ICQL / IOMAR) and MOMA-PPO 400 iterations in 729 s
    ("reacher", "FO", "iql"): 0.0118, ("reacher", "FO", "maiql"): 0.0346, ("reacher", "FO", "matd3bc"): 0.0201,
    ("reacher", "FO", "ibc"): 0.0058, ("reacher", "FO", "itd3bc"): 0.0164, ("reacher", "FO", "icql"): 0.234,
    ("reacher", "FO", "omar"): 0.251, ("reacher", "FO", "moma_ppo"): 1.8,
    # reacher PO: MOMA-PPO leader-only 400 iterations in 44 min; IBC 0.064-0.076 and ITD3+BC 0.109-0.138 s a step
    # (Table 4a's records, one thread beside another cell, 2026-12-04/05). The others from their update()'s time
    # against ITD3+BC's in one process (2026-12-05, reacher independent, batch 256, one thread, machine busy): ITD3+BC
    # 99 ms (2.0 GFLOP), MAIQL 136 ms, ICQL 482 ms (14.6 GFLOP: the CQL term's 30 sampled actions), IOMAR 536 ms
    # (16.0 GFLOP). Replaced by Table 4a's records where they exist (2026-12-05, whole runs with their evaluations,
    # one thread beside another cell): MATD3+BC 581-877 s for 10k steps, MAIQL 813-849 s for 10k, ICQL 1,802 s for
    # 5k (beside the test suite too): the update timings above overstated them about 2x
    ("reacher", "PO", "moma_ppo"): 6.6, ("reacher", "PO", "ibc"): 0.07, ("reacher", "PO", "itd3bc"): 0.124,
    ("reacher", "PO", "matd3bc"): 0.075, ("reacher", "PO", "maiql"): 0.085, ("reacher", "PO", "icql"): 0.36,
    ("reacher", "PO", "omar"): 0.4,
    # ant full, medium: 20k IQL in 250 s, MAIQL 10k in 500 s, MAIQL-ft 10k in 847 s, IBC 50k in 595 s, ITD3+BC 20k
    # in 666 s, ICQL / IOMAR 2k in 930 / 1050 s; MATD3+BC 13.1 updates/s (itd3bc.py); MOMA-PPO from its
    # 5,341 synthetic steps/s (bench, 2 threads) at ~20k synthetic steps per iteration plus its evaluations
    ("ant", "FO", "iql"): 0.0125, ("ant", "FO", "maiql"): 0.05, ("ant", "FO", "maiql_ft"): 0.085,
    ("ant", "FO", "ibc"): 0.0119, ("ant", "FO", "itd3bc"): 0.0333, ("ant", "FO", "matd3bc"): 0.076,
    ("ant", "FO", "icql"): 0.465, ("ant", "FO", "omar"): 0.525, ("ant", "FO", "moma_ppo"): 8.7,
    # Table 4b at budget default (2026-12-02, AMD EPYC, one thread beside another cell, minibatch 1,024 and the fused
    # history encoder): MOMA-PPO full 80 iterations in 694 s, partial ~21 s per iteration; ITD3+BC partial 7.6 steps/s.
    # ant partial, medium: IBC 10k in 1,322 s, ITD3+BC 10k in 1,552 s, MAIQL 2.3 steps/s, ICQL 0.62 and IOMAR
    # 0.54 updates/s (docstrings), MOMA-PPO 250 iterations in 59 min (2 threads)
    ("ant", "PO", "ibc"): 0.132, ("ant", "PO", "itd3bc"): 0.132, ("ant", "PO", "matd3bc"): 0.26,
    ("ant", "PO", "maiql"): 0.435, ("ant", "PO", "maiql_ft"): 0.5, ("ant", "PO", "icql"): 1.6,
    ("ant", "PO", "omar"): 1.85, ("ant", "PO", "moma_ppo"): 21.0,
}
SECONDS_PER_RUN = {"coordination": 5, "reacher": 40, "ant": 150}  # load, world model from cache, final evaluation
PARTIAL_OBS = {obs for _, obs in envs.PARTIALLY_OBSERVABLE}  # observation functions of the PO tasks
# What a cell needs before it can start, when it is missing (run_all.sh --slurm's prepare job): building a dataset
# (docs/datasets.md build wall times here: reacher 272 s, ant 623-1,244 s, plus the reference scores' 300
# episodes on a first build) and training a world model (MOMA-PPO's presets: coordination 3,000 small steps; reacher
# and ant up to 60k steps at 70.7 steps/s, docs/benchmarks.md).
BUILD_SECONDS = {"coordination": 10, "reacher": 400, "ant": 1500}
WORLD_MODEL_SECONDS = {"coordination": 60, "reacher": 900, "ant": 2000}  # ant: 1,976-2,004 s at its 60k-step cap, one thread
# (results/world_models/ant__*.json)
# Memory a cell asks for (MB) in run_all.sh --slurm's requests: peak resident memory seen here (VmHWM) with about
# 2-3x headroom for the final evaluation's simulators and the allocator. Seen: a coordination IQL cell 0.35 GB; MOMA-PPO
# on ant partial/medium 1.9-2.0 GB mid-run (1M-transition dataset, per-agent views, history indices, world model);
# reacher's 1M transitions are smaller than Ant's. `--mem` overrides.
MEMORY_MB = {("coordination", "FO"): 1024, ("reacher", "FO"): 3072, ("reacher", "PO"): 3072,
             ("ant", "FO"): 4096, ("ant", "PO"): 4096}


def seconds_per_step(env: str, obs: str, method: str) -> float:
    kind = "PO" if obs in PARTIAL_OBS else "FO"
    base = method.split("-")[0]  # an ablation costs what MOMA-PPO costs
    key = (env, kind, base)
    if key not in SECONDS_PER_STEP and env == "reacher":  # not timed: the history encoder dominates as on ant
        key = ("ant", kind, base)
    return SECONDS_PER_STEP.get(key, SECONDS_PER_STEP.get((env, "FO", base), 1.0))


# moma_ppo.PRESETS' iterations, kept here so that planning never imports the training scripts (run_all.sh plans in
# folders holding only this file, envs.py and run_all.sh); tests/test_results.py checks that the two agree.
MOMA_PPO_ITERATIONS = MOMA_PRESET_ITERATIONS  # the plan's estimates read the same presets


def default_steps(script: str, env: str, obs: str, flags: list) -> int:
    """The gradient steps (iterations for MOMA-PPO) a cell will run: its --total-steps / --iterations flag, or
    the script's default (MAIQL-ft trains its offline steps twice: offline, then with simulator data)."""
    value = None
    for name in ("--total-steps", "--iterations"):
        if name in flags:  # the last occurrence wins, as on the scripts' command line
            value = int(flags[len(flags) - 1 - flags[::-1].index(name) + 1])
    if script == "moma_ppo.py":
        return value or MOMA_PPO_ITERATIONS[env]
    po = obs in PARTIAL_OBS
    if value is None:
        if env == "coordination":
            value = 5_000
        elif script in ("icql.py", "omar.py"):
            value = 5_000 if po else 10_000
        elif script == "iql.py":
            value = 50_000
        else:
            value = 10_000 if po else 50_000
    return value * (2 if "--finetune" in flags else 1)


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Record:
    table: str
    folder: pathlib.Path
    summary: dict
    curve: list  # rows of curve.csv as dicts of floats
    command: str

    @property
    def env(self) -> str:
        return self.summary["env"]

    @property
    def obs(self) -> str:
        return self.summary["obs"]

    @property
    def dataset(self) -> str:
        return dataset_name(self.env, self.summary["dataset_id"])

    @property
    def method(self) -> str:
        s = self.summary
        return s.get("method") or s.get("algorithm", "?").replace("-", "_")

    @property
    def budget(self) -> str:
        return self.summary.get("budget") or "unnamed (run by hand)"

    @property
    def score(self) -> float:
        return float(self.summary["normalized_score_mean"])

    @property
    def collapsed(self) -> Optional[dict]:
        """Where the run's critic diverged (envs.CriticLog's verdict), else None: such a run's score is that of a
        policy trained on a broken critic's advantages, not the method's, so the tables never average it in (they
        count it apart, ‡), as the paper filtered MAIQL's collapsed runs on Ant."""
        return self.summary.get("critic_diverged") or None


def dataset_name(env: str, dataset_id: str) -> str:
    """'moma/ant/medium-v0' -> 'medium'; an external id (e.g. Farama's) stays whole."""
    m = re.fullmatch(rf"moma/{re.escape(env)}/(.+)-v0", dataset_id)
    return m.group(1) if m else dataset_id


def load_records(results_dir: pathlib.Path = RESULTS_DIR) -> list:
    records = []
    for table in TABLES:
        for summary_path in sorted((results_dir / table).glob("*/summary.json")):
            folder = summary_path.parent
            try:
                summary = json.loads(summary_path.read_text())
            except ValueError as e:
                raise envs.MomaError(f"{summary_path} is not valid JSON ({e}); restore it with git") from None
            curve = []
            if (folder / "curve.csv").exists():
                with open(folder / "curve.csv", newline="") as f:
                    curve = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
            command = (folder / "command.txt").read_text().strip() if (folder / "command.txt").exists() else ""
            records.append(Record(table, folder, summary, curve, command))
    return records


EQUIVALENCE_FILE = "code_equivalence.json"  # in results/: written by `python results.py recheck`
# ... and the groups it found to differ, so that the next recheck does not rerun them (`--again` does)
DIFFERENCES_FILE = "code_differences.json"
# Config entries that do not choose what a run computes per step: where it writes, what it is called, its length and
# how often it evaluates (the recheck overrides those), its seed and dataset (the same code runs for every seed and
# dataset of an env and observability; the check is made on one of them).
RECHECK_VOLATILE = {"seed", "dataset", "run_dir", "results_dir", "exp_name", "budget", "torch_threads", "cuda",
                    "resume", "checkpoint_every", "cross_play_with", "iterations", "total_steps", "eval_every",
                    "eval_episodes", "eval_episodes_during", "track"}


def config_key(summary: dict) -> str:
    """The settings of a run that a code-equivalence check must match (its config without RECHECK_VOLATILE)."""
    config = summary.get("config") or {}
    return json.dumps({k: v for k, v in sorted(config.items()) if k not in RECHECK_VOLATILE}, sort_keys=True,
                      default=str)


def load_equivalences(results_dir: pathlib.Path = RESULTS_DIR, name: str = EQUIVALENCE_FILE) -> list:
    path = pathlib.Path(results_dir) / name
    return json.loads(path.read_text()) if path.exists() else []


def _matching_check(entries: list, code: dict, current: dict, env: str, obs: str, key: str) -> Optional[dict]:
    """The recheck entry (equivalent or different) made for this code, today's code, env, observability and settings"""
    for entry in entries:
        if (entry.get("from") == code and entry.get("to") == current and entry.get("env") == env
                and entry.get("obs") == obs and entry.get("config_key") == key):
            return entry
    return None


def _append_entry(path: pathlib.Path, entry: dict) -> None:
    entries = json.loads(path.read_text()) if path.exists() else []
    entries.append(entry)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(entries, indent=1) + "\n")
    os.replace(tmp, path)


class Staleness:
    """Why a record may no longer describe what the current code and data would give (None = fresh).

    A record whose code changed is still fresh when results/code_equivalence.json holds a check for its code, env,
    observability and settings: a short run of the same command at the commit the record's code was taken from and
    with today's code gave bit-identical greedy episodes and checkpoint tensors (`python results.py recheck`). That check covers what a short
    run executes; a change acting only late in a run (or only on resume) would escape it, so the table names every
    record it vouches for."""

    def __init__(self, repo: pathlib.Path = REPO, equivalences: Optional[list] = None):
        self.repo = repo
        self._file_hashes: dict = {}
        self._dataset_fingerprints: dict = {}
        self.equivalences = load_equivalences(repo / "results") if equivalences is None else equivalences

    def current_code(self, code: dict) -> dict:
        return {name: self.file_hash(name) for name in code}

    def vouched(self, summary: dict) -> Optional[dict]:
        """The recheck entry of a record whose code changed but was checked equivalent (None if unchanged or not)."""
        code = summary.get("code_fingerprint") or {}
        if not code or self.current_code(code) == code:
            return None
        return self.equivalence(summary)

    def equivalence(self, summary: dict) -> Optional[dict]:
        """The recheck entry that vouches for this record's code under today's, or None."""
        code = summary.get("code_fingerprint") or {}
        return _matching_check(self.equivalences, code, self.current_code(code), summary.get("env"),
                               summary.get("obs"), config_key(summary))

    def file_hash(self, name: str) -> Optional[str]:
        if name not in self._file_hashes:
            path = self.repo / name
            self._file_hashes[name] = envs.file_hash(path) if path.exists() else None
        return self._file_hashes[name]

    def dataset_fingerprint(self, env: str, dataset: str) -> Optional[str]:
        key = (env, dataset)
        if key not in self._dataset_fingerprints:
            try:
                self._dataset_fingerprints[key] = envs.dataset_fingerprint(env, dataset)
            except Exception:  # an unreadable dataset cannot vouch for a record
                self._dataset_fingerprints[key] = None
        return self._dataset_fingerprints[key]

    def code_reason(self, summary: dict) -> Optional[str]:
        code = summary.get("code_fingerprint")
        if not code:
            return "no code fingerprint recorded"
        changed = [name for name, h in code.items() if self.file_hash(name) != h]
        if changed and self.equivalence(summary) is None:
            return f"code changed since the run: {', '.join(changed)}"
        return None

    def dataset_note(self, env: str, dataset: str, fingerprint: Optional[str]) -> tuple:
        """(stale reason or None, note or None)."""
        current = self.dataset_fingerprint(env, dataset)
        if current is None:
            return None, "dataset not built here, fingerprint not checked"
        if not fingerprint:
            return "no dataset fingerprint recorded", None
        if fingerprint != current:
            return f"dataset rebuilt since the run (fingerprint {fingerprint} -> {current})", None
        return None, None

    def check(self, record: Record) -> tuple:
        """(list of stale reasons, list of notes)."""
        reasons, notes = [], []
        code = self.code_reason(record.summary)
        if code:
            reasons.append(code)
        reason, note = self.dataset_note(record.env, record.dataset, record.summary.get("dataset_fingerprint"))
        reasons += [reason] if reason else []
        notes += [note] if note else []
        reason = preset_iterations_reason(record)
        reasons += [reason] if reason else []
        return reasons, notes


def preset_iterations_reason(record: "Record") -> Optional[str]:
    """A MOMA-PPO table cell at the default or paper budget is a run at the preset's iterations. Run names leave
    --iterations out (a budget, not a method), and a recheck runs 2 iterations, so neither can tell a record made
    before a preset changed its iterations: this does. Diagnosis rows are labelled with their iterations instead."""
    s = record.summary
    if record.table == "diagnosis" or record.method != "moma_ppo" or s.get("budget") not in ("default", "paper"):
        return None
    made, preset = (s.get("config") or {}).get("iterations"), MOMA_PRESET_ITERATIONS.get(record.env)
    if made is None or preset is None or made == preset:
        return None
    return f"made at {made} iterations; the preset is now {preset}"


def mean_sem(values) -> tuple:
    v = np.asarray(values, dtype=np.float64)
    sem = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), sem


def fmt_cell(values, stale: bool) -> str:
    m, s = mean_sem(values)
    sem = "–" if math.isnan(s) else f"{s:.2f}"
    return f"{m:.2f} ± {sem} ({len(values)}){' †' if stale else ''}"


def fmt_paper(cell: Optional[tuple]) -> str:
    return "" if cell is None else f"{cell[0]:.2f} ± {cell[1]:.2f}"


def fmt_steps(record: Record) -> str:
    """The training of one record, and its precision where it is not fp32 (--bf16 runs file into the same cells)."""
    s = record.summary
    steps = s.get("train_steps", 0)
    bf16 = ", bfloat16 (--bf16)" if s.get("config", {}).get("bf16") else ""
    if record.method.startswith("moma_ppo"):
        return f"{s.get('config', {}).get('iterations', '?')} it, {steps / 1e6:.2f}M synthetic steps{bf16}"
    return f"{steps / 1000:g}k grad steps{bf16}"


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.0f} min" if seconds < 36_000 else f"{seconds / 3600:.1f} h"


def half_to_end(record: "Record") -> Optional[tuple]:
    """(score at the evaluation nearest half of the run's last step, at or before it; the final score) read off
    the record's curve.csv, or None with fewer than two evaluations."""
    rows = [row for row in record.curve if "normalized_score" in row and "step" in row]
    if len(rows) < 2:
        return None
    return half_way_row(rows)["normalized_score"], rows[-1]["normalized_score"]


def half_way_row(rows: list) -> dict:
    """Of a curve's evaluations (rows by step), the one nearest half of the last step, at or before it."""
    return ([row for row in rows[:-1] if row["step"] <= rows[-1]["step"] / 2] or rows[:1])[-1]


def to_paper_scale_reacher(record: "Record", scores) -> Optional[np.ndarray]:
    """Scores on our scale of a Reacher record (e.g. its curve's) on the paper's: both scales are affine in the return,
    and the record's own episodes (returns and their scores) give ours exactly. None where the record lacks them."""
    s = record.summary
    returns = np.asarray(s.get("episode_returns") or [], dtype=np.float64)
    ours = np.asarray(s.get("episode_normalized_scores") or [], dtype=np.float64)
    if record.env != "reacher" or len(returns) != len(ours) or len(returns) < 2 or np.ptp(returns) == 0:
        return None
    slope, intercept = np.polyfit(returns, ours, 1)  # ours = (R - ref_min) / (ref_max - ref_min)
    return paper_scale_reacher((np.asarray(scores, dtype=np.float64) - intercept) / slope)


def second_half_gain(record: "Record") -> Optional[tuple]:
    """(gain, its standard error) of the record's learning curve over the second half of its run: a straight line
    fitted by weighted least squares to the evaluations from half_to_end's half-way point to the final one, its slope
    times that span. Each evaluation's variance is s² / its episodes, s the spread of the final evaluation's episode
    scores (an evaluation of 10 episodes weighs a tenth of the final 100). On Reacher on the paper's scale, like the
    table. None with fewer than two evaluations or no episode scores."""
    rows = [row for row in record.curve if "normalized_score" in row and "step" in row]
    episodes = np.asarray(record.summary.get("episode_normalized_scores") or [], dtype=np.float64)
    if len(rows) < 2 or len(episodes) < 2:
        return None
    half_way_step = half_way_row(rows)["step"]
    rows = [row for row in rows if row["step"] >= half_way_step]
    steps = np.asarray([row["step"] for row in rows], dtype=np.float64)
    scores = np.asarray([row["normalized_score"] for row in rows], dtype=np.float64)
    if record.env == "reacher":
        scores, episodes = to_paper_scale_reacher(record, scores), to_paper_scale_reacher(record, episodes)
        if scores is None:
            return None
    n = np.asarray([row.get("episodes") or len(episodes) for row in rows], dtype=np.float64)
    weights = n / max(float(np.var(episodes, ddof=1)), 1e-12)
    x_mean = np.sum(weights * steps) / np.sum(weights)
    sxx = np.sum(weights * (steps - x_mean) ** 2)
    if sxx <= 0:
        return None
    slope = np.sum(weights * (steps - x_mean) * scores) / sxx
    span = steps[-1] - steps[0]
    return float(slope * span), float(span / np.sqrt(sxx))


def still_rising(recs: list, min_gain: float = 0.05) -> Optional[tuple]:
    """(mean gain, its standard error, rising?) over the records' second_half_gain: rising where the mean gain is
    above min_gain and above twice its standard error, i.e. the budget stopped the method on a rising curve. The
    error is the larger of the evaluations' noise and, with two seeds or more, the seeds' spread of gains."""
    gains = [g for g in (second_half_gain(r) for r in recs if not r.collapsed) if g is not None]
    if not gains:
        return None
    gain = float(np.mean([g for g, _ in gains]))
    sem = float(np.sqrt(np.sum([se ** 2 for _, se in gains])) / len(gains))  # the evaluations' own noise
    if len(gains) > 1:  # seeds that disagree more than that noise allows: their spread is the error
        sem = max(sem, float(np.std([g for g, _ in gains], ddof=1) / np.sqrt(len(gains))))
    return gain, sem, gain > min_gain and gain > 2 * sem


def fmt_rising(recs: list) -> str:
    """"+0.28 ± 0.10 ↗": still_rising's mean gain and its error, marked where rising."""
    rising = still_rising(recs)
    if rising is None:
        return "n/a"
    gain, sem, up = rising
    return f"{gain:+.2f} ± {sem:.2f}{' ↗' if up else ''}"


def fmt_half_to_end(recs: list) -> str:
    """"0.52 → 0.60 (3)": half_to_end's two scores, each the mean over the records that have both. On Reacher the
    paper's scale first where every record allows it, then ours in square brackets (Table 4a's convention)."""
    recs = [r for r in recs if not r.collapsed and half_to_end(r) is not None]
    if not recs:
        return "n/a"
    half, end = np.mean([half_to_end(r) for r in recs], axis=0)
    paper = [to_paper_scale_reacher(r, half_to_end(r)) for r in recs]
    if all(p is not None for p in paper):
        p_half, p_end = np.mean(paper, axis=0)
        return f"{p_half:.2f} → {p_end:.2f} [ours {half:.2f} → {end:.2f}] ({len(recs)})"
    return f"{half:.2f} → {end:.2f} ({len(recs)})"


# --------------------------------------------------------------------------------------------------
# Datasets: Tables 1 and 2 from small committed JSON files (results/datasets/<env>__<dataset>.json)
# --------------------------------------------------------------------------------------------------
def standing_still_score(env: str, data: "envs.OfflineData", n_episodes: int = 10) -> Optional[float]:
    """Normalised score of zero torques on every joint (a reference line of the learning curves)."""
    if env == "coordination":
        return None  # no 'doing nothing' action in a matrix game
    zero = [np.zeros((1, d), dtype=np.float32) for d in envs.action_dims(env)]
    returns = envs.evaluate(env, None, lambda obs, hist: [np.repeat(z, len(obs[0]), 0) for z in zero], n_episodes)
    return float(data.normalized_score(returns).mean())


def write_dataset_stats(results_dir: pathlib.Path = RESULTS_DIR) -> list:
    """Write the statistics of every project dataset present on this machine (others are left as they are)."""
    written = []
    for env in envs.ENVS:
        for dataset in envs.DATASETS[env]:
            if not envs.dataset_exists(env, dataset):
                print(f"skip {env}/{dataset}: not built here (python envs.py --env {env} --dataset {dataset})")
                continue
            stats = envs.dataset_stats(env, dataset)
            data = envs.load_dataset(env, dataset, build_if_missing=False)
            stats.update(env=env, name=dataset, fingerprint=data.fingerprint,
                         standing_still_score=standing_still_score(env, data))
            path = results_dir / "datasets" / f"{env}__{dataset}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stats, indent=1) + "\n")
            written.append(path)
            print(f"wrote {path}: mean score {stats.get('mean_score_pct', float('nan')):.1f}%")
    return written


# World models: their held-out reports, kept as small JSON files (results/world_models/<env>__<dataset>__seed<k>.json)
# so that a report outlives the machine that trained the model (the models themselves are not committed).
WORLD_MODEL_REPORT_KEYS = ("train_steps", "stopped_early", "train_time_s", "train_steps_per_s", "n_transitions",
                           "n_train", "n_holdout", "holdout_mse", "holdout_nll", "holdout_terminal_accuracy",
                           "holdout_terminals", "holdout_terminal_recall", "holdout_terminal_recall_model", "elites",
                           "elite_reward_rmse", "elite_state_rmse", "rollout")


def world_model_report(model) -> dict:
    """The held-out report of a loaded world model (its metrics less the per-evaluation history), with what it was
    trained on and how."""
    report = {k: model.metrics[k] for k in WORLD_MODEL_REPORT_KEYS if k in model.metrics}
    report.update(env=model.env, dataset_id=model.dataset_id, dataset_fingerprint=model.dataset_fingerprint,
                  hyper={k: v for k, v in model.config.items() if k in ("hidden_dim", "n_hidden_layers", "max_steps",
                                                                      "lr_decays", "patience", "ensemble_size",
                                                                      "n_elites", "seed", "torch_threads")})
    return report


def write_world_model_reports(results_dir: pathlib.Path = RESULTS_DIR, seed: int = 0) -> list:
    """Write the held-out report of every cached, current world model (seed `seed`) of a project dataset present
    here; models of other builds of their dataset (stale) are skipped, reports of models not here are kept."""
    import world_model

    written = []
    for env in envs.ENVS:
        for dataset in envs.DATASETS[env]:
            path = world_model.artifact_path(env, dataset, seed)
            if not path.exists() or not envs.dataset_exists(env, dataset):
                continue
            try:
                model = world_model.load(path, env, dataset, seed=seed)
            except envs.MomaError as e:
                print(f"skip {env}/{dataset}: {e}")
                continue
            out = results_dir / "world_models" / f"{env}__{dataset}__seed{seed}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(world_model_report(model), indent=1) + "\n")
            written.append(out)
            print(f"wrote {out}")
    return written


def load_world_model_reports(results_dir: pathlib.Path = RESULTS_DIR) -> list:
    return [json.loads(p.read_text()) for p in sorted((results_dir / "world_models").glob("*.json"))]


def world_model_tables(reports: list) -> list:
    lines = ["## World models (seed 0): held-out reports", "",
             "From `results/world_models/*.json` (`python results.py world-models` on a machine that has trained them; "
             "`python world_model.py --env <env> --dataset <name>` trains one). Held-out split: 10% of the episodes. MSE "
             "on standardised [s' - s, r] per member; terminal accuracy of the learned head; recall on the held-out "
             "real terminals: the members' heads (range) / the elites' vote / the vote or the env's termination rule "
             "(what MOMA-PPO uses); open-loop rollouts of held-out episodes with their actions: state RMSE in units of "
             "the dataset's state std and |reward error| at horizons 1 / 5 / 10.", ""]
    if not reports:
        return lines + ["No reports yet.", ""]
    # the rows of docs/datasets.md's world-model cards, formatted once, where the cards are built
    from make_datasets import WORLD_MODEL_HEADER, world_model_row

    return lines + WORLD_MODEL_HEADER + [world_model_row(r) for r in reports] + [""]


def load_dataset_stats(results_dir: pathlib.Path = RESULTS_DIR) -> dict:
    stats = {}
    for path in sorted((results_dir / "datasets").glob("*.json")):
        s = json.loads(path.read_text())
        stats[(s["env"], s["name"])] = s
    return stats


# --------------------------------------------------------------------------------------------------
# docs/results.md
# --------------------------------------------------------------------------------------------------
def plot_path(table: str, budget: str, env: str, obs: str, dataset: str, plots_dir: pathlib.Path = PLOTS_DIR) -> pathlib.Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", budget)
    return plots_dir / f"{table}__{slug}__{env}__{obs}__{dataset.replace('/', '_')}.png"


def ablation_plot_path(budget: str, plots_dir: pathlib.Path = PLOTS_DIR) -> pathlib.Path:
    return plots_dir / f"ablation__{re.sub(r'[^A-Za-z0-9_.-]+', '_', budget)}.png"


def diagnosis_plot_path(budget: str, plots_dir: pathlib.Path = PLOTS_DIR, env: str = "ant") -> pathlib.Path:
    """Ant's figure keeps its first name; another env's names the env."""
    suffix = "" if env == "ant" else f"__{env}"
    return plots_dir / f"diagnosis_training__{re.sub(r'[^A-Za-z0-9_.-]+', '_', budget)}{suffix}.png"


# The panels of the diagnosis figure: training.csv columns (MOMA-PPO's per-iteration log) against synthetic steps.
DIAGNOSIS_PANELS = (("eval_score", "greedy score (in-training evaluations)"),
                    ("eval_full_length_share", "share of greedy episodes reaching the time limit"),
                    ("lambda_return", "mean λ-return of the rollouts (value scale)"),
                    ("mean_length", "mean synthetic rollout length (k = 10)"),
                    ("timeouts_by_uncertainty", "share of rollouts cut by ε_g ≥ l_ε"),
                    ("action_mean_abs", "mean |μ| of the policies' actions"))


def read_training_log(folder: pathlib.Path) -> dict:
    """training.csv of a MOMA-PPO record as {column: np.array} (NaN where a row has no value), or {}."""
    path = pathlib.Path(folder) / "training.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) if r.get(k) not in ("", None) else np.nan for r in rows]) for k in rows[0]} if rows else {}


def diagnosis_figure(records: list, budget: str, refs: dict, plots_dir: pathlib.Path = PLOTS_DIR, env: str = "ant"):
    """One figure for the diagnosis runs of a budget and env: a panel per DIAGNOSIS_PANELS column, a line per run."""
    import matplotlib.pyplot as plt

    logs = [(r, read_training_log(r.folder)) for r in records]
    logs = [(r, log) for r, log in logs if log]
    if not logs:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(16, 7))
    # One colour per (observability, method, dataset), its seeds in the same colour; full observability dashed.
    groups = sorted({(r.obs, r.method, r.dataset) for r, _ in logs}, key=lambda g: (g[0] != "partial", g[2], g[1]))
    colours = {g: plt.get_cmap("tab20")(i % 20) for i, g in enumerate(groups)}
    for ax, (column, title) in zip(axes.flat, DIAGNOSIS_PANELS):
        labelled = set()
        for r, log in logs:
            y = log.get(column)
            if y is None:
                continue
            keep = np.isfinite(y)
            group = (r.obs, r.method, r.dataset)
            label = (f"{'FO' if r.obs == 'full' else 'PO'} {r.method.replace('moma_ppo-', '').replace('moma_ppo', 'preset')}"
                     f"{'' if r.dataset == 'medium' else ', ' + r.dataset}") if group not in labelled else None
            labelled.add(group)
            ax.plot(log["synthetic_steps"][keep], y[keep], marker="." if column.startswith("eval") else None,
                    linewidth=1, label=label, color=colours[group], linestyle="--" if r.obs == "full" else "-")
        if column == "eval_score":
            for label, value in refs.items():
                if value is not None:
                    ax.axhline(value, color="grey", linestyle="--" if label == "dataset mean" else ":", linewidth=1,
                               label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("synthetic steps", fontsize=7)
        ax.tick_params(labelsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, title="one colour per run type, its seeds alike",
               title_fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.82, 1))
    path = diagnosis_plot_path(budget, plots_dir, env)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def dataset_tables(stats: dict, staleness: Staleness) -> list:
    lines = ["## Datasets (paper Tables 1 and 2)", "",
             "From `results/datasets/*.json` (`python results.py datasets` on a machine that has built the datasets). "
             "Scores are normalised with each dataset's own reference returns; the MuJoCo datasets are made here "
             "(docs/datasets.md), not D4RL's, so compare shapes rather than magnitudes.", ""]
    lines += ["| env | dataset | episodes | transitions | min % | mean % | median % | max % | ref max (expert) | "
              "ref min (random) | paper: min / mean / median / max %, expert / random |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    footnotes, unchecked = [], False
    for env in envs.ENVS:
        for dataset in envs.DATASETS[env]:
            s = stats.get((env, dataset))
            if env == "coordination":
                p = PAPER_TABLE1.get(dataset)
                paper = f"Table 1 mean score {p:.3f}" if p is not None else ""
            else:
                p = PAPER_TABLE2.get((env, dataset))
                paper = (f"{p['min']} / {p['mean']} / {p['median']} / {p['max']}, {p['expert']} / {p['random']}"
                         if p else "")
            if s is None:
                lines.append(f"| {env} | {dataset} | missing | | | | | | | | {paper} |")
                continue
            reason, note = staleness.dataset_note(env, dataset, s.get("fingerprint"))
            mark = ""
            if reason:
                footnotes.append(f"{env}/{dataset}: {reason}")
                mark = " †"
            elif note:
                mark, unchecked = " ‡", True
            pct = [s.get(f"{k}_score_pct") for k in ("min", "mean", "median", "max")]
            pct = [f"{x:.1f}" if x is not None else "" for x in pct]
            sizes = [f"{s[k]:,}" if isinstance(s.get(k), int) else "" for k in ("episodes", "transitions")]
            lines.append(f"| {env} | {dataset}{mark} | " + " | ".join(sizes + pct) +
                         f" | {s.get('ref_max_score', '')} | {s.get('ref_min_score', '')} | {paper} |")
    lines.append("")
    if unchecked:
        lines += ["‡ dataset not built here, fingerprint not checked.", ""]
    lines += [f"† stale: {f}" for f in footnotes]
    return lines + [""]


def results_table(table: str, budget: str, records: list, staleness: Staleness, plots_dir: pathlib.Path,
                  stats: Optional[dict] = None) -> list:
    layout = LAYOUT[table]
    env = layout["env"]
    cells = collections.defaultdict(list)
    for r in records:
        cells[(r.obs, r.dataset, r.method)].append(r)
    methods = list(layout["methods"])
    extra = sorted({m for (_, _, m) in cells} - set(methods))
    rows = list(layout["rows"]) + sorted({(o, d) for (o, d, _) in cells} - set(layout["rows"]))
    lines = [f"### budget `{budget}`", ""]
    header = ["obs", "dataset"] + [METHOD_LABELS.get(m, m) for m in methods + extra]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    stale_notes, notes = collections.defaultdict(list), set()  # (cell, reasons) -> seeds
    vouched_notes = collections.defaultdict(list)  # (cell, commits) -> seeds
    collapsed_notes = []  # (cell, record) of runs whose critic diverged
    unchecked_notes = collections.defaultdict(list)  # cell -> seeds of critic records without a verdict
    rising_cells = []  # cells whose budget stopped them on a rising learning curve
    for obs, dataset in rows:
        out = [obs, dataset]
        for m in methods + extra:
            recs = sorted(cells.get((obs, dataset, m), []), key=lambda r: r.summary.get("seed", 0))
            paper = paper_cell(table, obs, dataset, m)
            collapsed = [r for r in recs if r.collapsed]
            recs = [r for r in recs if not r.collapsed]
            for r in collapsed:
                collapsed_notes.append((f"{obs} {dataset} {METHOD_LABELS.get(m, m)}", r))
            for r in recs:  # made before the verdict existed: nobody looked at their critic
                if m in CRITIC_METHODS and "critic_diverged" not in r.summary:
                    unchecked_notes[f"{obs} {dataset} {METHOD_LABELS.get(m, m)}"].append(str(r.summary.get("seed")))
            if not recs:
                centralised_po = m == "iql" and obs in PARTIAL_OBS  # the paper has no such cell: IQL sees the state
                text = "n/a" if centralised_po else (f"collapsed ({len(collapsed)}) ‡" if collapsed else "missing")
                out.append(text + (f" (paper {fmt_paper(paper)})" if paper and not centralised_po else ""))
                continue
            stale, vouched = False, False
            for r in recs:
                reasons, rec_notes = staleness.check(r)
                notes.update(rec_notes)
                cell = f"{obs} {dataset} {METHOD_LABELS.get(m, m)}"
                if reasons:
                    stale = True
                    stale_notes[(cell, "; ".join(reasons))].append(str(r.summary.get("seed")))
                elif (entry := staleness.vouched(r.summary)) is not None:
                    vouched = True
                    vouched_notes[(cell, f"{entry['from_commit'][:8]} -> {entry['to_commit'][:8]}")].append(
                        str(r.summary.get("seed")))
            paper_scale = [paper_scale_score(r.summary) for r in recs] if env == "reacher" else [None]
            if None not in paper_scale:  # Table 4a: the paper's scale first, comparable with its number
                m_ours, s_ours = mean_sem([r.score for r in recs])
                text = (fmt_cell(paper_scale, stale) + (" ≡" if vouched and not stale else "")
                        + f" [ours {m_ours:.2f} ± {'–' if math.isnan(s_ours) else f'{s_ours:.2f}'}]")
            else:
                text = fmt_cell([r.score for r in recs], stale) + (" ≡" if vouched and not stale else "")
            text += f" + {len(collapsed)} collapsed ‡" if collapsed else ""
            if (rising := still_rising(recs)) is not None and rising[2]:
                text += " ↗"
                rising_cells.append(f"{obs} {dataset} {METHOD_LABELS.get(m, m)}")
            if paper:
                text += f" (paper {fmt_paper(paper)})"
            out.append(text)
        lines.append("| " + " | ".join(out) + " |")
    lines.append("")
    reacher_note = (" On Reacher the score is on the paper's scale first (its reference returns -11.145 / -4.237, about a "
                    "zero-torque arm and its expert; \"Conventions and the paper's scale\" below), then on ours in "
                    "square brackets (uniform random torques and our expert), where a failing arm still reads ~0.8."
                    if env == "reacher" else "")
    lines.append("Each cell: mean ± s.e.m. over seeds (number of seeds) of the normalised score of 100 greedy episodes "
                 "(the final evaluation of each run), the paper's number in brackets. † = stale record (see below)."
                 + reacher_note
                 + (" ≡ = made with older code that a short rerun showed computes the same (see below)."
                    if vouched_notes else "")
                 + (" ↗ = still rising when its budget ended: the learning curve gained significantly over the second "
                    "half of training (budget table below), so the cell is cut short of its curve's end (what a longer run "
                    "of one seed gave, where one was made: \"Longer runs of a cell's seed\" below)."
                    if rising_cells else ""))
    if notes:
        lines.append(" ".join(sorted(f"Note: {n} for some cells." for n in notes)))
    lines.append("")
    # Budget and wall time per cell.
    lines += ["<details><summary>budget and wall time per cell</summary>", "",
              "| obs | dataset | method | seeds | training per seed | learning curve: half-way → end | "
              "second half's gain | wall time per seed (mean) | commands |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (obs, dataset, m), recs in sorted(cells.items()):
        recs = sorted(recs, key=lambda r: r.summary.get("seed", 0))
        steps = sorted({fmt_steps(r) for r in recs})
        wall = float(np.mean([r.summary.get("wall_time_s", float("nan")) for r in recs]))
        seeds = ",".join(str(r.summary.get("seed")) for r in recs)
        lines.append(f"| {obs} | {dataset} | {METHOD_LABELS.get(m, m)} | {seeds} | {'; '.join(steps)} | "
                     f"{fmt_half_to_end(recs)} | {fmt_rising(recs)} | {fmt_seconds(wall)} | "
                     f"`results/{table}/{recs[0].folder.name}/command.txt` and the other seeds |")
    lines += ["", "Learning curve: the mean over seeds of the greedy evaluation nearest half of the run's training "
              "(at or before it) and of the final one (curve.csv), so a budget that stops on a rising curve shows: "
              "the paper's tables want each method at the plateau of its curve. Second half's gain: a straight line "
              "fitted to the evaluations from that half-way point to the end, each weighted by its episodes (10 "
              "during training, 100 at the end), its rise over that span, mean ± s.e. over seeds (the s.e. the larger "
              "of the evaluations' noise and the seeds' spread); ↗ = rising (above 0.05 and twice its s.e.: "
              "results.still_rising).", "", "</details>", ""]
    if stale_notes:
        lines += ["† Stale records (made with other code or another build of the dataset; rerun them to refresh):", ""]
        lines += [f"* {cell}, seeds {', '.join(seeds)}: {reasons}" for (cell, reasons), seeds in stale_notes.items()] + [""]
    if collapsed_notes:
        lines += ["‡ Collapsed runs, left out of the means: their critic diverged (envs.CriticLog: a mean value on "
                  "dataset actions beyond max|r| / (1 - γ), or a TD loss that only such values allow), so their score is "
                  "not the method's. The records stay in results/ as the evidence (training.csv: the losses):", ""]
        for cell, r in collapsed_notes:
            c = r.collapsed
            lines.append(f"* {cell}, seed {r.summary.get('seed')}: diverged by step {c.get('step')} "
                         f"({c.get('reason')}); its final score {r.score:.3f} (`results/{table}/{r.folder.name}/`)")
        lines += [""]
    if unchecked_notes:
        lines += ["Critics not checked for divergence (records made before the scripts logged their critic, with no "
                  "training log left to backfill from: `bench/backfill_critic_log.py`; a rerun gives them a verdict): "
                  + "; ".join(f"{cell} (seeds {', '.join(seeds)})" for cell, seeds in unchecked_notes.items()) + ".", ""]
    if vouched_notes:
        lines += ["≡ Records made with older code, checked equivalent to today's (`python results.py recheck`: the same "
                  "command, shortened, at the record's commit and today gave bit-identical greedy episodes and "
                  f"checkpoint tensors; results/{EQUIVALENCE_FILE}):", ""]
        lines += [f"* {cell}, seeds {', '.join(seeds)}: {commits}" for (cell, commits), seeds in vouched_notes.items()]
        lines += [""]
    if table == "4b":
        lines += table4b_checks(records, stats or {}, staleness)
    if table == "4a":
        lines += table4a_conventions(records, staleness)
    if table != "ablation":
        images = [plot_path(table, budget, env, o, d, plots_dir) for (o, d) in rows]
        images = [p for p in images if p.exists()]
        if images:
            lines += [" ".join(f"![{p.stem}](plots/{p.name})" for p in images), ""]
    else:
        lines += [f"Paper: {PAPER_ABLATION}.", ""]
        p = ablation_plot_path(budget, plots_dir)
        if p.exists():
            lines += [f"![{p.stem}](plots/{p.name})", ""]
    return lines


def full_length_share(records: list) -> float:
    """Share of the greedy episodes (pooled over the records) that reach the env's time limit (Ant: 1,000 steps)."""
    lengths = [l for r in records for l in (r.summary.get("episode_lengths") or [])]
    if not lengths:
        return float("nan")
    return float(np.mean(np.asarray(lengths) >= envs.EPISODE_STEPS[records[0].env]))


def table4b_checks(records: list, stats: dict, staleness: "Staleness", seeds_needed: int = 3) -> list:
    """Table 4b's bars for MOMA-PPO, one line per (obs, dataset) it has records for: with full observability above
    the dataset's mean and >= the best model-free baseline; with partial observability above the standing-still
    team and >= the best model-free baseline + 0.1; >= 90% of greedy episodes reaching 1,000 steps; 3 seeds. A bar
    is judged on the means over the seeds recorded so far, against the baselines recorded so far (listed)."""
    cells = collections.defaultdict(list)
    for r in records:
        if not r.collapsed:  # a collapsed run is neither MOMA-PPO's result nor a baseline's
            cells[(r.obs, r.dataset, r.method)].append(r)
    lines = ["| obs | dataset | MOMA-PPO (seeds) | reaching 1,000 steps | reference | above it | best model-free so far "
             "(seeds) | margin (bar) | ≥ 90% full length | ≥ 3 seeds | baselines without a record |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    yes_no = {True: "yes", False: "**no**"}
    for obs, dataset in LAYOUT["4b"]["rows"]:
        moma = cells.get((obs, dataset, "moma_ppo"), [])
        if not moma:
            continue
        partial = obs in PARTIAL_OBS
        s = stats.get(("ant", dataset), {})
        if partial:
            ref_name, ref = "standing still", s.get("standing_still_score")
        else:
            ref_name, ref = "dataset mean", (s["mean_score_pct"] / 100 if "mean_score_pct" in s else None)
        mean, sem = mean_sem([r.score for r in moma])
        stale = any(staleness.check(r)[0] for r in records if r.obs == obs and r.dataset == dataset)
        baselines = [m for m in LAYOUT["4b"]["methods"] if m != "moma_ppo" and not (m == "iql" and partial)]
        recorded = {m: mean_sem([r.score for r in cells[(obs, dataset, m)]])[0]
                    for m in baselines if cells.get((obs, dataset, m))}
        missing = [METHOD_LABELS.get(m, m) for m in baselines if m not in recorded]
        bar = 0.1 if partial else 0.0
        if recorded:
            best = max(recorded, key=recorded.get)
            best_text = f"{METHOD_LABELS.get(best, best)} {recorded[best]:.2f} ({len(cells[(obs, dataset, best)])})"
            margin = f"{mean - recorded[best]:+.2f} (≥ {bar:+.1f}): {yes_no[mean - recorded[best] >= bar]}"
        else:
            best_text, margin = "none yet", "n/a"
        full = full_length_share(moma)
        ref_text = f"{ref_name} {ref:.3f}" if ref is not None else f"{ref_name}: not measured"
        above = yes_no[mean > ref] if ref is not None else "n/a"
        lines.append(f"| {obs} | {dataset} | {mean:.3f} ± {'–' if math.isnan(sem) else f'{sem:.3f}'} ({len(moma)})"
                     f"{' †' if stale else ''} | {100 * full:.0f}% | {ref_text} | {above} | {best_text} | {margin} | "
                     f"{yes_no[full >= 0.9]} | {yes_no[len(moma) >= seeds_needed]} | {', '.join(missing) or 'none'} |")
    if len(lines) == 2:
        return []
    return ["#### MOMA-PPO against the bars of docs/diagnosis.md", "",
            "The bars the diagnosis set for MOMA-PPO's Table 4b rows (full observability: above the dataset's mean and "
            "at least the best model-free baseline; partial: above standing still and the best model-free baseline by "
            "0.1; in both, 90% of greedy episodes reaching 1,000 steps and 3 seeds). Means over the seeds recorded so "
            "far, against the model-free baselines recorded so far (a bar can still flip as seeds and baselines land); "
            "† = a stale record in the row.", ""] + lines + [""]


def paper_scale_score(summary: dict) -> Optional[float]:
    """A Reacher record's score on the paper's scale (the mean over its greedy episodes), None without its episodes."""
    returns = summary.get("episode_returns")
    return float(paper_scale_reacher(returns).mean()) if returns else None


def paper_scale_reacher(returns) -> np.ndarray:
    """Reacher returns on the paper's scale: its reference returns (Table 2) are about a zero-torque arm (-11.145)
    and the expert (-4.237), where ours are uniform random torques (-42.97) and our expert; a failing arm that
    reads 0.78 on ours reads below 0 on the paper's."""
    ref = PAPER_TABLE2[("reacher", "expert-mix")]
    return envs.normalized_score(returns, ref["random"], ref["expert"])


def convention_split(recs: list) -> Optional[tuple]:
    """(paper's-scale scores of the greedy episodes whose two agents follow the same convention, of those whose agents
    differ), pooled over the records; None where no record has per-episode conventions beside its returns."""
    agreeing, differing = [], []
    for r in recs:
        agents = (r.summary.get("conventions") or {}).get("agents")
        returns = r.summary.get("episode_returns") or []
        if not agents or len(agents) != len(returns):
            continue
        scores = paper_scale_reacher(np.asarray(returns, dtype=np.float64))
        same = np.asarray([a[0] == a[1] for a in agents])
        agreeing += scores[same].tolist()
        differing += scores[~same].tolist()
    return (np.asarray(agreeing), np.asarray(differing)) if agreeing or differing else None


def fmt_convention_split(recs: list) -> str:
    split = convention_split(recs)
    if split is None:
        return "n/a"
    return " / ".join(f"{x.mean():.2f} ({len(x)})" if len(x) else "– (0)" for x in split)


def table4a_conventions(records: list, staleness: "Staleness") -> list:
    """Table 4a's mechanism, measured: per (obs, method), the score on the paper's scale beside ours, and the
    conventions the two agents' joints end their greedy episodes in (envs.reacher_agent_conventions): the share of
    episodes in which both follow the same one, and which."""
    cells = collections.defaultdict(list)
    for r in records:
        if not r.collapsed:  # counted apart in the table (‡)
            cells[(r.obs, r.method)].append(r)
    lines = ["#### Conventions and the paper's scale", "",
             "Per row and method, means over seeds: the score on our scale (reference returns: uniform random "
             "torques and our expert) and on the paper's (about a zero-torque arm, -11.145, and its expert, -4.237); "
             "the share of greedy episodes whose two agents end in the same arm-bend convention (the shoulder on the "
             "side the elbow's bend needs), and which one (counter-clockwise / clockwise); the paper's-scale score of "
             "the episodes (pooled over seeds) whose agents follow the same convention and of those whose agents "
             "differ: a team that agrees but scores low lacks skill, not agreement (near full reach the two poses "
             "coincide, so a differing pair can still score there). † = stale record.", "",
             "| obs | method | seeds | score (ours) | score (paper's scale) | same convention | both counter-clockwise "
             "/ both clockwise | paper's scale: agreeing / differing episodes (count) |", "|---|---|---|---|---|---|---|---|"]
    for obs, _ in LAYOUT["4a"]["rows"]:
        for m in list(LAYOUT["4a"]["methods"]) + sorted({m for (o, m) in cells if o == obs} - set(LAYOUT["4a"]["methods"])):
            recs = sorted(cells.get((obs, m), []), key=lambda r: r.summary.get("seed", 0))
            if not recs:
                continue
            stale = any(staleness.check(r)[0] for r in recs)
            ours = mean_sem([r.score for r in recs])
            paper_scores = [x for x in (paper_scale_score(r.summary) for r in recs) if x is not None]
            paper = mean_sem(paper_scores) if paper_scores else None  # records without their episodes: n/a
            conv = [r.summary["conventions"] for r in recs if r.summary.get("conventions")]
            same = (f"{100 * np.mean([c['same_share'] for c in conv]):.0f}% ({len(conv)} of {len(recs)} seeds)"
                    if conv else "not recorded")
            split = (f"{100 * np.mean([c['both_counter_clockwise_share'] for c in conv]):.0f}% / "
                     f"{100 * np.mean([c['both_clockwise_share'] for c in conv]):.0f}%" if conv else "")
            sem = lambda x: "–" if math.isnan(x) else f"{x:.2f}"  # noqa: E731
            lines.append(f"| {obs} | {METHOD_LABELS.get(m, m)} | {','.join(str(r.summary.get('seed')) for r in recs)}"
                         f"{' †' if stale else ''} | {ours[0]:.2f} ± {sem(ours[1])} | "
                         f"{'n/a' if paper is None else f'{paper[0]:.2f} ± {sem(paper[1])}'} | "
                         f"{same} | {split} | {fmt_convention_split(recs)} |")
    return lines + [""] if len(lines) > 6 else []


def load_cross_play(results_dir: pathlib.Path, table: str = "4a") -> list:
    """The cross-play reports of a table (envs.cross_play: results/<table>/crossplay/<record>.json), each with its
    run's own greedy returns (`self_play_returns`) and settings (`config`) from the cell record of the same name, where
    that record exists: a report is made from its record's run (cross_play_outdated), so a recheck that vouches for
    the record's code and settings (results/code_equivalence.json) vouches for the report's evaluation too."""
    reports = []
    for path in sorted((results_dir / table / "crossplay").glob("*.json")):
        report = json.loads(path.read_text())
        report["file"] = path.name
        record = results_dir / table / path.stem / "summary.json"
        if record.exists():
            record_summary = json.loads(record.read_text())
            report["self_play_returns"] = record_summary.get("episode_returns")
            report.setdefault("config", record_summary.get("config"))
        report["outdated"] = cross_play_outdated(report, results_dir / table, path.stem)
        reports.append(report)
    return reports


def cross_play_outdated(report: dict, table_dir: pathlib.Path, name: str) -> list:
    """Why a cross-play report was made from other runs than the cell records it sits beside (empty: it was not).
    A report copies its own run's and each partner run's final score (self_play, partner_self_play_score); a record
    rerun since (e.g. at another preset) has another score, and stitching the old runs' agents says nothing about the
    record's. Scores are compared exactly: a finished run's record is a copy of its summary."""
    def record_score(record_name):
        path = table_dir / record_name / "summary.json"
        return json.loads(path.read_text()).get("normalized_score_mean") if path.exists() else None

    reasons = []
    own = record_score(name)
    if own != report["self_play"]["normalized_score_mean"]:
        reasons.append(f"its run scored {report['self_play']['normalized_score_mean']:.4f}, the record "
                       + ("is missing" if own is None else f"{own:.4f}"))
    own_seed = report.get("seed")
    for partner in report["partners"]:
        seed = partner.get("partner_seed")
        theirs = record_score(re.sub(rf"__{own_seed}$", f"__{seed}", name)) if seed is not None else None
        if theirs != partner.get("partner_self_play_score"):
            reasons.append(f"partner seed {seed} scored {partner.get('partner_self_play_score', float('nan')):.4f}, "
                           f"its record " + ("is missing" if theirs is None else f"{theirs:.4f}"))
    return reasons


def table4a_cross_play(reports: list, staleness: "Staleness") -> list:
    """Self-play vs cross-play per (budget, obs, method): teams stitched from the agents of different seeds
    (`./run_all.sh crossplay`). Cross-play far below self-play = each seed found a convention of its own; equal =
    the seeds agree on one. Scores on our scale and the paper's; the share of episodes whose two agents end in the
    same convention, own teams vs stitched ones. Each ordered pair of seeds counts once."""
    cells = collections.defaultdict(list)
    outdated = [rep for rep in reports if rep.get("outdated")]
    for rep in reports:
        if not rep.get("outdated"):
            cells[(rep.get("budget"), rep["obs"], rep["method"])].append(rep)
    if not cells and not outdated:
        return []
    lines = ["#### Cross-play: teams stitched from different seeds", "",
             "Per budget, row and method: each seed's own team (self-play) against teams of its shoulder and another "
             "seed's elbow (cross-play; every ordered pair of seeds once), 100 greedy episodes each, on our scale and "
             "the paper's, and the share of episodes whose two agents end in the same convention. Made by "
             "`./run_all.sh crossplay` from finished runs (`results/4a/crossplay/`). † = made with other code; ≡ = made "
             "with older code that a recheck showed computes the same (the records' ≡).", "",
             "| budget | obs | method | seeds | pairs | self-play (ours) | cross-play (ours) | self-play (paper's "
             "scale) | cross-play (paper's scale) | same convention: self / cross |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda m: f"{m[0]:.2f} ± {'–' if math.isnan(m[1]) else f'{m[1]:.2f}'}"  # noqa: E731
    pct = lambda xs: f"{100 * np.mean(xs):.0f}%" if xs else "n/a"  # noqa: E731
    order = {obs: i for i, (obs, _) in enumerate(LAYOUT["4a"]["rows"])}
    for (budget, obs, method), reps in sorted(cells.items(), key=lambda kv: (str(kv[0][0]), order.get(kv[0][1], 9), kv[0][2])):
        reps = sorted(reps, key=lambda r: r.get("seed") or 0)
        stale = any(staleness.code_reason(r) for r in reps)
        vouched = any(staleness.vouched(r) is not None for r in reps)  # changed code, checked equivalent
        pairs = [p for r in reps for p in r["partners"]]
        self_ours = [r["self_play"]["normalized_score_mean"] for r in reps]
        cross_ours = [p["normalized_score_mean"] for p in pairs]
        self_paper = [paper_scale_score({"episode_returns": r.get("self_play_returns")}) for r in reps
                      if r.get("self_play_returns")]
        cross_paper = [float(paper_scale_reacher(p["episode_returns"]).mean()) for p in pairs]
        same_self = [r["self_play"]["conventions"]["same_share"] for r in reps if (r["self_play"].get("conventions") or {})]
        same_cross = [p["conventions"]["same_share"] for p in pairs if p.get("conventions")]
        lines.append(f"| {budget} | {obs} | {METHOD_LABELS.get(method, method)} | "
                     f"{','.join(str(r.get('seed')) for r in reps)}{' †' if stale else (' ≡' if vouched else '')} | "
                     f"{len(pairs)} | "
                     f"{fmt(mean_sem(self_ours))} | {fmt(mean_sem(cross_ours))} | "
                     f"{fmt(mean_sem(self_paper)) if self_paper else 'n/a'} | {fmt(mean_sem(cross_paper))} | "
                     f"{pct(same_self)} / {pct(same_cross)} |")
    if outdated:  # kept in results/ (git has them anyway) but out of the table: they describe runs that are gone
        lines += ["", "Left out, made from runs other than the records beside them (the records were rerun since; "
                  "`./run_all.sh crossplay` with the records' run folders makes them again):", ""]
        lines += [f"* `results/4a/crossplay/{rep['file']}`: {'; '.join(rep['outdated'])}" for rep in outdated]
    return lines + [""]


def diagnosis_table(records: list, staleness: Staleness) -> list:
    """One row per diagnosis run (`./run_all.sh diagnosis`): what it changed, its final score, how many greedy episodes
    reach the end (Ant episodes that fall end early), its learning curve in short, cost and command."""
    limit = envs.EPISODE_STEPS[records[0].env] if records else 1000
    lines = ["| run (settings changed from the preset) | obs, dataset | seed | score (mean ± std over episodes) | episodes reaching "
             f"{limit} steps | in-training evaluations (first → best → last) | training | wall time | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r.obs != "partial", r.dataset != "medium", r.dataset, r.method != "moma_ppo",
                                            r.method, r.summary.get("seed", 0))):
        s = r.summary
        lengths = np.asarray(s.get("episode_lengths") or [], dtype=np.float64)
        reach = f"{100 * np.mean(lengths >= envs.EPISODE_STEPS[r.env]):.0f}%" if len(lengths) else "n/a"
        scores = [row["normalized_score"] for row in r.curve if "normalized_score" in row]
        curve = f"{scores[0]:.2f} → {max(scores):.2f} → {scores[-1]:.2f}" if scores else "n/a"
        reasons, _ = staleness.check(r)
        mark = " †" if reasons else (" ≡" if staleness.vouched(s) is not None else "")
        name = r.method.replace("moma_ppo-", "").replace("moma_ppo", "(the preset)")
        base, _, variant = r.method.partition("-")
        if base != "moma_ppo":  # a baseline's run (e.g. icql-15k: a Table 4a record extended): name the method
            name = METHOD_LABELS.get(base, base) + (f", {variant}" if variant else "")
        iterations = (s.get("config") or {}).get("iterations")
        if iterations is not None and iterations != MOMA_PRESET_ITERATIONS.get(r.env, iterations) and "iterations=" not in name:
            # the run name leaves out --iterations (a budget, not a method); the table must not
            name = f"iterations={iterations}" if name == "(the preset)" else f"{name}, iterations={iterations}"
        name += mark
        score = f"{r.score:.3f} ± {s.get('normalized_score_std', float('nan')):.3f}"
        if r.env == "reacher" and s.get("episode_returns"):  # Table 4a's bar is on the paper's scale
            score += f" (paper's scale {paper_scale_score(s):.3f})"
        lines.append(f"| {name} | {r.obs}, {r.dataset} | {s.get('seed')} | {score} | "
                     f"{reach} | {curve} | {fmt_steps(r)} | {fmt_seconds(s.get('wall_time_s', float('nan')))} | "
                     f"`results/diagnosis/{r.folder.name}/command.txt` |")
    return lines + ["", "† stale: made with other code or another build of the dataset. ≡ made with older code that "
                        f"a short rerun at both commits showed computes the same (results/{EQUIVALENCE_FILE}).", ""]


def extended_runs(table: str, records: list, diagnosis: list) -> list:
    """Where a budget stopped a cell on a rising curve, a copy of one of its runs resumed to a longer training
    (`--resume --total-steps N` into results/diagnosis, method `<method>-<N>k`) says what the budget cut: one line
    per such pair, the cell's record beside the longer run of the same seed."""
    cells = {(r.env, r.obs, r.dataset, r.method, r.budget, r.summary.get("seed")): r for r in records if r.table == table}
    pairs = []
    for d in diagnosis:
        base, _, variant = d.method.partition("-")
        cell = cells.get((d.env, d.obs, d.dataset, base, d.budget, d.summary.get("seed")))
        if cell is not None and re.fullmatch(r"\d+k", variant or "") and \
                d.summary.get("train_steps", 0) > cell.summary.get("train_steps", 0):
            pairs.append((cell, d))
    if not pairs:
        return []

    def describe(r: "Record") -> str:
        paper = paper_scale_score(r.summary) if r.env == "reacher" else None
        text = f"{r.score:.3f}" if paper is None else f"{paper:.2f} [ours {r.score:.3f}]"
        conv = r.summary.get("conventions")
        if conv:
            split = convention_split([r])
            agreeing = f", agreeing episodes {split[0].mean():.2f}" if split is not None and len(split[0]) else ""
            text += f", {100 * conv['same_share']:.0f}% same convention{agreeing}"
        verdict = r.summary.get("critic_diverged")
        text += "" if "critic_diverged" not in r.summary else (
            f", critic diverged by step {verdict.get('step')}" if verdict else ", critic bounded")
        return f"{fmt_steps(r)}: {text}"

    lines = ["#### Longer runs of a cell's seed", "",
             "A copy of a cell's finished run resumed to a longer training (same seed and random streams; "
             "results/diagnosis): what the budget cut. Scores of 100 greedy episodes" +
             (", on the paper's scale first." if any(c.env == "reacher" for c, _ in pairs) else "."), ""]
    for cell, d in sorted(pairs, key=lambda p: (p[0].obs, p[0].method, p[0].summary.get("seed", 0))):
        lines.append(f"* {cell.obs} {cell.dataset} {METHOD_LABELS.get(cell.method, cell.method)}, seed "
                     f"{cell.summary.get('seed')}: {describe(cell)} → {describe(d)} "
                     f"(`results/diagnosis/{d.folder.name}/`)")
    return lines + [""]


def generate_markdown(results_dir: pathlib.Path = RESULTS_DIR, plots_dir: pathlib.Path = PLOTS_DIR,
                      repo: pathlib.Path = REPO) -> str:
    records = load_records(results_dir)
    staleness = Staleness(repo, equivalences=load_equivalences(results_dir))
    lines = ["# Results", "",
             "Generated by `./run_all.sh table` (`python results.py table`) from the records in `results/` only: "
             "do not edit by hand. Every cell links back to its records (`results/<table>/<env>__<obs>__<dataset>__"
             "<method>__<seed>/`: summary.json, curve.csv, command.txt). Budgets are never mixed: each budget has its "
             "own tables. Missing cells are shown as missing.", ""]
    stats = load_dataset_stats(results_dir)
    lines += dataset_tables(stats, staleness)
    lines += world_model_tables(load_world_model_reports(results_dir))
    by_table = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
        by_table[r.table][r.budget].append(r)
    for table in TABLES:
        if table == "diagnosis":
            for env in sorted({r.env for recs in by_table[table].values() for r in recs}, key=lambda e: e != "ant"):
                lines += [f"## {DIAGNOSIS_TITLES.get(env, f'Diagnosis: MOMA-PPO on {env}')}", ""]
                for budget, recs in by_table[table].items():
                    recs = [r for r in recs if r.env == env]
                    if not recs:
                        continue
                    lines += [f"### budget `{budget}`", ""] + diagnosis_table(recs, staleness)
                    images = [plot_path(table, budget, env, o, d, plots_dir) for o, d in DIAGNOSIS_ROWS.get(env, [])]
                    images.append(diagnosis_plot_path(budget, plots_dir, env))
                    lines += [" ".join(f"![{p.stem}](plots/{p.name})" for p in images if p.exists()), ""]
            continue
        lines += [f"## {TITLES[table]}", ""]
        if not by_table[table]:
            lines += [f"No records yet (`./run_all.sh {table}`): every cell is missing.", ""]
            continue
        for budget in sorted(by_table[table], key=lambda b: (BUDGETS.index(b) if b in BUDGETS else len(BUDGETS), b)):
            lines += results_table(table, budget, by_table[table][budget], staleness, plots_dir, stats)
        lines += extended_runs(table, records, [r for recs in by_table["diagnosis"].values() for r in recs])
        if table == "4a":
            lines += table4a_cross_play(load_cross_play(results_dir), staleness)
    legacy = results_dir / "legacy.md"
    if legacy.exists():
        lines += ["## Earlier measurements not reproducible from this repository (no record in results/)", "",
                  legacy.read_text().strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(path: pathlib.Path = DOCS_DIR / "results.md", **kwargs) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generate_markdown(**kwargs))
    return path


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------
def curve_stats(records: list, paper_scale: bool = False) -> tuple:
    """Mean ± s.e.m. over seeds at each evaluation step: (samples, mean, sem, n) arrays, steps seen by all seeds
    first; a step only some seeds reached is averaged over those. paper_scale: Reacher scores on the paper's scale
    (to_paper_scale_reacher; a record that cannot be converted is left out)."""
    by_step = collections.defaultdict(list)
    for r in records:
        scores = [row["normalized_score"] for row in r.curve]
        if paper_scale:
            scores = to_paper_scale_reacher(r, scores)
            if scores is None:
                continue
        for row, score in zip(r.curve, scores):
            by_step[int(row["step"])].append((row["samples"], float(score)))
    steps = sorted(by_step)
    x = np.array([np.mean([s for s, _ in by_step[k]]) for k in steps])
    stats = [mean_sem([v for _, v in by_step[k]]) for k in steps]
    mean = np.array([m for m, _ in stats])
    sem = np.nan_to_num(np.array([s for _, s in stats]))
    return x, mean, sem, np.array([len(by_step[k]) for k in steps])


def _draw_curves(ax, groups: dict, refs: dict, title: str, paper_scale: bool = False) -> None:
    import matplotlib.ticker
    labels = list(METHOD_LABELS.values())  # one colour per method in every figure
    for label, recs in groups.items():
        x, mean, sem, _ = curve_stats(recs, paper_scale)
        if len(x) == 0:
            continue
        color = f"C{labels.index(label) % 10}" if label in labels else None
        (line,) = ax.plot(x, mean, marker="o", markersize=3, label=f"{label} ({len(recs)})", color=color)
        ax.fill_between(x, mean - sem, mean + sem, color=line.get_color(), alpha=0.2)
    for (label, value), style in zip(refs.items(), ("--", ":")):
        if value is not None:
            ax.axhline(value, color="grey", linestyle=style, linewidth=1, label=label)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled decades only: minor labels overlapped
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("samples (gradient steps x batch; MOMA-PPO: synthetic steps)", fontsize=7)
    ax.set_ylabel("normalised score" + (" (the paper's scale)" if paper_scale else ""), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)


def make_plots(results_dir: pathlib.Path = RESULTS_DIR, plots_dir: pathlib.Path = PLOTS_DIR) -> list:
    """One PNG per (table, budget, task) and one per ablation budget; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in load_records(results_dir) if r.curve and not r.collapsed]  # ‡: no method's curve
    stats = load_dataset_stats(results_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
        key = (r.table, r.budget, r.env, r.obs if r.table != "ablation" else "", r.dataset)
        groups[key][r.method].append(r)
    ablation_panels = collections.defaultdict(dict)
    for (table, budget, env, obs, dataset), by_method in sorted(groups.items()):
        s = stats.get((env, dataset), {})
        refs = {"dataset mean": s["mean_score_pct"] / 100 if s.get("mean_score_pct") is not None else None,
                "standing still": s.get("standing_still_score")}
        if table == "ablation":
            ablation_panels[budget][(env, dataset)] = (by_method, refs)
            continue
        if table == "diagnosis":
            path = diagnosis_figure([r for recs in by_method.values() for r in recs] +
                                   [r for r in records if r.table == "diagnosis" and r.budget == budget and r.env == env
                                    and (r.obs, r.dataset) != (obs, dataset)], budget, refs, plots_dir, env)
            if path is not None and path not in written:
                written.append(path)
        order = [m for m in LAYOUT[table]["methods"] if m in by_method] + sorted(set(by_method) - set(LAYOUT[table]["methods"]))
        # Table 4a on the paper's scale, as its table (a failing arm reads ~0.8 on ours); the reference lines with it
        paper_scale = env == "reacher" and table == "4a"
        if paper_scale:
            anyone = next((r for recs in by_method.values() for r in recs if to_paper_scale_reacher(r, [0.0]) is not None), None)
            refs = {k: (None if v is None or anyone is None else float(to_paper_scale_reacher(anyone, [v])[0]))
                    for k, v in refs.items()}
        fig, ax = plt.subplots(figsize=(5, 3.4))
        _draw_curves(ax, {METHOD_LABELS.get(m, m): by_method[m] for m in order}, refs,
                     f"{env} {obs} {dataset} (budget {budget}; mean ± s.e.m., n seeds)", paper_scale)
        fig.tight_layout()
        path = plot_path(table, budget, env, obs, dataset, plots_dir)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    for budget, panels in ablation_panels.items():
        # The ablation figure: FO and PO side by side, one line per penalty / rollout variant.
        by_obs = collections.defaultdict(dict)
        refs = {}
        for (env, dataset), (by_method, r) in panels.items():
            refs = r
            for m, recs in by_method.items():
                for rec in recs:
                    by_obs[rec.obs].setdefault(m, []).append(rec)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), squeeze=False)
        for ax, obs in zip(axes[0], ("full", "partial")):
            by_method = by_obs.get(obs, {})
            order = [m for m in ABLATION_METHODS if m in by_method] + sorted(set(by_method) - set(ABLATION_METHODS))
            _draw_curves(ax, {METHOD_LABELS.get(m, m): by_method[m] for m in order}, refs,
                         f"ant {obs} full-replay (budget {budget})")
        fig.tight_layout()
        path = ablation_plot_path(budget, plots_dir)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------
# run_all.sh's plan
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cell:
    """One line of run_all.sh's plan file: `table script env obs dataset seed method [flags...]`."""
    table: str
    script: str
    env: str
    obs: str
    dataset: str
    seed: int
    method: str
    flags: list

    @property
    def name(self) -> str:
        return envs.record_name(self.env, self.obs, self.dataset, self.method, self.seed)

    @property
    def seconds(self) -> float:
        """Estimated CPU seconds of the whole cell (a resumed cell counted whole: an upper bound)."""
        return SECONDS_PER_RUN[self.env] + default_steps(self.script, self.env, self.obs, self.flags) * \
            seconds_per_step(self.env, self.obs, self.method)

    @property
    def memory_mb(self) -> int:
        return MEMORY_MB[(self.env, "PO" if self.obs in PARTIAL_OBS else "FO")]


def read_cells(cells_file: str) -> list:
    cells = []
    for line in pathlib.Path(cells_file).read_text().splitlines():
        if line.strip():
            table, script, env, obs, dataset, seed, method, *flags = shlex.split(line)
            cells.append(Cell(table, script, env, obs, dataset, int(seed), method, flags))
    return cells


def cell_state(cell: Cell, budget: str, results_dir: pathlib.Path, runs_dir: Optional[str]) -> str:
    """done (its record is in results/ at this budget), replace (a record of another budget), copy (finished run
    not recorded), resume (stopped run with a checkpoint) or run."""
    record = results_dir / cell.table / cell.name / "summary.json"
    if record.exists():
        return "done" if json.loads(record.read_text()).get("budget") == budget else "replace"
    if runs_dir and (pathlib.Path(runs_dir) / cell.name / "summary.json").exists():
        return "copy"
    if runs_dir and (pathlib.Path(runs_dir) / cell.name / "checkpoint.pt").exists():
        return "resume"
    return "run"


def plan(cells_file: str, budget: str, results_dir: pathlib.Path = RESULTS_DIR, runs_dir: Optional[str] = None,
         stale_list: Optional[str] = None) -> str:
    """`cells_file`: one cell a line, `table script env obs dataset seed method [flags...]` (run_all.sh writes it).
    `stale_list`: a file to write the done-but-stale cells to, one `table/name` a line (REFRESH_STALE=1 reruns them)."""
    staleness, stale = Staleness(equivalences=load_equivalences(results_dir)), []
    todo = collections.Counter()
    seconds = collections.Counter()
    left_by_method = collections.Counter()
    for cell in read_cells(cells_file):
        state = cell_state(cell, budget, results_dir, runs_dir)
        if state == "done":
            record = results_dir / cell.table / cell.name
            reasons, _ = staleness.check(Record(cell.table, record, json.loads((record / "summary.json").read_text()),
                                                [], ""))
            if reasons:
                stale.append(f"{cell.table}/{cell.name}")
        todo[state] += 1
        todo["cells"] += 1
        seconds["all"] += cell.seconds
        if state != "done" and state != "copy":
            seconds["left"] += cell.seconds  # a resumed cell is counted whole: an upper bound
            left_by_method[f"{cell.env} {'PO' if cell.obs in PARTIAL_OBS else 'FO'} {cell.method}"] += cell.seconds
    out = (f"plan (budget {budget}): {todo['cells']} cells, {todo['done']} done already at this budget, "
           f"{todo['run']} to run, {todo['resume']} to resume, {todo['copy']} finished runs to record")
    if stale:
        out += (f"; {len(stale)} of the done cells are stale (code or dataset changed since): kept, "
                f"REFRESH_STALE=1 reruns them")
    if stale_list:
        pathlib.Path(stale_list).write_text("".join(f"{c}\n" for c in stale))
    if todo["replace"]:
        out += f", {todo['replace']} to rerun whose record in results/ has another budget (it will be replaced)"
    out += (f"\nestimated CPU time: {seconds['left'] / 3600:.1f} h left of {seconds['all'] / 3600:.1f} h for all cells "
            f"(one cell at a time; speeds measured on the project's shared 2-core CPU, results.py SECONDS_PER_STEP)")
    if left_by_method:
        out += "\n  left: " + ", ".join(f"{k} {v / 3600:.1f} h" for k, v in sorted(left_by_method.items(), key=lambda kv: -kv[1]))
    return out


def rename_record(table_dir, old: str, new: str, why: str) -> pathlib.Path:
    """Give a record the method name a preset change gave its setting (e.g. moma_ppo-minibatch_size=1024 -> moma_ppo
    when 1,024 became the preset): the run is unchanged, only its cell. Only the method part of the name may change;
    summary.json keeps the old name and the reason in `renamed_from`."""
    table_dir = pathlib.Path(table_dir)
    src, dst = table_dir / old, table_dir / new
    old_parts, new_parts = old.split("__"), new.split("__")
    if len(old_parts) != 5 or len(new_parts) != 5 or old_parts[:3] + old_parts[4:] != new_parts[:3] + new_parts[4:]:
        raise envs.MomaError(f"{old} -> {new}: a record name is env__obs__dataset__method__seed and only its method "
                             f"may change")
    if not (src / "summary.json").exists():
        raise envs.MomaError(f"{src} is not a record (no summary.json)")
    if dst.exists():
        raise envs.MomaError(f"{dst} exists already: rename it first (e.g. to its own setting's name)")
    summary_path = src / "summary.json"
    summary = json.loads(summary_path.read_text())
    earlier = summary.get("renamed_from")
    summary["method"] = new_parts[3]
    summary["renamed_from"] = f"{old} ({why})" + (f"; before that {earlier}" if earlier else "")
    tmp = summary_path.with_name("summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, summary_path)
    src.rename(dst)
    return dst


# --------------------------------------------------------------------------------------------------
# recheck: is a record made with older code still what today's code computes?
# --------------------------------------------------------------------------------------------------
# A short version of the record's own command: a few iterations or gradient steps and a few greedy episodes; the
# check compares their returns and the final checkpoints' tensors bit for bit.
RECHECK_BUDGET = {"moma_ppo.py": ["--iterations", "2", "--eval-every", "1", "--eval-episodes-during", "2",
                                  "--eval-episodes", "3"]}
RECHECK_BUDGET_DEFAULT = ["--total-steps", "300", "--eval-every", "100", "--eval-episodes", "3"]
_RECHECK_DROP = {"--run-dir", "--results-dir", "--torch-threads", "--budget"}  # flags with a value, set by recheck


def _git(*args: str) -> str:
    import subprocess
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    except FileNotFoundError:
        raise envs.MomaError("recheck needs git (it runs the records' commits in git worktrees)") from None
    if done.returncode != 0:
        raise envs.MomaError(f"git {' '.join(args)} failed: {done.stderr.strip()} (recheck needs a git clone of the "
                             f"repository with its history)")
    return done.stdout


def commit_with_code(code: dict, hashes: dict) -> Optional[str]:
    """The newest commit whose files hash (envs.file_hash) as `code` does; None if no commit did (the run was made
    from uncommitted code). `hashes` caches (commit, file) -> hash between calls."""
    import subprocess
    import tempfile
    for sha in _git("log", "--format=%H").split():
        for name, want in code.items():
            if (sha, name) not in hashes:
                blob = subprocess.run(["git", "show", f"{sha}:{name}"], cwd=REPO, capture_output=True)
                if blob.returncode:
                    hashes[(sha, name)] = None
                else:
                    with tempfile.TemporaryDirectory() as d:
                        path = pathlib.Path(d) / name
                        path.write_bytes(blob.stdout)
                        hashes[(sha, name)] = envs.file_hash(path)
            if hashes[(sha, name)] != want:
                break
        else:
            return sha
    return None


def recheck_argv(record: Record) -> list:
    """The record's command (first line of command.txt) without python, the output folders and threads, shortened."""
    words = shlex.split(record.command.splitlines()[0]) if record.command else []
    if len(words) < 2 or not words[1].endswith(".py"):
        raise envs.MomaError(f"{record.folder}/command.txt does not hold a `python <script>.py ...` command")
    argv, i = [words[1]], 2
    while i < len(words):
        if words[i] in _RECHECK_DROP:
            i += 2
        elif words[i] == "--resume":
            i += 1
        else:
            argv.append(words[i])
            i += 1
    return argv + RECHECK_BUDGET.get(pathlib.Path(words[1]).name, RECHECK_BUDGET_DEFAULT)


# Settings a MOMA-PPO record may predate: made before the flag existed, it ran with the flag's off value.
SETTINGS_ABSENT_MEANS = {"moma_ppo.py": {"continue_rollouts": 0.0, "terminal_height_margin": 0.0}}


def settings_flags(argv: list, summary: dict) -> list:
    """Flags that give today's run of a record's command the record's algorithmic settings where a preset changed
    since (e.g. Ant's terminal-height margin: a record made without it names terminal_height_margin=0, but its
    command.txt has no such flag). MOMA-PPO only, whose settings are its ALGORITHMIC_SETTINGS; numbers and names only
    (a differing switch or None stays different, and the recheck then finds the runs differ)."""
    script = pathlib.Path(argv[0]).name
    if script != "moma_ppo.py":
        return []
    import tyro
    import moma_ppo
    try:
        today = moma_ppo.resolve(tyro.cli(moma_ppo.Args, args=argv[1:]))
    except (SystemExit, envs.MomaError):  # a flag today's script no longer takes: its rerun will say so
        return []
    config = {**SETTINGS_ABSENT_MEANS[script], **(summary.get("config") or {})}
    flags = []
    for key in moma_ppo.ALGORITHMIC_SETTINGS:
        want = config.get(key)
        if key not in config or want == getattr(today, key) or want is None or isinstance(want, bool):
            continue
        flags += ["--" + key.replace("_", "-"), f"{want:g}" if isinstance(want, float) else str(want)]
    return flags


class _PrintingList(list):
    """A list of report lines that prints each as it is added (a recheck takes minutes per group)."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)


def _compare_checkpoints(old_path: pathlib.Path, new_path: pathlib.Path) -> tuple:
    """(how many tensors both checkpoints hold under the same key and shape, the keys of those that differ): the
    parameters, optimiser moments and random generator states after the short run; bit for bit."""
    import torch

    def tensors(obj, key=""):
        if isinstance(obj, torch.Tensor):
            yield key, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(v, f"{key}/{i}")

    if not (old_path.exists() and new_path.exists()):
        return 0, []
    old = dict(tensors(torch.load(old_path, map_location="cpu", weights_only=False)))
    new = dict(tensors(torch.load(new_path, map_location="cpu", weights_only=False)))
    shared = [k for k in old if k in new and old[k].shape == new[k].shape and old[k].dtype == new[k].dtype]
    return len(shared), [k for k in shared if not torch.equal(old[k], new[k])]


def _world_model_ready(record: Record) -> bool:
    """True unless the record is MOMA-PPO's in a learned model that is not cached here."""
    config = record.summary.get("config") or {}
    if "moma_ppo" not in record.method or config.get("ground_truth"):
        return True
    import world_model
    return world_model.artifact_path(record.env, record.dataset, int(config.get("world_model_seed", 0))).exists()


def _recheck_run(cwd: pathlib.Path, argv: list, out: pathlib.Path, env: dict, timeout: float) -> tuple:
    """Run argv with python in cwd; (summary.json of the record it wrote, None) or (None, why not)."""
    import subprocess
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *argv, "--run-dir", str(out / "run"), "--results-dir", str(out / "results"),
               "--torch-threads", "1"]
    with open(out / "log.txt", "w") as log:
        try:
            rc = subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return None, f"no result within {timeout:.0f} s ({out / 'log.txt'})"
    found = sorted((out / "results").glob("*/summary.json"))
    if rc != 0 or len(found) != 1:
        return None, f"exit status {rc}, {len(found)} records ({out / 'log.txt'})"
    return json.loads(found[0].read_text()), None


def recheck(only: str = "", dry_run: bool = False, timeout: float = 1800.0, results_dir: pathlib.Path = RESULTS_DIR,
            work_dir: pathlib.Path = REPO / "data" / "recheck", again: bool = False) -> list:
    """For each group of records whose code changed since they were made (same code, env, observability and
    settings), run the shortened command of one of them at the newest commit that had its code (a git worktree) and
    with today's code, both on one thread; if the greedy episodes and every tensor the two final checkpoints share
    (parameters, optimiser moments, generator states) are bit-identical, add an entry to
    results/code_equivalence.json, which clears the group's records of the stale mark (shown with ≡ instead). A group
    found to differ goes to results/code_differences.json and is not rerun by a later recheck while neither its code
    nor today's has changed (again=True reruns it). The old code runs on hard-linked copies of the datasets and a copy of the cached world models, so whatever it
    writes cannot replace today's caches. Returns one line per group."""
    import datetime
    import shutil
    import subprocess
    if not dry_run:  # one recheck at a time: each starts by clearing the work folder the other runs in
        import fcntl
        work_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = open(work_dir.parent / "recheck.lock", "w")  # held until recheck returns
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise envs.MomaError(f"another `results.py recheck` is running (it holds {lock.name}); wait for it") from None
    staleness = Staleness(REPO, equivalences=load_equivalences(results_dir))
    groups = collections.defaultdict(list)
    for r in load_records(results_dir):
        code = r.summary.get("code_fingerprint") or {}
        if only and only not in f"{r.table}/{r.folder.name}":
            continue
        if code and staleness.current_code(code) != code and staleness.equivalence(r.summary) is None:
            groups[(json.dumps(code, sort_keys=True), r.env, r.obs, config_key(r.summary))].append(r)
    lines, hashes = _PrintingList(), {}
    differences = load_equivalences(results_dir, DIFFERENCES_FILE)
    for group_key in sorted(groups, key=lambda k: k[:3]):
        code_json, env, obs, key = group_key
        code = json.loads(code_json)
        known = None if again else _matching_check(differences, code, staleness.current_code(code), env, obs, key)
        if known is not None:
            recs = groups.pop(group_key)
            lines.append(f"{', '.join(f'{r.table}/{r.folder.name}' for r in recs)}: DIFFERENT when checked on "
                         f"{known.get('checked')} at {str(known.get('from_commit'))[:8]} against today's code: stays "
                         "stale, not rerun (`--again` reruns it)")
    if not groups:
        lines.append("nothing to recheck: every record's code is today's or checked equivalent")
        return lines
    head = _git("rev-parse", "HEAD").strip()
    if not dry_run:
        if work_dir.exists():
            shutil.rmtree(work_dir)
        (work_dir / "cache").mkdir(parents=True)
        # Hard links: the old code reads the same bytes, and a file it rewrites (write + rename) replaces only its link.
        subprocess.run(["cp", "-al", str(envs.DATA_DIR), str(work_dir / "minari")], check=True)
        if (envs.CACHE_DIR / "datasets").exists():
            subprocess.run(["cp", "-al", str(envs.CACHE_DIR / "datasets"), str(work_dir / "cache" / "datasets")], check=True)
        for name in ("world_models", "reference_scores.json"):
            if (envs.CACHE_DIR / name).exists():
                subprocess.run(["cp", "-a", str(envs.CACHE_DIR / name), str(work_dir / "cache" / name)], check=True)
    for n, ((code_json, env, obs, key), recs) in enumerate(sorted(groups.items(), key=lambda kv: kv[0][:3])):
        code = json.loads(code_json)
        names = ", ".join(f"{r.table}/{r.folder.name}" for r in recs)
        candidates = [r for r in recs if _world_model_ready(r)]  # a MOMA-PPO rerun would otherwise train one
        if not candidates:
            lines.append(f"{names}: not checked: no world model of their datasets is cached (train one first: "
                         f"python world_model.py --env {env} --dataset {recs[0].dataset})")
            continue
        rep = min(candidates, key=lambda r: r.summary.get("seed", 0))
        argv = recheck_argv(rep)
        extra = settings_flags(argv, rep.summary)  # the record's settings where a preset moved since, for today's run
        sha = commit_with_code(code, hashes)
        if sha is None:
            lines.append(f"{names}: no commit has their code (made from uncommitted changes), cannot recheck")
            continue
        if dry_run:
            lines.append(f"{names}: would run `python {shlex.join(argv)}` at {sha[:8]} and today"
                         + (f" (today with {shlex.join(extra)}: the record's settings)" if extra else ""))
            continue
        tree = work_dir / "worktrees" / sha[:12]
        if not tree.exists():
            _git("worktree", "add", "--detach", str(tree), sha)
        old_env = dict(os.environ, MINARI_DATASETS_PATH=str(work_dir / "minari"), MOMA_CACHE_DIR=str(work_dir / "cache"))
        old, why_old = _recheck_run(tree, argv, work_dir / f"group{n}" / "old", old_env, timeout)
        new, why_new = (None, "skipped") if old is None else _recheck_run(REPO, argv + extra, work_dir / f"group{n}" / "new",
                                                                            dict(os.environ), timeout)
        if old is None or new is None:
            lines.append(f"{names}: not checked: at {sha[:8]}: {why_old}" + (f"; today: {why_new}" if old else ""))
            continue
        if config_key(old) != key:
            lines.append(f"{names}: not checked: the rerun at {sha[:8]} did not have the record's settings")
            continue
        same = (old.get("episode_returns") == new.get("episode_returns")
                and old.get("episode_lengths") == new.get("episode_lengths"))
        check = dict(script=argv[0], env=env, obs=obs, config_key=key, **{"from": code},
                          to=staleness.current_code(code), from_commit=sha,
                          to_commit=head + (" + uncommitted changes" if _git("status", "--porcelain", "--", *code) else ""),
                          command=f"python {shlex.join(argv + extra)} --torch-threads 1",
                          checked=datetime.date.today().isoformat(), records=[f"{r.table}/{r.folder.name}" for r in recs])
        if not same:
            _append_entry(results_dir / DIFFERENCES_FILE, dict(check, found="greedy episodes differ"))
            lines.append(f"{names}: DIFFERENT at {sha[:8]} and today (returns {old.get('episode_returns')} vs "
                         f"{new.get('episode_returns')}): stays stale")
            continue
        compared, differing = _compare_checkpoints(work_dir / f"group{n}" / "old" / "run" / "checkpoint.pt",
                                                   work_dir / f"group{n}" / "new" / "run" / "checkpoint.pt")
        if differing or not compared:
            _append_entry(results_dir / DIFFERENCES_FILE,
                          dict(check, found=f"checkpoint tensors differ: {', '.join(differing[:3])}" if differing
                               else "no checkpoint tensors to compare"))
            lines.append(f"{names}: same greedy episodes but " + (f"{len(differing)} of {compared} checkpoint tensors "
                         f"differ ({', '.join(differing[:3])})" if differing else "no checkpoint tensors to compare")
                         + ": stays stale")
            continue
        _append_entry(results_dir / EQUIVALENCE_FILE, dict(check, episode_returns=new.get("episode_returns"),
                                                           episode_lengths=new.get("episode_lengths"),
                                                           checkpoint_tensors_equal=compared))
        lines.append(f"{names}: same at {sha[:8]} and today ({len(new.get('episode_returns') or [])} episodes, "
                     f"{compared} checkpoint tensors): checked equivalent")
    if not dry_run:
        for tree in (work_dir / "worktrees").glob("*") if (work_dir / "worktrees").exists() else []:
            _git("worktree", "remove", "--force", str(tree))
        _git("worktree", "prune")
    return lines


def main(argv: list) -> None:
    usage = ("usage: python results.py table | plots | datasets | world-models | "
             "plan CELLS_FILE --budget NAME [--results-dir DIR] [--runs-dir DIR] [--stale-list FILE] | "
             "rename TABLE OLD NEW WHY | recheck [--only TEXT] [--dry-run] [--again] [--timeout SECONDS]")
    if not argv:
        raise SystemExit(usage)
    if "-h" in argv or "--help" in argv:  # every subcommand reads its options by hand: without this, `recheck --help` ran the recheck
        print(usage)
        return
    what = argv[0]
    if what == "table":
        print(f"wrote {write_markdown().relative_to(REPO)}")
    elif what == "plots":
        paths = make_plots()
        print(f"wrote {len(paths)} plots in {PLOTS_DIR.relative_to(REPO)}/")
        print(f"wrote {write_markdown().relative_to(REPO)}")
    elif what == "datasets":
        write_dataset_stats()
    elif what == "world-models":
        write_world_model_reports()
    elif what == "plan" and len(argv) >= 4 and argv[2] == "--budget":
        option = {name: argv[argv.index(name) + 1] if name in argv else None
                  for name in ("--results-dir", "--runs-dir", "--stale-list")}
        print(plan(argv[1], argv[3], pathlib.Path(option["--results-dir"] or RESULTS_DIR), runs_dir=option["--runs-dir"],
                   stale_list=option["--stale-list"]))
    elif what == "recheck":
        only = argv[argv.index("--only") + 1] if "--only" in argv else ""
        timeout = float(argv[argv.index("--timeout") + 1]) if "--timeout" in argv else 1800.0
        recheck(only=only, dry_run="--dry-run" in argv, timeout=timeout, again="--again" in argv)  # prints a line per group as it goes
    elif what == "rename" and len(argv) == 5:
        table, old, new, why = argv[1:]
        print(f"{old} -> {rename_record(RESULTS_DIR / table, old, new, why).name}")
    else:
        raise SystemExit(usage)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except envs.MomaError as e:
        raise SystemExit(f"error: {e}")
