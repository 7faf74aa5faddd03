"""World-model speed: our batched ensemble vs a plain Python loop over 7 separate member networks.

    python bench/bench_world_model.py                    # ant (27-dim state, 8-dim joint action)
    python bench/bench_world_model.py --env reacher --threads 1

Both sides have the same members (7 x MLP [s, a] -> 4 x 200 SiLU -> mean, log-variance of [Δs, r] and the
terminal logit, 5 elites) and do the same work:
  * training step: every member takes one Adam step on its own minibatch of 256 (Gaussian NLL + BCE);
    ours is one batched network (weights [members, in, out], one baddbmm per layer, one fused Adam),
    the loop is 7 nn.Sequential members, each with its own Adam (the authors' layout);
  * inference: `WorldModel.step` on B states (5 elites, the paper's r̄, ε_r, ε_g, majority vote, a uniformly
    drawn elite's next state, clipping, plus the aleatoric term), vs the loop computing the 5 elites one
    after another and then the same `ensemble_statistics`. Ours also goes member by member here (one
    GEMM per layer on the stacked weights, 4,096-row chunks): a batched baddbmm over an expanded input
    measured 0.49-0.65x the loop's speed on this CPU.
Weights are random: throughput does not depend on them and the benchmark needs no dataset. Each figure
is the median of `repeats` timed blocks after a warm-up block.
"""

import dataclasses
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import world_model  # noqa: E402


@dataclasses.dataclass
class BenchArgs:
    env: envs.EnvName = "ant"
    threads: int = 2
    repeats: int = 5
    train_steps: int = 50
    """training steps per timed block"""
    batches: tuple[int, ...] = (2_000, 20_000)
    """inference batch sizes (2,000 = one MOMA-PPO rollout step on ant)"""
    batch_size: int = 256
    """minibatch per member and training step"""
    bf16: bool = False
    """a probe: also time our training step with the network's forward under torch.autocast(bfloat16), losses in
    fp32 (world_model.py has no such switch yet; docs/benchmarks.md "bfloat16")"""


class LoopEnsemble(nn.Module):
    """The straightforward layout: a list of separate member networks, visited one by one."""

    def __init__(self, members: int, input_dim: int, target_dim: int, hidden_dim: int = 200, layers: int = 4):
        super().__init__()
        self.target_dim = target_dim
        self.members = nn.ModuleList()
        for _ in range(members):
            dims, mods = [input_dim] + [hidden_dim] * layers, []
            for i, o in zip(dims[:-1], dims[1:]):
                mods += [nn.Linear(i, o), nn.SiLU()]
            self.members.append(nn.Sequential(*mods, nn.Linear(hidden_dim, 2 * target_dim + 1)))

    def member(self, m: int, x: torch.Tensor):
        out = self.members[m](x)
        d = self.target_dim
        return out[:, :d], out[:, d:2 * d].clamp(-10.0, 0.5), out[:, 2 * d]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(bench: BenchArgs) -> None:
    torch.set_num_threads(bench.threads)
    torch.manual_seed(0)
    S, A = envs.STATE_DIM[bench.env], envs.JOINT_ACTION_DIM[bench.env]
    model = world_model.WorldModel(bench.env, "bench", S, A)  # 7 members, 5 elites, 4 x 200
    E, D, I = model.hyper["ensemble_size"], model.target_dim, model.input_dim
    loop = LoopEnsemble(E, I, D, model.hyper["hidden_dim"], model.hyper["n_hidden_layers"])
    n_data = 100_000
    inputs, targets = torch.randn(n_data, I), torch.randn(n_data, D)
    not_terminal = (torch.rand(n_data) > 0.01).float()
    gen = torch.Generator().manual_seed(0)

    # ------------------------------------------------------------------ training
    net = model.network
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)

    def train_ours(bf16: bool = False):
        for _ in range(bench.train_steps):
            idx = torch.randint(n_data, (E, bench.batch_size), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                mean, logvar, logit = net(inputs[idx])
            mean, logvar, logit = mean.float(), logvar.float(), logit.float()
            nll = world_model.gaussian_nll(mean, logvar, targets[idx])
            bce = F.binary_cross_entropy_with_logits(logit, not_terminal[idx], reduction="none").mean(1)
            loss = (nll + bce).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    loop_optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in loop.members]

    def train_loop():
        for _ in range(bench.train_steps):
            for m in range(E):
                idx = torch.randint(n_data, (bench.batch_size,), generator=gen)
                mean, logvar, logit = loop.member(m, inputs[idx])
                nll = 0.5 * (((mean - targets[idx]) ** 2) * torch.exp(-logvar) + logvar).mean()
                loss = nll + F.binary_cross_entropy_with_logits(logit, not_terminal[idx])
                loop_optimizers[m].zero_grad(set_to_none=True)
                loss.backward()
                loop_optimizers[m].step()

    t_ours = median_time(train_ours, bench.repeats) / bench.train_steps
    t_loop = median_time(train_loop, bench.repeats) / bench.train_steps
    if bench.bf16:
        t_bf16 = median_time(lambda: train_ours(bf16=True), bench.repeats) / bench.train_steps
        print(f"training steps/s: fp32 {1 / t_ours:,.1f}, bf16 autocast {1 / t_bf16:,.1f} ({t_ours / t_bf16:.2f}x)")
    print(f"world model {bench.env} (S={S}, A={A}; {E} members x {model.hyper['n_hidden_layers']} x "
          f"{model.hyper['hidden_dim']}, {model.hyper['n_elites']} elites), torch {torch.__version__}, "
          f"{bench.threads} thread(s), median of {bench.repeats}")
    print(f"| what | ours (world_model.py) | loop over {E} members | speed-up |")
    print("|---|---|---|---|")
    print(f"| training steps/s (all {E} members, {bench.batch_size} each) | {1 / t_ours:,.1f} | {1 / t_loop:,.1f} | "
          f"{t_loop / t_ours:.2f}x |")

    # ------------------------------------------------------------------ inference
    model.eval()
    loop.eval()
    elites = model.elites.tolist()
    for B in bench.batches:
        states = torch.randn(B, S)
        actions = torch.rand(B, A) * 2 - 1

        def infer_ours():
            model.step(states, actions, generator=gen)

        @torch.no_grad()
        def infer_loop():
            x = model.encode_inputs(states, actions)
            preds = [loop.member(m, x) for m in elites]
            mean = torch.stack([p[0] for p in preds]) * model.target_std + model.target_mean
            p_not_terminal = torch.sigmoid(torch.stack([p[2] for p in preds]))
            choice = torch.randint(len(elites), (B,), generator=gen)
            out = world_model.ensemble_statistics(states + mean[..., :S], mean[..., S], p_not_terminal, choice)
            out["next_states"] = torch.maximum(torch.minimum(out["next_states"], model.state_max), model.state_min)

        t_ours = median_time(infer_ours, bench.repeats)
        t_loop = median_time(infer_loop, bench.repeats)
        print(f"| inference samples/s, B = {B:,} | {B / t_ours:,.0f} | {B / t_loop:,.0f} | {t_loop / t_ours:.2f}x |")


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
