"""Online MAPPO (CTDE) in the real environment: the learner the authors used for their reacher experts.

Paper §5.3 / docs/deviations.md §20: the MOMA-PPO learner run online. Each agent i has its own Gaussian
policy π_i(a_i | o_i) and value V_i(o_i) (no parameter sharing, no agent id); a mixer turns them into
the team value V_tot(s) = Σ_i w_i(s) V_i(o_i) + b(s) (docs/deviations.md §14); the PPO ratio is the *joint*
one, ρ = Π_i π_i / π_i,old (one ratio for the team, docs/deviations.md §15). Besides making the reacher expert of
`make_datasets.py`, it is an online upper bound for the tables.

Differences from the authors' online MAPPO, and why:
* no 10-step history encoder: the experts are trained all-observant (the state is Markov), and
  the encoder costs ~5x the MLPs on 2 CPU cores (docs/benchmarks.md, "The history encoder"); the policies see o_i.
* learning rate 3e-4 instead of their general 5e-5, and many parallel environments with complete
  episodes per iteration (the authors: one env, 2000 steps): our budget is minutes, not days.
* critic target and GAE are the authors' recursion (docs/deviations.md §15) with f = 1 - terminal and ζ = 0 at every
  episode end or rollout end, bootstrapping from V_tot(s_{t+1}) there.

    python mappo.py --env reacher --total-steps 1500000
    python mappo.py --env reacher --resume --run-dir runs/<run>
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import tyro

import envs


@dataclasses.dataclass
class Args:
    env: envs.EnvName = "reacher"
    """reacher or ant (the coordination game has no online use here)"""
    obs: Optional[envs.ObsName] = None
    """observation function (None = the env's default, all-observant / full)"""
    dataset: Optional[str] = None
    """dataset whose ref scores normalise the final evaluation (None = the env's default); never built here"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the run (default: this file's name, CleanRL's convention); its records are filed under the
    file's name, so a copy of the script never mixes its results with the original's"""
    seed: int = 1
    cuda: bool = False
    """use the GPU (CPU by default)"""
    torch_threads: int = 1
    """torch CPU threads (1: small nets, and extra threads spin against other jobs on a shared machine)"""
    total_steps: int = 1_500_000
    """environment steps (summed over the parallel environments); the learning rate anneals over these"""
    stop_steps: Optional[int] = None
    """stop (final evaluation, policy file) after this many steps, before total_steps"""
    num_envs: int = 40
    """parallel environments, stepped in a plain loop (faster than AsyncVectorEnv on 2 cores)"""
    num_steps: int = 50
    """steps per environment per iteration (50 = one whole reacher episode; 40 x 50 = the authors' 2000)"""
    learning_rate: float = 3e-4
    """Adam learning rate of every module (authors: 5e-5, see module docstring)"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0 over total_steps"""
    gamma: float = 0.99
    norm_obs: bool = True
    """normalise states by their running mean / std (CleanRL; the authors did not): reacher's key input,
    fingertip - target (~0.1), is tiny next to the joint velocities"""
    norm_reward: bool = True
    """divide rewards by the running std of the discounted return (gymnasium NormalizeReward); without it
    reacher's returns (-50..-4) dwarf the value clip of 0.2 and learning drifts (the authors used raw
    rewards, docs/deviations.md §18)"""
    gae_lambda: float = 0.98
    """GAE λ (the authors' default, docs/deviations.md §15)"""
    update_epochs: int = 10
    """PPO epochs per iteration (authors: 5 epochs of 256; with 2000 samples per iteration that is 35
    gradient steps, which learned reacher far too slowly in our budget; CleanRL does ~320)"""
    minibatch_size: int = 128
    clip_coef: float = 0.2
    vf_coef: float = 0.5
    max_grad_norm: float = 1.0
    """gradient-norm clip, applied to the policies and to the values + mixer separately (the authors clip
    all jointly, docs/deviations.md §15 and §20, which lets a large value loss starve the policies of gradient)"""
    entropy_lr: float = 1e-3
    """step size of the adaptive entropy weight α (0 disables the entropy term)"""
    entropy_target: float = -2.0
    """target joint entropy (authors' ppo_entropy_target)"""
    action_penalty_coef: float = 1.0
    """penalty on mean actions outside [-1, 1] (the authors', docs/deviations.md §15)"""
    hidden: int = 256
    eval_every: int = 50
    """iterations between greedy evaluations (10 episodes); 0 = only the final one"""
    eval_episodes: int = 100
    """greedy episodes of the final evaluation"""
    checkpoint_every: int = 100
    """iterations between atomic checkpoints; 0 = only at the end"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint"""
    run_dir: Optional[str] = None
    """fixed run folder (default: runs/<env>__<obs>__online__<exp_name>__<seed>__<unix time>)"""
    elbow_convention: int = 0
    """reacher only: +1 / -1 adds a training-only penalty elbow_penalty * max(0, -c * θ2) per step, so the
    team adopts one arm-bend convention (θ2 >= 0 for +1) for every target; the logged returns stay the task's.
    Unshaped experts pick the bend from the target's side, which a mirror image does not flip."""
    elbow_penalty: float = 1.0
    policy_out: Optional[str] = None
    """also write the final policy file here (e.g. behaviour_policies/reacher_expert.pt)"""


# What --resume may change besides envs.RESUME_MAY_CHANGE and a longer --total-steps: where to stop, where to copy
# the policy, and the elbow shaping, which the reacher expert's recipe turns on for its second stage (docs/usage.md).
RESUME_MAY_CHANGE = ("stop_steps", "policy_out", "elbow_convention", "elbow_penalty")


# --------------------------------------------------------------------------------------------------
# Networks: per-agent MLPs stacked as [n_agents, in, out] weights, one bmm per layer for all agents.
# Agents with smaller observations see zero-padded inputs, which is exactly a smaller per-agent net.
# --------------------------------------------------------------------------------------------------
class AgentsMLP(nn.Module):
    def __init__(self, n_agents: int, sizes: list[int], last_scale: float = 1.0):
        super().__init__()
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers = [nn.Linear(i, o) for _ in range(n_agents)]  # PyTorch's default init, per agent
            w = torch.stack([l.weight.detach().T for l in layers])
            b = torch.stack([l.bias.detach() for l in layers])
            if k == len(sizes) - 2:
                w, b = w * last_scale, b * 0.0 if last_scale != 1.0 else b
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b[:, None, :]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, B, in] -> [n, B, out]
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if k < len(self.weights) - 1:
                x = torch.relu(x)
        return x


