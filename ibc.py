"""IBC: independent behavioural cloning, one policy per agent (paper §5.1, docs/deviations.md §19.4).

Each agent i maximises the likelihood of its own dataset actions given its own observation and
10-step (o_i, a_i) history, independently of the other agents:

    L = -E[ Σ_i log π_i(a_i | h_i, o_i) ]

(a sum of independent per-agent losses: no parameter, gradient or value is shared between agents).
The agents are trained as one batched module for speed only.

* Continuous actions: tanh-squashed Gaussian with state-dependent log-std in [-6, 0] and the tanh
  Jacobian (ε = 1e-5), as the authors' `bc_only` IQL learner; greedy action tanh(mean).
  Coordination game: categorical π_i over {left, right}, greedy action = argmax (Table 3: IBC copies
  each agent's majority action, so it coordinates only when the dataset mostly does).
* History encoder (MOMA-PPO's self-attention encoder, docs/deviations.md §6) on partially observable
  tasks only (`--history-len` None); never on the coordination game (authors, docs/deviations.md §17).
* Rewards are not used.
* One fused Adam kernel per step (torch's `fused=True`).

    python ibc.py --env coordination --dataset neutral --total-steps 2000
    python ibc.py --env reacher --obs independent --total-steps 50000
    python ibc.py --env ant --obs partial --dataset medium --total-steps 50000
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import subprocess
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import envs


@dataclasses.dataclass
class Args:
    env: envs.EnvName = "coordination"
    """coordination, reacher or ant"""
    obs: Optional[envs.ObsName] = None
    """observation function (None = the env's default: coordination full, reacher all-observant, ant full)"""
    dataset: Optional[str] = None
    """dataset name of the env (None = the env's default: coordination unfavorable, reacher expert-mix, ant medium)"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the run (default: this file's name, CleanRL's convention); its records are filed under the
    file's name, so a copy of the script never mixes its results with the original's"""
    seed: int = 1
    cuda: bool = False
    """use the GPU (CPU by default)"""
    torch_threads: int = 1
    """torch CPU threads: 1 is fastest for these batch-256 networks on a shared 2-core machine"""
    bf16: bool = False
    """run the updates' matrix products in bfloat16 (torch.autocast; output layers, losses, weights and Adam stay
    fp32): 1.4-1.9x the gradient steps/s on Ant with this CPU's AVX512-BF16 (docs/benchmarks.md, "bfloat16")"""
    total_steps: Optional[int] = None
    """offline gradient steps (authors: 1,000,001). None = a budget that fits the shared 2-core CPU:
    5k on the coordination game, 50k without histories, 10k with the history encoder (PO tasks), which
    dominates the cost. Measured (1 thread, nets 256-256, batch 256, machine shared): MAIQL reacher all-observant 18 steps/s
    (50k ~ 45 min), MAIQL ant partial 2.3 steps/s (10k ~ 70 min), IBC ant partial 5.5 steps/s"""
    batch_size: int = 256
    hidden: int = 256
    """width of the two hidden layers of every MLP"""
    history_len: Optional[int] = None
    """history length (None = 10 on partially observable tasks, 0 on fully observable ones)"""
    history_dim: int = 128
    """width of the history encoder (docs/deviations.md §6)"""
    learning_rate: float = 3e-4
    eval_every: int = 5_000
    """gradient steps between greedy evaluations (10 episodes); 0 disables"""
    eval_episodes: int = 100
    """greedy episodes of the final evaluation"""
    checkpoint_every: int = 10_000
    """gradient steps between atomic checkpoints"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint"""
    cross_play_with: tuple[str, ...] = ()
    """run folders of other finished runs of this method and task (e.g. the other seeds): after the final evaluation
    (at once, for a finished run given with --resume), play teams stitched from this run's agents and each one's
    and write cross_play.json (envs.py, "Cross-play"; off by default, as in the authors' evaluation code)"""
    run_dir: Optional[str] = None
    """fixed run folder (default: runs/<env>__<obs>__<dataset>__<exp_name>__<seed>__<unix time>)"""
    results_dir: Optional[str] = None
    """when the run finishes, copy its small record (summary.json, curve.csv, command.txt; no checkpoints) to
    <results-dir>/<env>__<obs>__<dataset>__<algorithm>__<seed>/ (run_all.sh passes results/<table>)"""
    budget: Optional[str] = None
    """name of the budget the run belongs to (run_all.sh's BUDGET); recorded in summary.json"""


# --------------------------------------------------------------------------------------------------
# Networks: per-agent weights stacked [n, in, out], one bmm per layer for all agents; agents with
# smaller inputs see zero-padded inputs, which is exactly a smaller per-agent network.
# --------------------------------------------------------------------------------------------------
class AgentsMLP(nn.Module):
    """n independent MLPs in -> hidden -> hidden -> out, ReLU; [n, B, in] -> [n, B, out]."""

    def __init__(self, n: int, sizes: list[int]):
        super().__init__()
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for i, o in zip(sizes[:-1], sizes[1:]):
            layers = [nn.Linear(i, o) for _ in range(n)]  # PyTorch's default init, per agent
            self.weights.append(nn.Parameter(torch.stack([l.weight.detach().T for l in layers])))
            self.biases.append(nn.Parameter(torch.stack([l.bias.detach() for l in layers])[:, None, :]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.relu(torch.baddbmm(b, x, w)) if k < last else output_layer(b, x, w)
        return x


def output_layer(b: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """b + x w for a network's output layer, always in fp32. Under --bf16's autocast the hidden layers' products
    run in bfloat16, whose 8-bit mantissa (3 significant digits) would coarsen the policy's means and
    log-probabilities; without autocast this is plain baddbmm."""
    with torch.autocast(x.device.type, enabled=False):
        return torch.baddbmm(b, x.to(w.dtype), w)


class AgentsHistoryEncoder(nn.Module):
    """Per-agent history encoder of MOMA-PPO (paper §3.2, docs/deviations.md §6), batched over agents.

    [n, B, H, in] -> [n, B, d]: linear embedding + sinusoidal positions (0 = oldest), one single-head
    self-attention layer with residual + LayerNorm, then soft-attention pooling
    Σ_s softmax_s(qᵀ tanh(W_k H_s)) H_s. Padded (all-zero) steps are not masked, as in the authors'
    code (docs/deviations.md §6).
    """

    def __init__(self, n: int, in_dim: int, length: int, d: int = 128):
        super().__init__()
        self.d = d
        self.embed = AgentsMLP(n, [in_dim, d])
        self.qkv = AgentsMLP(n, [d, 3 * d])
        self.ln_weight = nn.Parameter(torch.ones(n, 1, 1, d))
        self.ln_bias = nn.Parameter(torch.zeros(n, 1, 1, d))
        self.pool_key = nn.Parameter(torch.stack([nn.Linear(d, d, bias=False).weight.detach().T for _ in range(n)]))
        self.pool_query = nn.Parameter(torch.randn(n, d, 1))
        position = torch.arange(length, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
        pe = torch.zeros(length, d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq)
        self.register_buffer("positions", pe)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, B, H, _ = h.shape
        (w_embed,), (b_embed,), (w_qkv,), (b_qkv,) = self.embed.weights, self.embed.biases, self.qkv.weights, self.qkv.biases
        h = h.reshape(n, B * H, -1)
        x = torch.baddbmm(b_embed, h, w_embed).reshape(n, B, H, self.d) + self.positions
        # qkv(x) = h (W_e W_qkv) + ((b_e + pos) W_qkv + b_qkv): the same function with the two linear maps
        # multiplied first, so each step is projected from its (o, a) pair (17 wide on PO Ant) instead of from the
        # 128-wide embedding: ~7x fewer FLOPs in the encoder's largest GEMM (docs/benchmarks.md)
        per_position = torch.baddbmm(b_qkv, b_embed + self.positions, w_qkv)  # [n, H, 3d]
        qkv = torch.bmm(h, torch.bmm(w_embed, w_qkv)).reshape(n, B, H, 3 * self.d) + per_position[:, None]
        q, k, v = qkv.reshape(n * B, H, 3 * self.d).split(self.d, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.d), dim=-1) @ v
        x = F.layer_norm(x + attn.reshape(n, B, H, self.d), (self.d,)) * self.ln_weight + self.ln_bias
        scores = torch.bmm(torch.tanh(torch.bmm(x.reshape(n, B * H, self.d), self.pool_key)), self.pool_query)
        weights = torch.softmax(scores.reshape(n, B, H, 1), dim=2)
        return (weights * x).sum(2)


class BCAgents(nn.Module):
    """All agents' history encoders and policies π_i."""

    LOG_STD_MIN, LOG_STD_MAX = -6.0, 0.0

    def __init__(self, n: int, obs_dim: int, action_dim: int, discrete: bool, hidden: int, history_len: int,
                 history_in: int, history_dim: int):
        super().__init__()
        self.action_dim, self.discrete = action_dim, discrete
        self.encoder = AgentsHistoryEncoder(n, history_in, history_len, history_dim) if history_len > 0 else None
        x_dim = obs_dim + (history_dim if history_len > 0 else 0)
        self.policy = AgentsMLP(n, [x_dim, hidden, hidden, action_dim if discrete else 2 * action_dim])

    def features(self, obs: torch.Tensor, hist: Optional[torch.Tensor]) -> torch.Tensor:
        """obs [n, B, o], hist [n, B, H, d] -> [n, B, (emb,) o] (embedding first, docs/deviations.md §6)."""
        return obs if self.encoder is None else torch.cat([self.encoder(hist), obs], dim=-1)

    def log_prob(self, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log π_i(a_i | x_i) -> [n, B]."""
        out = self.policy(x)
        if self.discrete:
            return torch.log_softmax(out, -1).gather(-1, actions[..., None]).squeeze(-1)
        mean, log_std = out.split(self.action_dim, dim=-1)
        a = actions.clamp(-1 + 1e-5, 1 - 1e-5)  # data actions may sit on the bound; atanh(±1) = ±inf
        std = log_std.clamp(self.LOG_STD_MIN, self.LOG_STD_MAX).exp()
        logp = torch.distributions.Normal(mean, std).log_prob(torch.atanh(a)) - torch.log(1 - a.pow(2) + 1e-5)
        return logp.sum(-1)

    def greedy(self, x: torch.Tensor) -> torch.Tensor:
        out = self.policy(x)
        return out.argmax(-1) if self.discrete else torch.tanh(out[..., : self.action_dim])


def pad_stack(arrays: list, width: int) -> torch.Tensor:
    """Per-agent [..., d_i] -> zero-padded [n, ..., width] float32 tensor."""
    return torch.stack([F.pad(torch.as_tensor(np.asarray(a), dtype=torch.float32), (0, width - a.shape[-1]))
                        for a in arrays])


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).parent,
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return "unknown"


def default_total_steps(env: str, history_len: int) -> int:
    """Gradient steps when --total-steps is not given: 5k on the coordination game (solved or failed for
    good after ~1k; Table 3 needs 30 runs per method), 50k without histories, 10k with the history encoder."""
    if env == "coordination":
        return 5_000
    return 50_000 if history_len == 0 else 10_000


class ReplayData:
    """The dataset's per-agent observations and actions stacked [n, N, ...] (zero-padded to a common width) and the
    (o_i, a_i) history table [n, N + 1, d] (row N = the all-zero padding row): a minibatch is one gather."""

    def __init__(self, data: envs.OfflineData, obs_dim: int, hist_dim: int, history_len: int, discrete: bool,
                 device: torch.device):
        self.size, self.history_len = len(data), history_len
        self.obs = pad_stack(data.observations, obs_dim).to(device)  # [n, N, o]
        if discrete:
            self.actions = torch.as_tensor(np.stack([a.reshape(-1) for a in data.actions]), device=device)  # [n, N] ints
        else:
            self.actions = torch.as_tensor(np.stack(data.actions), device=device)  # [n, N, a]
        if history_len > 0:
            self.table = pad_stack([data.history_table(i) for i in range(data.n_agents)], hist_dim).to(device)
            self.hist_index = torch.as_tensor(data.history_index, device=device)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict:
        rows = torch.randint(0, self.size, (batch_size,), device=self.obs.device, generator=generator)
        hist = self.table[:, self.hist_index[rows]] if self.history_len > 0 else None
        return dict(obs=self.obs[:, rows], hist=hist, actions=self.actions[:, rows])


def make_learner(args: Args, n: int, obs_dim: int, action_dim: int, discrete: bool, history_len: int, hist_dim: int,
                 device: torch.device) -> dict:
    agents = BCAgents(n, obs_dim, action_dim, discrete, args.hidden, history_len, hist_dim, args.history_dim).to(device)
    optimizer = torch.optim.Adam(agents.parameters(), lr=args.learning_rate, fused=True)
    return dict(agents=agents, optimizer=optimizer)


def update(learner: dict, b: dict) -> dict:
    """One gradient step on minibatch b: Σ_i of the independent per-agent negative log-likelihoods."""
    agents, optimizer = learner["agents"], learner["optimizer"]
    loss = -agents.log_prob(agents.features(b["obs"], b["hist"]), b["actions"]).sum(0).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return dict(policy_loss=loss)


def main(args: Args) -> dict:
    obs_name = envs.check_names(args.env, args.obs, args.dataset)
    dataset = args.dataset or envs.DEFAULT_DATASET[args.env]
    # Every argument is checked before any folder is made or any data is loaded (docs/usage.md, "Run safety").
    envs.check_args(args, at_least_one=("total_steps", "batch_size", "hidden", "history_dim", "eval_episodes"),
                    non_negative=("history_len", "eval_every", "checkpoint_every"), positive=("learning_rate",))
    algorithm = pathlib.Path(__file__).stem  # the method its records are filed under: this file's name
    given_run_dir = args.run_dir is not None
    run_dir = pathlib.Path(args.run_dir) if given_run_dir else envs.default_run_dir(
        args.env, obs_name, dataset, args.exp_name, args.seed)
    ckpt_path = run_dir / "checkpoint.pt"
    if args.resume and not ckpt_path.exists():
        raise envs.MomaError(f"no checkpoint at {ckpt_path} to resume; drop --resume to start a new run")
    envs.check_cross_play_partners(args.cross_play_with, run_dir)  # a wrong path fails now, not after training

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cudnn.deterministic = True
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if args.cuda and device.type == "cpu":
        raise envs.MomaError("--cuda given but torch sees no GPU; drop --cuda")
    from torch.utils.tensorboard import SummaryWriter

    history_len = args.history_len
    if history_len is None:
        history_len = envs.HISTORY_LEN if (args.env, obs_name) in envs.PARTIALLY_OBSERVABLE else 0
    if args.env == "coordination":
        history_len = 0  # the round index is the whole state (authors force memory_len = 0 here)
    offline_steps = args.total_steps if args.total_steps is not None else default_total_steps(args.env, history_len)
    ck = None
    if args.resume:  # refuse another configuration before any work (the checkpoint records the run's arguments)
        ck = envs.load_checkpoint(ckpt_path, device)
        envs.check_resume(ck["args"], vars(args), "total_steps", ck.get("step", 0), offline_steps)
    data = envs.load_dataset(args.env, dataset, obs_name, history_len=max(history_len, 1))
    n, N, discrete = data.n_agents, len(data), args.env == "coordination"
    adims = envs.action_dims(args.env)
    if len(set(adims)) != 1:
        raise envs.MomaError(f"ibc.py needs equal per-agent action dims, got {adims}")
    action_dim = envs.COORDINATION_N_ACTIONS if discrete else adims[0]
    obs_dim, hist_dim = max(envs.obs_dims(args.env, obs_name)), max(envs.history_dims(args.env, obs_name))
    buffer = ReplayData(data, obs_dim, hist_dim, history_len, discrete, device)
    learner = make_learner(args, n, obs_dim, action_dim, discrete, history_len, hist_dim, device)
    agents, optimizer = learner["agents"], learner["optimizer"]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    step, wall_before = 0, 0.0
    if ck is not None:
        if ck.get("dataset_fingerprint", data.fingerprint) != data.fingerprint:
            raise envs.MomaError(f"dataset {data.dataset_id} was rebuilt with other data since checkpoint {ckpt_path} "
                                 f"was written; start a new run without --resume")
        try:
            agents.load_state_dict(ck["agents"])
            optimizer.load_state_dict(ck["optimizer"])
            step, wall_before = ck["step"], ck["wall_s"]
            generator.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            np.random.set_state(ck["numpy_rng"])
        except Exception as e:
            raise envs.MomaError(f"checkpoint {ckpt_path} does not fit this run ({type(e).__name__}: {str(e)[:200]}); "
                                 f"start a new run without --resume") from None
        envs.check_weights(step, agents, what=f"checkpoint {ckpt_path} holds")
        del ck
        print(f"resumed {run_dir} at step {step}")
    envs.check_free_space(run_dir, 3 * envs.tensor_bytes(agents))  # weights and 2 Adam moments
    # The record of this table cell (see envs.py, "Run records"): command, eval curve, fingerprints.
    record = envs.record_name(args.env, obs_name, dataset, algorithm, args.seed)
    envs.check_results_dir(args.results_dir, record, args.budget)
    envs.make_run_dir(run_dir, given_run_dir)  # only now: an argument or data error leaves no folder behind
    code = envs.code_fingerprint(__file__)  # hashed before training: the code that runs, even if edited meanwhile
    envs.write_command(run_dir, args.resume)
    curve = envs.CurveLog(run_dir, step if args.resume else None)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    t0 = time.time()

    def save_checkpoint():
        envs.check_weights(step, agents)  # a diverged network is never checkpointed
        envs.save_checkpoint(dict(agents=agents.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                  wall_s=wall_before + time.time() - t0, generator=generator.get_state(),
                                  torch_rng=torch.get_rng_state(), numpy_rng=np.random.get_state(), args=vars(args),
                                  dataset_fingerprint=data.fingerprint), ckpt_path)

    def greedy_act(observations, histories, agents=agents):  # agents=: another run's team, for cross-play
        with torch.no_grad():
            hist = pad_stack(histories, hist_dim).to(device) if history_len > 0 else None
            return list(agents.greedy(agents.features(pad_stack(observations, obs_dim).to(device), hist)).cpu().numpy())


    def cross_play():  # --cross-play-with: this run's agents in teams with other runs' agents (envs.py, "Cross-play")
        return envs.cross_play(run_dir=run_dir, partners=args.cross_play_with, method=algorithm, env=args.env,
                               obs=obs_name, eval_obs=obs_name, data=data, own_act=greedy_act,
                               partner_act=lambda ck: lambda o, h, team=envs.load_team(agents, ck, "agents"): greedy_act(o, h, team),
                               n_episodes=args.eval_episodes, seed=10101 + 1 + args.seed, history_len=history_len,
                               record=record, results_dir=args.results_dir, budget=args.budget, code=code, device=device)

    if args.cross_play_with and step >= offline_steps and (run_dir / "summary.json").exists():
        return cross_play()  # a finished run given with --resume: only the teams are played; its record stays

    # ---- training loop ----
    t_last, step_last, sps = time.time(), step, 0.0
    loss = torch.zeros(())  # a resumed run may have nothing left to train
    # a plain progress line about once a minute (phase, step/total, rate, ETA), in batch logs and terminals alike
    bar = envs.PlainProgress(total=offline_steps, initial=step, desc=f"IBC {args.env}/{obs_name}/{dataset}")
    while step < offline_steps:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = update(learner, buffer.sample(args.batch_size, generator))["policy_loss"]
        step += 1
        bar.update(1)

        if step % 1000 == 0 or step == offline_steps:
            sps = (step - step_last) / max(time.time() - t_last, 1e-9)
            t_last, step_last = time.time(), step
            writer.add_scalar("charts/SPS", sps, step)
            writer.add_scalar("losses/policy_loss", loss.item(), step)
            envs.check_losses(step, policy_loss=loss)
        if args.eval_every > 0 and step % args.eval_every == 0 and step < offline_steps:
            envs.check_losses(step, policy_loss=loss)
            eval_ret = envs.evaluate(args.env, obs_name, greedy_act, 10, seed=10101 + 1000 * step, history_len=history_len)
            writer.add_scalar("eval/episodic_return", eval_ret.mean(), step)
            eval_score = float(data.normalized_score(eval_ret).mean())
            writer.add_scalar("eval/normalized_score", eval_score, step)
            curve.add(step, step * args.batch_size, wall_before + time.time() - t0, eval_score, len(eval_ret))
            print(f"step {step} | greedy return {eval_ret.mean():.3f} | loss {loss.item():.4f} | SPS {sps:.0f}", flush=True)
        if args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
            save_checkpoint()
    envs.check_losses(step, policy_loss=loss)
    bar.close()
    save_checkpoint()  # checks the weights first: a broken policy never reaches the evaluation or a summary

    # ---- final greedy evaluation and summary ----
    returns, lengths, conventions = envs.evaluate(args.env, obs_name, greedy_act, args.eval_episodes,
                                                  seed=10101 + 1 + args.seed, history_len=history_len,
                                                  return_lengths=True, return_conventions=True)
    scores = data.normalized_score(returns)
    wall = wall_before + time.time() - t0
    summary = dict(algorithm=algorithm, env=args.env, obs=obs_name, dataset_id=data.dataset_id, seed=args.seed,
                   config=vars(args), eval_episodes=args.eval_episodes,
                   normalized_score_mean=float(scores.mean()), normalized_score_std=float(scores.std()),
                   episode_returns=returns.tolist(), episode_normalized_scores=scores.tolist(),
                   train_steps=step, wall_time_s=wall, git_commit=git_commit())
    summary.update(method=algorithm, **envs.record_fields(code, data, args.budget, lengths, conventions))
    curve.add(step, step * args.batch_size, wall, summary["normalized_score_mean"], len(returns))
    writer.add_scalar("eval/episodic_return", returns.mean(), step)
    writer.add_scalar("eval/normalized_score", scores.mean(), step)
    writer.close()
    envs.write_summary(run_dir, summary)
    if args.results_dir is not None:
        print(f"record of this cell: {envs.save_record(run_dir, args.results_dir, record)}")
    if args.cross_play_with:
        cross_play()
    print(f"final normalised score {scores.mean():.3f} +- {scores.std():.3f} over {len(returns)} greedy episodes; "
          f"{step} steps in {wall:.0f}s; run {run_dir}")
    return summary


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except envs.MomaError as e:
        raise SystemExit(f"error: {e}")
