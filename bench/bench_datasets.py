"""Dataset-build speed: collection through gymnasium's step vs make_datasets.LEAN_STEPS (bit-identical).

    python bench/bench_datasets.py                  # Ant, 20,000 transitions per side, the shipped medium policy
    python bench/bench_datasets.py --policy random --transitions 50000
    python bench/bench_datasets.py --policy reacher-expert

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
    policy: Literal["medium", "random", "reacher-expert"] = "medium"
    """the shipped Ant medium policy, uniform random Ant torques, or the shipped Reacher expert"""
    transitions: int = 20_000
    threads: int = 1
    """torch threads of the policy (the builds run one dataset per core)"""


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(args: BenchArgs) -> None:
    torch.set_num_threads(args.threads)

    env = "reacher" if args.policy == "reacher-expert" else "ant"

    def make_policy():
        if args.policy == "random":
            return md.UniformRandomPolicy(8, seed=0)
        return md.load_policy(md.SHIPPED["reacher_expert" if env == "reacher" else "ant_medium"])

    gym_eps, gym_wall, gym_cpu = timed(lambda: md.collect_episodes(env, make_policy(), args.transitions, seed=1,
                                                                   lean=False, desc="gymnasium step"))
    lean_eps, lean_wall, lean_cpu = timed(lambda: md.collect_episodes(env, make_policy(), args.transitions, seed=1,
                                                                      desc="lean step"))
    same = len(gym_eps) == len(lean_eps) and all(
        np.array_equal(a[k], b[k]) for a, b in zip(gym_eps, lean_eps) for k in a)
    n = args.transitions
    print(f"{env} {args.policy}, {n:,} transitions, {len(lean_eps)} episodes, torch threads {args.threads}")
    print(f"| step | transitions/s (wall) | transitions/s (CPU) | µs per transition (CPU) |")
    print(f"|---|---|---|---|")
    for name, wall, cpu in (("gymnasium step", gym_wall, gym_cpu), (md.LEAN_STEPS[env].__name__, lean_wall, lean_cpu)):
        print(f"| {name} | {n / wall:,.0f} | {n / cpu:,.0f} | {1e6 * cpu / n:.0f} |")
    print(f"speed-up (CPU): {gym_cpu / lean_cpu:.2f}x; episodes identical: {same}")
    if not same:
        raise SystemExit("error: the lean step changed the collected episodes")


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
