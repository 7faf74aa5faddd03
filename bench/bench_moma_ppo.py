"""Synthetic steps/s of MOMA-PPO's whole training loop (rollouts in the world model + PPO updates).

    python bench/bench_moma_ppo.py --env ant --obs partial
    python bench/bench_moma_ppo.py --env ant --obs full

Uses an untrained world model of the default size (7 members, 4 x 200, 5 elites) on random states of the
env's dimensions: throughput does not depend on the weights, and the benchmark needs no dataset. Reports
the median of `repeats` iterations after one warm-up, and the loop against this machine's roofline: the
FLOPs of one iteration (torch's FlopCounterMode: rollouts + updates, forward and backward) per second, as a
share of the fp32 GEMM rate measured in the same run on the loop's dominant shapes (agents x minibatch x hidden
x hidden batched matmuls). A ratio to another program holds only when both run side by side on one machine, so
none is printed here.
"""

import dataclasses
import pathlib
import sys
import time
from typing import Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import moma_ppo  # noqa: E402
import world_model  # noqa: E402
import speed_table  # noqa: E402  (bench/, beside this file)


@dataclasses.dataclass
class BenchArgs:
    env: envs.EnvName = "ant"
    obs: Optional[envs.ObsName] = "partial"
    repeats: int = 3
    threads: int = 2
    rollout_batch: Optional[int] = None
    rollout_horizon: Optional[int] = None
    use_history: Optional[bool] = None
    minibatch_size: Optional[int] = None
    """None = the script's default (histories only on partially observable tasks)"""
    save: Optional[str] = None
    """also write the figures as JSON to this file (bench/speed_table.py puts them in the README's speed table)"""
    bf16: bool = False
    """the loop (rollouts and updates) under torch.autocast(bfloat16) as moma_ppo.py --bf16 runs it (output layers and
    the world model stay fp32), against the bfloat16 GEMM rate (docs/benchmarks.md "bfloat16")"""


def main(bench: BenchArgs) -> None:
    envs.keep_large_allocations_in_the_heap()  # as moma_ppo.main does
    torch.set_num_threads(bench.threads)
    torch.manual_seed(0)
    args = moma_ppo.resolve(moma_ppo.Args(env=bench.env, obs=bench.obs, rollout_batch=bench.rollout_batch,
                                          rollout_horizon=bench.rollout_horizon, uncertainty_threshold=1e9,
                                          use_history=bench.use_history, minibatch_size=bench.minibatch_size,
                                          # random states break Ant's healthy-height rule at once: without this,
                                          # most bench rollouts would end at their first step (real data rarely does)
                                          termination_rule=False))
    device = torch.device("cpu")
    S, A, N = envs.STATE_DIM[bench.env], envs.JOINT_ACTION_DIM[bench.env], 100_000
    model = world_model.WorldModel(bench.env, "bench", S, A).eval()
    layout = moma_ppo.Layout(bench.env, args.obs, device)
    states = torch.randn(N, S)
    table = torch.randn(layout.n, N + 1, layout.history_dim) if args.use_history else None
    index = torch.randint(0, N + 1, (N, envs.HISTORY_LEN)) if args.use_history else None
    agents = moma_ppo.Agents(layout.n, layout.obs_dim, layout.action_dim, layout.discrete, S, args.hidden_dim,
                             args.use_history, layout.history_dim, args.embed_dim, args.init_log_std,
                             torch.zeros(layout.n, 1, layout.obs_dim), torch.ones(layout.n, 1, layout.obs_dim),
                             torch.zeros(S), torch.ones(S))
    optimizer = torch.optim.Adam(agents.parameters(), lr=args.learning_rate, eps=1e-5)
    gen = torch.Generator().manual_seed(0)
    rollout_t, update_t, steps = [], [], []
    from torch.utils.flop_counter import FlopCounterMode

    for rep in range(bench.repeats + 2):
        counting = rep == bench.repeats + 1  # one last iteration under the FLOP counter (untimed)
        counter = FlopCounterMode(display=False) if counting else None
        if counting:
            counter.__enter__()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bench.bf16)
        autocast.__enter__()
        t0 = time.perf_counter()
        batch, _, _ = moma_ppo.collect_rollouts(agents, model, layout, states, table, index, args, gen)
        t1 = time.perf_counter()
        n = len(batch["returns"])
        mb = min(args.minibatch_size, n)
        for _ in range(args.update_epochs):  # the same update as moma_ppo.main
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n - mb + 1, mb):
                idx = perm[start:start + mb]
                feats = agents.features(batch["obs"][:, idx], batch["hist"][:, idx] if args.use_history else None)
                dist = agents.distribution(feats)
                ratio = (agents.log_prob(dist, batch["actions"][:, idx]) - batch["logp"][:, idx]).exp()
                adv = batch["advantages"][idx]
                loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean() + 0.5 * (
                    agents.team_value(feats, batch["states"][idx]) - batch["value_targets"][idx]).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(agents.parameters(), 1.0)
                optimizer.step()
        t2 = time.perf_counter()
        autocast.__exit__(None, None, None)
        if counting:
            counter.__exit__(None, None, None)
            flops_per_transition = counter.get_total_flops() / n
        elif rep > 0:  # the first iteration is a warm-up
            rollout_t.append(t1 - t0), update_t.append(t2 - t1), steps.append(n)
    r, u, n = np.median(rollout_t), np.median(update_t), int(np.median(steps))
    sps = n / (r + u)
    achieved = sps * flops_per_transition / 1e9
    dtype = torch.bfloat16 if bench.bf16 else torch.float32
    roofline = speed_table.gemm_rate(layout.n, min(args.minibatch_size, n), args.hidden_dim, dtype=dtype)
    print(f"{bench.env}/{args.obs}: history={args.use_history} b={args.rollout_batch} k={args.rollout_horizon} "
          f"minibatch={args.minibatch_size} epochs={args.update_epochs} threads={bench.threads}"
          f"{' bf16 autocast' if bench.bf16 else ''}")
    print(f"  {n} synthetic transitions per iteration; rollouts {r:.2f} s ({n / r:,.0f} steps/s), "
          f"updates {u:.2f} s; whole loop {sps:,.0f} synthetic steps/s")
    print(f"  {flops_per_transition / 1e6:.1f} MFLOP per synthetic transition (rollout + {args.update_epochs} epochs, "
          f"forward + backward) -> {achieved:.1f} GFLOP/s; {'bf16' if bench.bf16 else 'fp32'} GEMM rate of [{layout.n} x {min(args.minibatch_size, n)} "
          f"x {args.hidden_dim} x {args.hidden_dim}] here: {roofline:.1f} GFLOP/s -> {100 * achieved / roofline:.0f}% "
          f"of the roofline")
    if bench.save:
        speed_table.save(bench.save, "bench_moma_ppo", bench.threads, [dict(
            env=bench.env, obs=args.obs, history=bool(args.use_history), bf16=bench.bf16, synthetic_steps_per_s=sps,
            mflop_per_transition=flops_per_transition / 1e6, gflop_per_s=achieved, gemm_gflop_per_s=roofline,
            roofline_share=achieved / roofline)], torch.__version__)


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
