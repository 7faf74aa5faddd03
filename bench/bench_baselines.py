"""Gradient steps/s of the model-free baselines' own update functions on real Ant batches, old vs new (A/B).

    python bench/bench_baselines.py                                  # all five scripts, PO and FO Ant
    python bench/bench_baselines.py --scripts icql omar --obs partial --threads 2
    python bench/bench_baselines.py --bf16 --threads 2                # fp32 vs --bf16 (bfloat16 autocast), A/B

For each script (itd3bc, icql, omar, ibc, maiql) and each Ant observation function (partial: 4 agents with
10-step history encoders; full: no histories), builds the script's learner with its defaults (make_learner)
and times its update() on minibatches drawn by its own ReplayData from the real dataset (ant/medium by
default), at batch 256. The same is done for the script as it was at `--baseline` (a git revision; the
file is written to a temporary folder with `git show`, and imported from there), and the two are timed in
alternating rounds (A B A B ... after one warm-up round each), so that a busy machine slows both alike: the
ratio new / old is the number to read, the absolute steps/s depend on the machine's load (printed).

One "step" is one critic (or BC) gradient step, i.e. one call of update(); the TD3 family also runs its
actor and target updates every policy_freq = 2 steps, so rounds run an even number of steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch
import tyro

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import envs  # noqa: E402
from speed_table import gemm_rate, machine, save  # noqa: E402  (bench/, beside this file)

SCRIPTS = ("itd3bc", "icql", "omar", "ibc", "maiql")
# The commit that gave every script a module-level make_learner/update with the computations of before the
# speed-up work (commits f01d479, cb8d7ba: fused Adam, foreach target updates): the "old" side of the A/B.
BASELINE = "253f79c"


@dataclasses.dataclass
class BenchArgs:
    scripts: tuple[str, ...] = SCRIPTS
    """scripts to time (itd3bc icql omar ibc maiql)"""
    obs: tuple[str, ...] = ("partial", "full")
    """Ant observation functions: partial (history encoders) and/or full"""
    dataset: str = "medium"
    threads: int = 2
    """torch CPU threads"""
    batch_size: int = 256
    rounds: int = 3
    """timed rounds per version (after one warm-up round each)"""
    round_s: float = 1.5
    """minimum seconds of one round (at least 2 steps)"""
    baseline: Optional[str] = BASELINE
    """git revision of the old scripts (None: time the current scripts only)"""
    bf16: bool = False
    """instead of old vs new: the current scripts in fp32 vs under --bf16's bfloat16 autocast (A/B, same rounds)"""
    save: Optional[str] = None
    """also write the figures as JSON to this file (bench/speed_table.py puts them in the README's speed table)"""
    heap: bool = True
    """keep large allocations in glibc's heap, as icql.py and omar.py do at start (envs.keep_large_allocations_in_the_heap;
    the other baselines' tensors are too small to be affected); --no-heap: glibc's default, to measure what it buys.
    Process-wide, so it cannot be A/B'd within one run: compare two runs"""


