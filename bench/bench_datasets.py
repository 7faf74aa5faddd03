"""Dataset-build speed: Ant collection through gymnasium's step vs make_datasets.LeanAntStep (bit-identical).

    python bench/bench_datasets.py                  # 20,000 transitions per side, the shipped medium policy
    python bench/bench_datasets.py --policy random --transitions 50000

Both sides run make_datasets.collect_episodes (50 envs in lockstep, one batched policy call per step) with the
same seed; the episodes must come out identical (checked), so the speed-up is free. Reported: transitions per
second of wall time and of this process's CPU time, and the ratio. A fresh clone's `python make_datasets.py`
builds 4M Ant transitions (random, medium, full-replay, expert) plus the reference episodes.
"""

import dataclasses
import pathlib
import sys
import time
from typing import Literal

import numpy as np
import torch
import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import make_datasets as md  # noqa: E402


@dataclasses.dataclass
class BenchArgs:
    policy: Literal["medium", "random"] = "medium"
    transitions: int = 20_000
    threads: int = 1
    """torch threads of the policy (the builds run one dataset per core)"""


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(args: BenchArgs) -> None:
    torch.set_num_threads(args.threads)

    def make_policy():
        return md.UniformRandomPolicy(8, seed=0) if args.policy == "random" else md.load_policy(md.SHIPPED["ant_medium"])

    gym_eps, gym_wall, gym_cpu = timed(lambda: md.collect_episodes("ant", make_policy(), args.transitions, seed=1,
                                                                   lean_ant=False, desc="gymnasium step"))
    lean_eps, lean_wall, lean_cpu = timed(lambda: md.collect_episodes("ant", make_policy(), args.transitions, seed=1,
                                                                      desc="LeanAntStep"))
    same = len(gym_eps) == len(lean_eps) and all(
        np.array_equal(a[k], b[k]) for a, b in zip(gym_eps, lean_eps) for k in a)
    n = args.transitions
    print(f"ant {args.policy}, {n:,} transitions, {len(lean_eps)} episodes, torch threads {args.threads}")
    print(f"| step | transitions/s (wall) | transitions/s (CPU) | µs per transition (CPU) |")
    print(f"|---|---|---|---|")
    for name, wall, cpu in (("gymnasium Ant-v5", gym_wall, gym_cpu), ("LeanAntStep", lean_wall, lean_cpu)):
        print(f"| {name} | {n / wall:,.0f} | {n / cpu:,.0f} | {1e6 * cpu / n:.0f} |")
    print(f"speed-up (CPU): {gym_cpu / lean_cpu:.2f}x; episodes identical: {same}")
    if not same:
        raise SystemExit("error: the lean step changed the collected episodes")


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