class MAPPOAgents(nn.Module):
    """Per-agent Gaussian policies (state-dependent log-std in [-6, 0), heads x0.1, no squashing),
    per-agent values V_i(o_i) and the mixer V_tot(s) = Σ w_i(s) V_i + b(s) (docs/deviations.md §14, §20)."""

    LOG_STD_MIN, LOG_STD_MAX = -6.0, 0.0

    def __init__(self, obs_dims: list[int], action_dim: int, state_dim: int, hidden: int = 256,
                 obs_index: Optional[list[list[int]]] = None):
        super().__init__()
        n = len(obs_dims)
        self.obs_dims, self.action_dim, self.max_obs = list(obs_dims), action_dim, max(obs_dims)
        # Running mean / variance of the global state (CleanRL's observation normalisation); agent i's
        # observation o_i = s[obs_index[i]] is normalised with the matching entries.
        self.obs_index = obs_index or [list(range(d)) for d in obs_dims]
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_var", torch.ones(state_dim))
        self.register_buffer("state_count", torch.tensor(1e-4, dtype=torch.float64))
        self.policy = AgentsMLP(n, [self.max_obs, hidden, hidden, 2 * action_dim], last_scale=0.1)
        self.value = AgentsMLP(n, [self.max_obs, hidden, hidden, 1])
        # QMIX-style non-negative mixing weights, here w(s) = n * softmax(.) (bounded, summing to n).
        # The authors use raw linear w_i(s) (docs/deviations.md §14); with lr 3e-4 that bilinear w_i * V_i blew up in
        # our runs (value loss 1e9 within 300k reacher steps), bounded weights keep it well conditioned.
        self.mixer = nn.Sequential(nn.Linear(n * state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                   nn.Linear(hidden, n + 1))

    def update_state_stats(self, states: np.ndarray) -> None:
        x = torch.as_tensor(states, dtype=torch.float64)
        b_mean, b_var, b_count = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, tot = b_mean - self.state_mean.double(), self.state_count + b_count
        m2 = self.state_var.double() * self.state_count + b_var * b_count + delta**2 * self.state_count * b_count / tot
        self.state_mean.copy_(self.state_mean.double() + delta * b_count / tot)
        self.state_var.copy_(m2 / tot)
        self.state_count.copy_(tot)

    def normalize_states(self, states) -> torch.Tensor:
        s = torch.as_tensor(states, dtype=torch.float32, device=self.state_mean.device)
        return ((s - self.state_mean) / torch.sqrt(self.state_var + 1e-8)).clamp(-10.0, 10.0)

    def stack_obs(self, observations: list) -> torch.Tensor:
        """Per-agent raw [B, o_i] -> normalised, zero-padded [n, B, max_o]."""
        std = torch.sqrt(self.state_var + 1e-8)
        return torch.stack([
            nn.functional.pad(((torch.as_tensor(o, dtype=torch.float32, device=std.device) - self.state_mean[ix]) / std[ix])
                              .clamp(-10.0, 10.0), (0, self.max_obs - o.shape[-1]))
            for o, ix in zip(observations, self.obs_index)])

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        out = self.policy(obs)
        mean, raw = out[..., : self.action_dim], out[..., self.action_dim:]
        # Authors: hard clamp of log σ to [-6, 0]. A hard upper clamp has zero gradient wherever the head
        # exceeds 0, so σ stays 1 in those states for good: our reacher runs flailed with sampled actions
        # (return -35 vs -7 greedy). A soft upper bound keeps the gradient: log σ = -softplus(-(raw + 2)) <= 0
        # (σ ≈ 0.88 at init), then the lower clamp.
        log_std = (-nn.functional.softplus(-(raw + 2.0))).clamp(min=self.LOG_STD_MIN)
        return torch.distributions.Normal(mean, log_std.exp())

    def v_tot(self, obs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """obs [n, B, max_o], states [B, S] -> V_tot [B]. In FO tasks the mixer sees n copies of the state
        (authors: the concatenation of all agents' current observations); here it sees s per agent slot."""
        v = self.value(obs).squeeze(-1)  # [n, B]
        wb = self.mixer(self.normalize_states(states).repeat(1, v.shape[0]))  # [B, n + 1]
        w = v.shape[0] * torch.softmax(wb[:, :-1], dim=-1)
        return (w * v.T).sum(-1) + wb[:, -1]


def save_policy_file(agents: MAPPOAgents, env: str, obs: str, path: pathlib.Path, meta: dict) -> None:
    """The small per-agent policy file make_datasets.py collects with (policy weights only; read there by
    make_datasets.MAPPOTeamPolicy, which repeats MAPPOAgents.stack_obs and dist without importing this script)."""
    blob = dict(kind="mappo", env=env, obs=obs, obs_dims=agents.obs_dims, action_dim=agents.action_dim,
                hidden=agents.policy.weights[0].shape[-1],
                policy_state={k: v.detach().clone() for k, v in agents.policy.state_dict().items()},
                state_mean=agents.state_mean.detach().clone(), state_var=agents.state_var.detach().clone(), meta=meta)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise envs.MomaError(f"cannot create the folder of the policy file {path} ({e.strerror}); choose another "
                             f"--policy-out") from None
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # this process's own: two runs never share it
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch's zip writer reports a full disk as RuntimeError
            raise envs.MomaError(f"could not write the policy file {path} ({type(e).__name__}: {e}); the run's "
                                 f"checkpoint is intact") from None
        raise


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).parent,
                                       stderr=subprocess.DEVNULL).decode().strip()
    except Exception:
        return "unknown"