def load_module(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def old_module(script: str, rev: str, folder: pathlib.Path):
    text = subprocess.check_output(["git", "show", f"{rev}:{script}.py"], cwd=REPO)
    path = folder / f"old_{script}.py"
    path.write_bytes(text)
    return load_module(f"old_{script}", path)


def make_stepper(mod, script: str, data, obs: str, batch_size: int, seed: int = 0):
    """-> a function running one update() of `mod` (the script) on a fresh minibatch."""
    torch.manual_seed(seed)
    device = torch.device("cpu")
    history_len = envs.HISTORY_LEN if ("ant", obs) in envs.PARTIALLY_OBSERVABLE else 0
    n = data.n_agents
    obs_dim, hist_dim = max(envs.obs_dims("ant", obs)), max(envs.history_dims("ant", obs))
    action_dim = envs.action_dims("ant")[0]
    args = mod.Args(env="ant", obs=obs, batch_size=batch_size, history_len=history_len)
    gen = torch.Generator().manual_seed(seed)
    if script in ("itd3bc", "icql", "omar"):
        buffer = mod.ReplayData(data, obs_dim, hist_dim, history_len, device)
        extra = (data.states.shape[1],) if script == "itd3bc" else ()
        learner = mod.make_learner(args, n, obs_dim, action_dim, history_len, hist_dim, *extra, device)
        count = [0]

        def step():
            count[0] += 1
            mod.update(learner, buffer.sample(batch_size, gen), count[0], args, gen)
    elif script == "ibc":
        buffer = mod.ReplayData(data, obs_dim, hist_dim, history_len, False, device)
        learner = mod.make_learner(args, n, obs_dim, action_dim, False, history_len, hist_dim, device)

        def step():
            mod.update(learner, buffer.sample(batch_size, gen))
    elif script == "maiql":
        buffer = mod.ReplayData(data, 0, obs_dim, hist_dim, history_len, 1.0, False, device)
        learner = mod.make_learner(args, n, obs_dim, action_dim, False, data.states.shape[1],
                                   buffer.joint_features.shape[1], history_len, hist_dim, device)

        def step():
            mod.update(learner, buffer.sample(batch_size, gen), args)
    else:
        raise SystemExit(f"unknown script {script}")
    return step


def flops_per_step(step) -> float:
    """FLOPs of one update (forward and backward; torch's FlopCounterMode, which counts the matrix products),
    averaged over a critic-only and a critic + actor step of the TD3 family."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
        step()
    return counter.get_total_flops() / 2


def timed_round(step, min_s: float) -> tuple[int, float, float]:
    """Runs steps in pairs until min_s has passed -> (steps, wall s, process CPU s)."""
    steps, w0, c0 = 0, time.perf_counter(), time.process_time()
    while steps < 2 or time.perf_counter() - w0 < min_s:
        step()
        step()
        steps += 2
    return steps, time.perf_counter() - w0, time.process_time() - c0


def main(b: BenchArgs) -> None:
    torch.set_num_threads(b.threads)
    heap = b.heap and envs.keep_large_allocations_in_the_heap()
    print(f"bench_baselines {datetime.datetime.now().isoformat(timespec='seconds')} | {machine()}")
    print(f"torch {torch.__version__}, {b.threads} threads, batch {b.batch_size}, ant/{b.dataset}, "
          f"{b.rounds} rounds >= {b.round_s} s per version, alternating; "
          + ("fp32 vs bf16 autocast" if b.bf16 else f"baseline {b.baseline}")
          + f"; large allocations {'in the heap' if heap else 'mmapped (glibc default)'}")
    tmp = tempfile.TemporaryDirectory(prefix="bench_baselines_")
    saved_rows = []
    new = {s: load_module(f"new_{s}", REPO / f"{s}.py") for s in b.scripts}
    old = {s: old_module(s, b.baseline, pathlib.Path(tmp.name)) for s in b.scripts} if b.baseline and not b.bf16 else {}
    for obs in b.obs:
        data = envs.load_dataset("ant", b.dataset, obs, history_len=envs.HISTORY_LEN)
        for script in b.scripts:
            versions = {"new": make_stepper(new[script], script, data, obs, b.batch_size)}
            if b.bf16:  # the same script, its update under the autocast that --bf16 puts around it
                fp32_step, bf16_step = versions["new"], make_stepper(new[script], script, data, obs, b.batch_size)

                def autocast_step(step=bf16_step):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        step()
                versions = {"fp32": fp32_step, "bf16": autocast_step}
            if script in old:
                versions = {"old": make_stepper(old[script], script, data, obs, b.batch_size), **versions}
            for step in versions.values():  # warm-up (allocator, first-call costs)
                timed_round(step, 0.0)
            results = {k: [] for k in versions}
            for r in range(b.rounds):
                order = list(versions) if r % 2 == 0 else list(versions)[::-1]
                for k in order:
                    results[k].append(timed_round(versions[k], b.round_s))
            # The roofline: this machine's GEMM rate, now, on the shape that dominates these updates (4 agents'
            # two critics, or actor and critic, over a batch of 256 x 10 history steps, 256 wide)
            gflop = {k: flops_per_step(step) / 1e9 for k, step in versions.items()}  # old and new may differ
            rates = {k: gemm_rate(8, 2560, 256, dtype=torch.bfloat16 if k == "bf16" else torch.float32) for k in versions}
            line = f"{script:7s} ant/{obs:7s}"
            sps = {}
            for k, rounds in results.items():
                sps[k] = statistics.median(s / w for s, w, _ in rounds)
                cpu_ms = statistics.median(1000 * c / s for s, _, c in rounds)
                line += (f" | {k} {sps[k]:7.2f} steps/s ({cpu_ms:5.0f} CPU-ms, {gflop[k]:5.2f} GFLOP per step: "
                         f"{sps[k] * gflop[k] / rates[k]:4.0%} of the GEMM rate {rates[k]:.0f} GFLOP/s, "
                         f"ceiling {rates[k] / gflop[k]:.1f} steps/s)")
            if "old" in sps:
                line += f" | new/old {sps['new'] / sps['old']:.2f}x"
            if "bf16" in sps:
                line += f" | bf16/fp32 {sps['bf16'] / sps['fp32']:.2f}x"
            print(line, flush=True)
            saved_rows.append(dict(script=script, obs=obs, steps_per_s=sps, gflop_per_step=gflop, gemm_gflop_per_s=rates,
                                   heap=heap))
    tmp.cleanup()
    if b.save:
        save(b.save, "bench_baselines", b.threads, saved_rows, torch.__version__)


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