def main(args: Args) -> dict:
    if args.env == "coordination":
        raise envs.MomaError("mappo.py trains on reacher or ant; the coordination game needs no online expert")
    obs_name = envs.check_names(args.env, args.obs)
    adims = envs.action_dims(args.env)
    if len(set(adims)) != 1:
        raise envs.MomaError(f"mappo.py needs equal per-agent action dims, got {adims}")
    dataset = args.dataset or envs.DEFAULT_DATASET[args.env]
    envs.check_names(args.env, obs_name, dataset)
    # Every argument is checked before any folder is made or any work is done (docs/usage.md, "Run safety").
    envs.check_args(args, at_least_one=("total_steps", "stop_steps", "num_envs", "num_steps", "update_epochs",
                                        "minibatch_size", "hidden", "eval_episodes"),
                    non_negative=("eval_every", "checkpoint_every", "clip_coef", "vf_coef", "entropy_lr",
                                  "action_penalty_coef", "elbow_penalty"),
                    positive=("learning_rate", "max_grad_norm"), finite=("entropy_target",),
                    between={"gamma": (0.0, 1.0), "gae_lambda": (0.0, 1.0)})
    if args.minibatch_size > args.num_envs * args.num_steps:
        raise envs.MomaError(f"--minibatch-size {args.minibatch_size} is larger than an iteration's "
                             f"{args.num_envs * args.num_steps} samples (--num-envs x --num-steps): no update would run")
    if args.elbow_convention not in (-1, 0, 1):
        raise envs.MomaError(f"--elbow-convention must be -1, 0 or 1, got {args.elbow_convention!r}")
    if args.elbow_convention != 0 and args.env != "reacher":
        raise envs.MomaError("--elbow-convention is for reacher only")
    given_run_dir = args.run_dir is not None
    run_dir = pathlib.Path(args.run_dir) if given_run_dir else envs.default_run_dir(
        args.env, obs_name, "online", args.exp_name, args.seed)
    ckpt_path = run_dir / "checkpoint.pt"
    if args.resume and not ckpt_path.exists():
        raise envs.MomaError(f"no checkpoint at {ckpt_path} to resume; drop --resume to start a new run")

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cudnn.deterministic = True
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if args.cuda and device.type == "cpu":
        raise envs.MomaError("--cuda given but torch sees no GPU; drop --cuda")
    from torch.utils.tensorboard import SummaryWriter

    ck = None
    if args.resume:  # refuse another configuration before any work (the checkpoint records the run's arguments)
        ck = envs.load_checkpoint(ckpt_path, device)
        keep = lambda d: {k: v for k, v in d.items() if k not in RESUME_MAY_CHANGE}  # noqa: E731
        envs.check_resume(keep(ck["args"]), keep(vars(args)), "total_steps", ck.get("global_step", 0), args.total_steps)
        for k in ("elbow_convention", "elbow_penalty"):
            if ck["args"].get(k, getattr(args, k)) != getattr(args, k):
                print(f"resuming with --{k.replace('_', '-')} {getattr(args, k)} (the checkpoint's stage had "
                      f"{ck['args'][k]}): a new shaping stage", flush=True)

    n_agents, S, E, T = envs.N_AGENTS[args.env], envs.STATE_DIM[args.env], args.num_envs, args.num_steps
    odims, a_dim = envs.obs_dims(args.env, obs_name), adims[0]
    agents = MAPPOAgents(odims, a_dim, S, args.hidden, envs.obs_indices(args.env, obs_name)).to(device)
    optimizer = torch.optim.Adam(agents.parameters(), lr=args.learning_rate)
    alpha, global_step, iteration, wall_before = 0.0, 0, 0, 0.0
    if ck is not None:
        try:
            agents.load_state_dict(ck["agents"])
            optimizer.load_state_dict(ck["optimizer"])
            alpha, global_step, iteration, wall_before = ck["alpha"], ck["global_step"], ck["iteration"], ck["wall_s"]
            torch.set_rng_state(ck["torch_rng"])
            np.random.set_state(ck["numpy_rng"])
        except Exception as e:
            raise envs.MomaError(f"checkpoint {ckpt_path} does not fit this run ({type(e).__name__}: {str(e)[:200]}); "
                                 f"start a new run without --resume") from None
        envs.check_weights(global_step, agents, what=f"checkpoint {ckpt_path} holds")
        print(f"resumed {run_dir} at step {global_step}")
    envs.check_free_space(run_dir, 4 * envs.tensor_bytes(agents))  # weights, 2 Adam moments, slack
    envs.make_run_dir(run_dir, given_run_dir)  # only now: an argument or checkpoint error leaves no folder behind
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    sims = [envs.make_env(args.env, obs_name) for _ in range(E)]
    states = np.stack([s.reset(seed=args.seed * 100_003 + iteration * E + j)[1] for j, s in enumerate(sims)])
    ep_ret = np.zeros(E)
    disc_ret = np.zeros(E)  # running discounted return per env, for reward normalisation
    ret_stats = dict(mean=0.0, var=1.0, count=1e-4) if not args.resume else ck.get("ret_stats", dict(mean=0.0, var=1.0, count=1e-4))
    recent: list[float] = []
    t0 = time.time()

    def save_checkpoint():
        envs.check_weights(global_step, agents)  # a diverged team is never checkpointed (nor evaluated, nor shipped)
        envs.save_checkpoint(dict(agents=agents.state_dict(), optimizer=optimizer.state_dict(), alpha=alpha,
                                  global_step=global_step, iteration=iteration, wall_s=wall_before + time.time() - t0,
                                  ret_stats=ret_stats, torch_rng=torch.get_rng_state(), numpy_rng=np.random.get_state(),
                                  args=vars(args)), ckpt_path)

    def greedy_act(observations, histories):
        with torch.no_grad():
            return list(agents.dist(agents.stack_obs(observations).to(device)).mean.cpu().numpy())

    b_states = np.zeros((T, E, S), np.float32)
    b_next = np.zeros((T, E, S), np.float32)
    b_act = np.zeros((T, n_agents, E, a_dim), np.float32)
    b_rew = np.zeros((T, E), np.float32)
    b_term = np.zeros((T, E), np.float32)
    b_timeout = np.zeros((T, E), np.float32)  # ζ = 0 (here: 1 in this array) at episode or rollout ends
    b_end = np.zeros((T, E), bool)  # episode ends (terminal or time limit)
    # a plain progress line about once a minute (phase, step/total, rate, ETA), in batch logs and terminals alike
    bar = envs.PlainProgress(total=min(args.total_steps, args.stop_steps or args.total_steps), initial=global_step,
                             desc=f"MAPPO {args.env}/{obs_name}")
    while global_step < min(args.total_steps, args.stop_steps or args.total_steps):
        t_iter = time.time()
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * max(0.0, 1.0 - global_step / args.total_steps)
        # ---- collect E x T real steps with sampled actions ----
        for t in range(T):
            if args.norm_obs:
                agents.update_state_stats(states)
            with torch.no_grad():
                obs_t = agents.stack_obs(envs.split_state(args.env, obs_name, states)).to(device)
                action = agents.dist(obs_t).sample().cpu().numpy()  # [n, E, a]
            b_states[t], b_act[t] = states, action
            for j, sim in enumerate(sims):
                _, nxt, r, term, trunc = sim.step([action[i, j] for i in range(n_agents)])
                b_next[t, j], b_rew[t, j], b_term[t, j] = nxt, r, term
                b_timeout[t, j] = float(trunc or t == T - 1)
                b_end[t, j] = term or trunc
                ep_ret[j] += r
                if term or trunc:
                    recent.append(ep_ret[j])
                    writer.add_scalar("charts/episodic_return", ep_ret[j], global_step + t * E + j)
                    ep_ret[j] = 0.0
                    nxt = sim.reset()[1]
                states[j] = nxt
        global_step += E * T
        bar.update(E * T)
        iteration += 1
        t_collect = time.time() - t_iter
        rew_used = b_rew
        if args.elbow_convention != 0:  # reacher only (checked with the arguments)
            theta2 = np.arctan2(b_next[..., 3], b_next[..., 1])
            rew_used = b_rew - args.elbow_penalty * np.maximum(0.0, -args.elbow_convention * theta2)
        if args.norm_reward:
            for t in range(T):  # gymnasium NormalizeReward: running variance of the discounted return
                disc_ret = disc_ret * args.gamma + rew_used[t]
                bm, bv, bc = disc_ret.mean(), disc_ret.var(), E
                d, tot = bm - ret_stats["mean"], ret_stats["count"] + bc
                m2 = ret_stats["var"] * ret_stats["count"] + bv * bc + d**2 * ret_stats["count"] * bc / tot
                ret_stats.update(mean=ret_stats["mean"] + d * bc / tot, var=m2 / tot, count=tot)
                disc_ret[b_end[t]] = 0.0
            rew_used = rew_used / np.sqrt(ret_stats["var"] + 1e-8)

        # ---- old quantities, GAE and critic targets (docs/deviations.md §15) ----
        N = T * E
        f_states = torch.as_tensor(b_states.reshape(N, S), device=device)
        f_next = torch.as_tensor(b_next.reshape(N, S), device=device)
        f_obs = agents.stack_obs(envs.split_state(args.env, obs_name, b_states.reshape(N, S))).to(device)
        f_next_obs = agents.stack_obs(envs.split_state(args.env, obs_name, b_next.reshape(N, S))).to(device)
        f_act = torch.as_tensor(b_act.transpose(1, 0, 2, 3).reshape(n_agents, N, a_dim), device=device)
        with torch.no_grad():
            old_logp = agents.dist(f_obs).log_prob(f_act).sum((0, 2))  # joint log-prob [N]
            v_old = agents.v_tot(f_obs, f_states)
            v_next = agents.v_tot(f_next_obs, f_next).reshape(T, E)
        r, f = torch.as_tensor(rew_used, device=device), 1.0 - torch.as_tensor(b_term, device=device)
        zeta = 1.0 - torch.as_tensor(b_timeout, device=device)
        v = v_old.reshape(T, E)
        adv, ret = torch.zeros(T, E, device=device), torch.zeros(T, E, device=device)
        next_adv, next_ret = torch.zeros(E, device=device), torch.zeros(E, device=device)
        for t in reversed(range(T)):
            ret[t] = r[t] + args.gamma * f[t] * (zeta[t] * next_ret + (1 - zeta[t]) * f[t] * v_next[t])
            delta = r[t] + args.gamma * f[t] * v_next[t] - v[t]
            adv[t] = delta + args.gamma * args.gae_lambda * f[t] * zeta[t] * next_adv
            next_adv, next_ret = adv[t], ret[t]
        adv, ret = adv.reshape(N), ret.reshape(N)
        adv = (adv - adv.mean()) / (adv.std() + 1e-3)

        # ---- PPO epochs (docs/deviations.md §15) ----
        for _ in range(args.update_epochs):
            perm = torch.randperm(N, device=device)
            for start in range(0, N - args.minibatch_size + 1, args.minibatch_size):  # remainder dropped
                mb = perm[start:start + args.minibatch_size]
                d = agents.dist(f_obs[:, mb])
                logp = d.log_prob(f_act[:, mb]).sum((0, 2))
                ratio = torch.exp(torch.clamp(logp - old_logp[mb], max=10.0))  # one joint ratio for the team
                clipped = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = -torch.min(ratio * adv[mb], clipped * adv[mb]).mean()
                v_new = agents.v_tot(f_obs[:, mb], f_states[mb])
                v_clip = v_old[mb] + (v_new - v_old[mb]).clamp(-args.clip_coef, args.clip_coef)
                v_loss = torch.max(((v_clip - ret[mb]) ** 2).mean(), ((v_new - ret[mb]) ** 2).mean())
                # Adaptive entropy (docs/deviations.md §15): α grows only while the joint entropy is below target.
                entropy = torch.min(-(ratio * logp).mean(), -(clipped * logp).mean())
                if args.entropy_lr > 0:
                    alpha = max(0.0, alpha + args.entropy_lr * (args.entropy_target - entropy.item()))
                # Action-bound penalty on the means (docs/deviations.md §15).
                excess = ((1 - d.mean.abs()) ** 2 * (d.mean.abs() > 1)).sum((0, 2))
                penalty = torch.max((ratio * excess).mean(), (clipped * excess).mean())
                loss = pg_loss + args.vf_coef * v_loss - alpha * entropy + args.action_penalty_coef * penalty
                # a non-finite loss stops the run before it reaches the weights (never checkpointed, evaluated, shipped)
                envs.check_losses(global_step, policy_loss=pg_loss, value_loss=v_loss, entropy=entropy, alpha=alpha,
                                  action_penalty=penalty)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agents.policy.parameters(), args.max_grad_norm)
                nn.utils.clip_grad_norm_(list(agents.value.parameters()) + list(agents.mixer.parameters()),
                                         args.max_grad_norm)
                optimizer.step()
        sps = E * T / (time.time() - t_iter)
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        writer.add_scalar("losses/entropy", entropy.item(), global_step)
        writer.add_scalar("losses/alpha", alpha, global_step)
        writer.add_scalar("charts/mean_abs_action_mean", d.mean.abs().mean().item(), global_step)
        if args.eval_every > 0 and iteration % args.eval_every == 0:
            envs.check_weights(global_step, agents)  # a NaN policy cannot be evaluated (nor may it go on)
            eval_ret = envs.evaluate(args.env, obs_name, greedy_act, 10, seed=10101 + 1000 * iteration)
            writer.add_scalar("eval/episodic_return", eval_ret.mean(), global_step)
            print(f"step {global_step} | train return {np.mean(recent[-50:]):.2f} | greedy {eval_ret.mean():.2f} | "
                  f"SPS {sps:.0f} (collect {t_collect:.2f}s) | entropy {entropy.item():.2f} | α {alpha:.4f} | v_loss {v_loss.item():.3g}", flush=True)
        if args.checkpoint_every > 0 and iteration % args.checkpoint_every == 0:
            save_checkpoint()
    bar.close()
    save_checkpoint()  # checks the weights first: a broken team never reaches the evaluation or a summary

    # ---- final greedy evaluation and summary ----
    returns = envs.evaluate(args.env, obs_name, greedy_act, args.eval_episodes, seed=10101 + 1 + args.seed)
    ref_min = ref_max = None
    try:  # the dataset's reference scores, if it exists locally (never built here: it may need this very expert)
        data = envs.load_dataset(args.env, dataset, obs_name, build_if_missing=False)
        ref_min, ref_max = data.ref_min_score, data.ref_max_score
    except envs.MomaError:
        pass
    scores = envs.normalized_score(returns, ref_min, ref_max) if ref_min is not None and ref_max is not None else None
    wall = wall_before + time.time() - t0
    summary = dict(algorithm=pathlib.Path(__file__).stem, env=args.env, obs=obs_name, dataset_id=envs.dataset_id(args.env, dataset),
                   seed=args.seed, config=vars(args), eval_episodes=args.eval_episodes,
                   normalized_score_mean=None if scores is None else float(scores.mean()),
                   normalized_score_std=None if scores is None else float(scores.std()),
                   episode_returns=returns.tolist(),
                   episode_normalized_scores=None if scores is None else scores.tolist(),
                   train_steps=global_step, wall_time_s=wall, git_commit=git_commit())
    writer.add_scalar("eval/episodic_return", returns.mean(), global_step)
    if scores is not None:
        writer.add_scalar("eval/normalized_score", scores.mean(), global_step)
    if scores is not None:
        envs.write_summary(run_dir, summary)  # atomic; refuses non-finite scores
    elif not np.isfinite(returns).all():
        raise envs.MomaError(f"the final evaluation gave non-finite returns ({returns.mean()}); no summary was written")
    else:  # no local dataset for the reference scores: returns only
        envs.write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    import sys

    command = "python " + " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("mappo.py") else \
        f"python mappo.py --env {args.env} --obs {obs_name} --seed {args.seed} --total-steps {args.total_steps}"
    meta = dict(trained_by=command, config=vars(args),
                steps=global_step, wall_time_s=round(wall, 1), greedy_return_mean=float(returns.mean()),
                greedy_return_episodes=len(returns), git_commit=summary["git_commit"])
    save_policy_file(agents, args.env, obs_name, run_dir / "policy.pt", meta)
    if args.policy_out:
        save_policy_file(agents, args.env, obs_name, pathlib.Path(args.policy_out), meta)
    writer.close()
    print(f"final greedy return {returns.mean():.3f} +- {returns.std():.3f} over {len(returns)} episodes; "
          f"{global_step} steps in {wall:.0f}s; run {run_dir}")
    return summary


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except envs.MomaError as e:
        raise SystemExit(f"error: {e}")
