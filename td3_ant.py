"""The Ant behaviour learner of the MuJoCo datasets: single-agent TD3 (Fujimoto et al. 2018) on Ant-v5's joint action.

    python td3_ant.py                  # train from scratch (1.1M env steps, ~2 h on one core), then export
    python td3_ant.py --resume         # continue: this machine's checkpoint, else the shipped learner state
    python td3_ant.py --export-only --policy-dir behaviour_policies   # replace the shipped policies

The export goes to the learner's folder (data/behaviour/ant_td3/export/) unless --policy-dir names another one, so
that no run (nor a copy of this script) replaces the shipped files in behaviour_policies/ by accident; with
`--policy-dir behaviour_policies`, `python make_datasets.py build` then builds the Ant datasets from the new
policies (docs/usage.md). TensorBoard logs go to runs/ (CleanRL's convention).

One Ant-v5 environment, one gradient step per environment step after a uniform-random warm-up. Why TD3, not
MAPPO or PPO: the datasets store only the joint action, so a single-agent learner is what D4RL used too (its SAC
learner); and two CleanRL-style PPO runs here (8 envs, 2x256, observation normalisation, reward scaling; 1.5M and
2.7M steps) plateaued at 2,000-2,500 greedy return with collapses (greedy returns of 900-2,500 between consecutive
100k-step snapshots, exploration std shrinking to 0.05), short of the 3,000 the expert needs; off-policy TD3
reaches it in a few hundred thousand steps. TD3 runs ~190 env steps/s on one core (batch 100, fused Adam).

Every transition is kept (replay chunks under data/behaviour/ant_td3/replay/, read by `make_datasets.py build
--full-replay-source buffer`): the learner's buffer is
full-replay, as D4RL's was its learner's. The export (docs/environments.md, docs/datasets.md) ships, in
make_datasets.py's policy-file format (GaussianMLPPolicy):

* ant_expert.pt: the best greedy policy among the snapshots at >= 1M steps and the final one;
* ant_medium.pt: the (snapshot, action noise σ) whose sampled-action episodes match Table 2's medium shape;
* ant_replay_snapshots.pt: float16 snapshots from which every machine re-enacts full-replay;
* ant_td3_resume.pt: the learner's last state, so that another machine can continue it (`--resume`).

Run safety (docs/usage.md, "Run safety"): every argument is checked before any folder is made; `--resume` refuses
a checkpoint of another configuration (naming the fields; only total_steps may grow, and checkpoint_every_s /
stop_above may change); non-finite losses or weights stop the learner before a checkpoint, snapshot or export;
the disk must hold the rest of the run before training starts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import pathlib
import time
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

import envs
import make_datasets as md  # the shipped policies' format, collection, reference scores and the datasets' targets


# ==================================================================================================
# Learner: TD3, one Ant-v5 env, one update per env step
# ==================================================================================================
@dataclasses.dataclass
class Args:
    """Train the Ant behaviour learner (TD3), then export the shipped policies from it. The learner's settings are
    TD3's published defaults (Fujimoto et al. 2018; CleanRL td3_continuous_action), 2x256 ReLU nets, batch 100 as
    in the TD3 paper (the authors' later code uses 256): 2.5x less compute per update, which is what bounds this
    learner on a CPU core (~94 updates/s at 256)."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the run (default: this file's name, CleanRL's convention): its TensorBoard folder in runs/, and the
    learner folder of a copy of the script (data/behaviour/<exp_name>), so a copy never continues or overwrites the
    original's learner"""
    resume: bool = False
    """continue the learner: from its checkpoint in the learner folder if there is one, else from the shipped
    learner state (behaviour_policies/ant_td3_resume.pt), its replay buffer re-enacted from the shipped snapshots"""
    export_only: bool = False
    """only export the Ant policies from the learner's checkpoint (no training)"""
    learner_dir: Optional[str] = None
    """the learner's folder: checkpoint, replay chunks, snapshots (default: data/behaviour/ant_td3, where
    `make_datasets.py build --full-replay-source buffer` reads the replay; data/behaviour/<exp_name> for a copy)"""
    policy_dir: Optional[str] = None
    """where the export writes ant_expert.pt, ant_medium.pt, ant_replay_snapshots.pt, ant_td3_resume.pt (default:
    <learner folder>/export); `--policy-dir behaviour_policies` replaces the shipped files the datasets are built from"""

    total_steps: int = 1_100_000
    """environment steps (one gradient step each after learning_starts): D4RL's full-replay is ~1M transitions
    of its learner, so the expert is picked among the policies at >= expert_min_step (export)"""
    learning_starts: int = 25_000
    """uniform random actions first; the observation normaliser is fixed from these states"""
    batch_size: int = 100
    learning_rate: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    exploration_noise: float = 0.1
    """std of the Gaussian noise on the actor's action while collecting (also the shipped policies' noise)"""
    policy_noise: float = 0.2
    noise_clip: float = 0.5
    policy_freq: int = 2
    hidden: int = 256
    seed: int = 1
    checkpoint_every_s: float = 300.0
    """seconds between atomic checkpoints (with the replay chunk collected since the last one)"""
    snapshot_every: int = 20_000
    """steps between small policy snapshots (candidates for `medium`), each greedily evaluated"""
    snapshot_eval_episodes: int = 10
    stop_above: Optional[float] = None
    """stop once a snapshot's greedy return reaches this on a 10-episode check (None: run total_steps)"""


# What the command line adds to the learner's settings; the checkpoint records the settings only.
COMMAND_LINE_ONLY = ("resume", "export_only", "exp_name", "learner_dir", "policy_dir")
# Settings a resumed learner may change: when to checkpoint and when to stop (total_steps may only grow).
RESUME_MAY_CHANGE = ("checkpoint_every_s", "stop_above")
# The learner's final state, shipped so that another machine can continue it (`python td3_ant.py --resume`); only
# this script reads or writes it.
ANT_TD3_RESUME = md.POLICY_DIR / "ant_td3_resume.pt"
SHIPPED_FILES = ("ant_expert", "ant_medium", "ant_replay_snapshots", "ant_td3_resume")  # what export writes


def default_learner_dir(exp_name: str) -> pathlib.Path:
    return md.ANT_TRAIN_DIR if exp_name == "td3_ant" else md.TRAIN_DIR / exp_name


def check_args(args: Args) -> None:
    """Every argument, before any folder is made or any work is done (envs.check_args: the flag and a valid value)."""
    # envs.check_args asks a --resume for a --run-dir; this learner resumes its own learner folder
    envs.check_args(dataclasses.replace(args, resume=False),
                    at_least_one=("total_steps", "learning_starts", "batch_size", "policy_freq", "hidden",
                                  "snapshot_every", "snapshot_eval_episodes"),
                    non_negative=("policy_noise", "noise_clip", "checkpoint_every_s"),
                    positive=("learning_rate", "exploration_noise"), finite=("stop_above",),
                    between={"gamma": (0.0, 1.0), "tau": (0.0, 1.0)})
    for flag, folder in (("--learner-dir", args.learner_dir), ("--policy-dir", args.policy_dir)):
        if folder is not None:
            try:
                envs.check_run_dir(pathlib.Path(folder))
            except envs.MomaError as e:
                raise envs.MomaError(str(e).replace("--run-dir", flag)) from None


def load_learner_checkpoint(path: pathlib.Path) -> dict:
    """torch.load of a learner checkpoint, with a clear error for a corrupt, truncated or foreign file."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ck, dict) or "config" not in ck or "step" not in ck:
            raise ValueError("not a checkpoint of this learner (no recorded configuration)")
        return ck
    except Exception as e:
        raise envs.MomaError(f"learner checkpoint {path} is corrupt or not a checkpoint of td3_ant.py ({type(e).__name__}: "
                             f"{str(e)[:200]}); delete its folder to start again (or give another --learner-dir)") from None


def check_learner_resume(saved: dict, cfg: Args, step: int, source: pathlib.Path) -> None:
    """--resume continues the learner the checkpoint recorded, never another one (envs.check_resume: the error names
    every differing field); total_steps may only grow, checkpoint_every_s and stop_above may change."""
    keep = lambda d: {k: v for k, v in d.items() if k not in RESUME_MAY_CHANGE}  # noqa: E731
    try:
        envs.check_resume(keep(saved), keep(learner_config(cfg)), "total_steps", step, cfg.total_steps)
    except envs.MomaError as e:
        raise envs.MomaError(f"{source}: " + str(e).replace(
            "or start a new run in another --run-dir", "or start a new learner in another --learner-dir")) from None


def learner_config(args: Args) -> dict:
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in COMMAND_LINE_ONLY}


def _greedy_returns(policy: md.GaussianMLPPolicy, env: str, n_episodes: int, seed: int) -> np.ndarray:
    return md.episode_returns(policy, env, n_episodes, seed, greedy=True)[0]


def _atomic_torch_save(obj, path: pathlib.Path) -> None:
    """Atomic torch.save under a temporary name of this process's own (a full disk leaves no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch's zip writer reports a full disk as RuntimeError
            raise envs.MomaError(f"could not write {path} ({type(e).__name__}: {e}); the previous file is intact: free "
                                 f"some disk space and continue with --resume") from None
        raise


def _to_dtype(obj, dtype):
    """Floating tensors of more than one element inside nested dicts/lists cast to dtype (scalars such as Adam's step
    count and RNG states stay as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.numel() > 1 else obj
    if isinstance(obj, dict):
        return {k: _to_dtype(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_dtype(v, dtype) for v in obj)
    return obj


def _atomic_npz(path: pathlib.Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.npz")  # ends in .npz, or np.savez appends it
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise envs.MomaError(f"could not write {path} ({e.strerror}); the previous checkpoint is intact: free "
                                 f"some disk space and continue with --resume") from None
        raise


class TwinQ(nn.Module):
    """TD3's two critics as one stack of weights [2, in, out]: one bmm per layer for both."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for i, o in zip([in_dim, hidden, hidden], [hidden, hidden, 1]):
            layers = [nn.Linear(i, o) for _ in range(2)]
            self.weights.append(nn.Parameter(torch.stack([l.weight.detach().T for l in layers])))
            self.biases.append(nn.Parameter(torch.stack([l.bias.detach() for l in layers])[:, None, :]))

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """x [B, in] -> [2, B] (or [1, B] = Q1 with detached weights, for the actor's loss)."""
        k = 1 if first_only else 2
        h = x.expand(k, *x.shape)
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            w, b = (w[:1].detach(), b[:1].detach()) if first_only else (w, b)
            h = torch.baddbmm(b, h, w)
            if j < 2:
                h = torch.relu(h)
        return h.squeeze(-1)


def _td3_chunk(buf: dict, lo: int, hi: int, current_obs: np.ndarray) -> dict:
    """Replay rows [lo, hi) in the replay-chunk layout of replay_episodes (one environment stream)."""
    ends = np.flatnonzero(buf["term"][lo:hi] | buf["trunc"][lo:hi])
    return dict(obs=buf["obs"][lo:hi, None], act=buf["act"][lo:hi, None], rew=buf["rew"][lo:hi, None],
                term=buf["term"][lo:hi, None], trunc=buf["trunc"][lo:hi, None],
                final_idx=np.stack([ends, np.zeros_like(ends)], 1).astype(np.int64).reshape(-1, 2),
                final_obs=buf["next_obs"][lo:hi][ends].reshape(-1, buf["obs"].shape[1]),
                obs_last=current_obs[None].astype(np.float32))


def load_td3_replay(out_dir: pathlib.Path, up_to_step: int) -> dict:
    """The TD3 learner's replay buffer rows [0, up_to_step), rebuilt from its replay chunks: next_obs[t] is
    obs[t + 1] inside an episode, the stored final state at an episode end, `obs_last` at a chunk's end."""
    files = sorted(f for f in (out_dir / "replay").glob("chunk_*.npz") if int(f.stem.split("_")[1]) <= up_to_step)
    parts = {k: [] for k in ("obs", "next_obs", "act", "rew", "term", "trunc")}
    for f in files:
        z = np.load(f)
        for k in ("obs", "act", "rew", "term", "trunc"):
            parts[k].append(z[k][:, 0])
        nxt = np.concatenate([z["obs"][1:, 0], z["obs_last"]])
        nxt[z["final_idx"][:, 0]] = z["final_obs"]
        parts["next_obs"].append(nxt)
    out = {k: np.concatenate(v) for k, v in parts.items()} if files else {}
    if not files or len(out["rew"]) != up_to_step:
        raise envs.MomaError(f"the replay chunks in {out_dir / 'replay'} hold {len(out.get('rew', []))} rows, not "
                             f"{up_to_step}; delete {out_dir} and retrain")
    return out


def train(cfg: Args, out_dir: Optional[pathlib.Path] = None, max_wall_s: Optional[float] = None,
          log=print) -> pathlib.Path:
    """Train the Ant behaviour policy with TD3 (cfg.resume: continue); every transition is kept (replay chunks)
    for full-replay.

    Resumable: `out_dir/checkpoint.pt` holds the networks, optimisers, normaliser, RNG states and step;
    `out_dir/replay/chunk_<step>.npz` every transition up to it (the replay buffer is rebuilt from them);
    `out_dir/snapshots/step_<step>.pt` small greedily-evaluated policies. Returns out_dir (default: the learner
    folder, see Args.learner_dir). TensorBoard logs go to runs/<ant__full__online__exp_name__seed__time>.
    """
    torch.set_num_threads(1)
    from torch.utils.tensorboard import SummaryWriter

    check_args(cfg)  # also here: train() is called directly too (tests, notebooks)
    out_dir = pathlib.Path(out_dir if out_dir is not None else cfg.learner_dir or default_learner_dir(cfg.exp_name))
    envs.check_run_dir(out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    ck, source = None, None
    if cfg.resume and ckpt_path.exists():
        ck, source = load_learner_checkpoint(ckpt_path), ckpt_path
    elif cfg.resume and ANT_TD3_RESUME.exists():
        # Another machine: the learner's state is shipped (small), its 1M transitions are not (260 MB), so the replay
        # buffer is re-enacted from the shipped snapshots (as full-replay is) and training goes on from there.
        ck, source = _to_dtype(load_learner_checkpoint(ANT_TD3_RESUME), torch.float32), ANT_TD3_RESUME
    elif cfg.resume:
        raise envs.MomaError(f"--resume: no learner checkpoint in {out_dir} and no shipped learner state "
                             f"{ANT_TD3_RESUME} (restore it from git); drop --resume to train from scratch")
    elif ckpt_path.exists():
        raise envs.MomaError(f"{ckpt_path} exists; pass --resume to continue it, or delete {out_dir} to restart")
    if ck is not None:  # refuse another configuration before any work (the checkpoint records the settings)
        check_learner_resume(ck["config"], cfg, ck["step"], source)

    S, A, N = envs.STATE_DIM["ant"], envs.JOINT_ACTION_DIM["ant"], cfg.total_steps
    actor = md.GaussianMLPPolicy(S, A, cfg.hidden, activation="relu", squash=True)
    with torch.no_grad():  # the shipped policy samples N(π(s), exploration_noise²), as TD3 collected
        actor.log_std.fill_(math.log(cfg.exploration_noise))
    actor.log_std.requires_grad_(False)
    critic = TwinQ(S + A, cfg.hidden)
    target_actor, target_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    # fused Adam: one kernel per step instead of one per parameter (~1.25x on small-batch updates on CPU)
    actor_opt = torch.optim.Adam(actor.mean_net.parameters(), lr=cfg.learning_rate, fused=True)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.learning_rate, fused=True)
    buf = dict(obs=np.zeros((N, S), np.float32), next_obs=np.zeros((N, S), np.float32), act=np.zeros((N, A), np.float32),
               rew=np.zeros(N, np.float32), term=np.zeros(N, bool), trunc=np.zeros(N, bool))
    step, n_resumes, wall_before, next_snapshot, saved = 0, 0, 0.0, cfg.snapshot_every, 0
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    nets = (actor, critic, target_actor, target_critic)

    def restore(ck: dict) -> tuple:
        """Networks, optimisers and RNG states from a learner checkpoint (this machine's or the shipped one)."""
        try:
            for module, key in ((actor, "actor"), (critic, "critic"), (target_actor, "target_actor"),
                                (target_critic, "target_critic"), (actor_opt, "actor_opt"), (critic_opt, "critic_opt")):
                module.load_state_dict(ck[key])
            torch.set_rng_state(ck["torch_rng"])
            gen.set_state(ck["gen"])
            rng.bit_generator.state = ck["numpy_rng"]
            out = ck["step"], ck["n_resumes"] + 1, ck["wall_s"], ck["next_snapshot"]
        except Exception as e:
            raise envs.MomaError(f"learner checkpoint {source} does not fit this learner ({type(e).__name__}: "
                                 f"{str(e)[:200]}); start a new learner in another --learner-dir") from None
        envs.check_weights(out[0], *nets, what=f"learner checkpoint {source} holds")
        return out

    # the disk must hold the rest of the run now, not at its first checkpoint: the replay chunks still to come
    # (uncompressed rows) and the checkpoint (weights, targets, two Adam moments)
    row_bytes = 4 * (2 * S + A + 1) + 2
    remaining = N - (ck["step"] if ck is not None else 0)
    envs.check_free_space(out_dir, 4 * envs.tensor_bytes(actor, critic) + remaining * row_bytes)
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: an argument or checkpoint error leaves no folder behind
    (out_dir / "replay").mkdir(exist_ok=True)
    (out_dir / "snapshots").mkdir(exist_ok=True)
    tb_dir = None
    if source == ckpt_path:
        step, n_resumes, wall_before, next_snapshot = restore(ck)
        for f in (out_dir / "replay").glob("chunk_*.npz"):  # rows written after the checkpoint are dropped
            if int(f.stem.split("_")[1]) > step:
                f.unlink()
        for k, v in load_td3_replay(out_dir, step).items():
            buf[k][:step] = v
        saved = step
        tb_dir = ck.get("tb_dir")  # the same TensorBoard run goes on
        log(f"resumed {ckpt_path} at step {step} (resume #{n_resumes})")
    elif ck is not None:
        step, n_resumes, wall_before, next_snapshot = restore(ck)
        row = 0
        for ep in md.snapshot_replay(step, seed=cfg.seed):
            t = len(ep["rewards"])
            buf["obs"][row:row + t], buf["next_obs"][row:row + t] = ep["observations"][:-1], ep["observations"][1:]
            buf["act"][row:row + t], buf["rew"][row:row + t] = ep["actions"], ep["rewards"]
            buf["term"][row:row + t], buf["trunc"][row:row + t] = ep["terminations"], ep["truncations"]
            row += t
        log(f"resumed the shipped learner state {ANT_TD3_RESUME} at step {step} (resume #{n_resumes}); its replay "
            f"buffer was re-enacted from the shipped snapshots")
    del ck
    if tb_dir is None or not pathlib.Path(tb_dir).is_dir():  # CleanRL's runs/<run name>
        tb_dir = str(envs.default_run_dir("ant", envs.DEFAULT_OBS["ant"], "online", cfg.exp_name, cfg.seed).resolve())
    writer = SummaryWriter(tb_dir)
    sim = envs.make_single_agent_env("ant")
    # Environment states cannot be checkpointed: a resumed run starts a fresh episode.
    obs = sim.reset(seed=cfg.seed * 100_003 + n_resumes)[0].astype(np.float32)
    ep_ret, recent = 0.0, []
    t_start, t_ckpt, t_log, step_log = time.time(), time.time(), time.time(), step
    torch_buf = {k: torch.from_numpy(v) for k, v in buf.items()}  # shares memory with the numpy buffer

    def save_checkpoint():
        nonlocal saved
        # a diverged learner is never checkpointed (nor its replay chunk written): the last good checkpoint stays
        envs.check_losses(step, critic_loss=critic_loss, actor_loss=actor_loss)
        envs.check_weights(step, *nets)
        if step > saved:
            _atomic_npz(out_dir / "replay" / f"chunk_{step:010d}.npz", **_td3_chunk(buf, saved, step, obs))
            saved = step
        _atomic_torch_save(dict(actor=actor.state_dict(), critic=critic.state_dict(), target_actor=target_actor.state_dict(),
                                target_critic=target_critic.state_dict(), actor_opt=actor_opt.state_dict(),
                                critic_opt=critic_opt.state_dict(), step=step, n_resumes=n_resumes,
                                wall_s=wall_before + time.time() - t_start, next_snapshot=next_snapshot,
                                torch_rng=torch.get_rng_state(), gen=gen.get_state(), numpy_rng=rng.bit_generator.state,
                                config=learner_config(cfg), tb_dir=tb_dir), ckpt_path)

    stop = False
    critic_loss = actor_loss = torch.zeros(())
    while step < N and not stop:
        if max_wall_s is not None and time.time() - t_start > max_wall_s:
            break
        if step < cfg.learning_starts:
            action = rng.uniform(-1.0, 1.0, A).astype(np.float32)
        else:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs)[None])[0].numpy()
            action = np.clip(action + rng.normal(0.0, cfg.exploration_noise, A), -1.0, 1.0).astype(np.float32)
        nxt, r, term, trunc, _ = sim.step(action)
        buf["obs"][step], buf["act"][step], buf["rew"][step] = obs, action, r
        buf["term"][step], buf["trunc"][step], buf["next_obs"][step] = term, trunc, nxt
        ep_ret += r
        step += 1
        obs = nxt.astype(np.float32)
        if term or trunc:
            recent.append(ep_ret)
            writer.add_scalar("charts/episodic_return", ep_ret, step)
            ep_ret = 0.0
            obs = sim.reset()[0].astype(np.float32)
        if step == cfg.learning_starts:  # fix the observation normaliser from the random warm-up states
            with torch.no_grad():
                for net in (actor, target_actor):
                    net.obs_mean.copy_(torch.as_tensor(buf["obs"][:step].mean(0)))
                    net.obs_var.copy_(torch.as_tensor(buf["obs"][:step].var(0)))
        if step >= cfg.learning_starts:
            idx = torch.randint(0, step, (cfg.batch_size,), generator=gen)
            # the fixed normaliser lives in the actor's buffers (the target actor holds the same values)
            o, o2 = actor.normalize(torch_buf["obs"][idx]), actor.normalize(torch_buf["next_obs"][idx])
            a, rew, done = torch_buf["act"][idx], torch_buf["rew"][idx], torch_buf["term"][idx].float()
            with torch.no_grad():  # target policy smoothing, clipped double-Q (TD3)
                noise = (torch.randn(a.shape, generator=gen) * cfg.policy_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
                a2 = (torch.tanh(target_actor.mean_net(o2)) + noise).clamp(-1.0, 1.0)
                y = rew + cfg.gamma * (1.0 - done) * target_critic(torch.cat([o2, a2], 1)).min(0).values
            critic_loss = (critic(torch.cat([o, a], 1)) - y).pow(2).mean(1).sum()
            critic_opt.zero_grad(set_to_none=True)
            critic_loss.backward()
            critic_opt.step()
            if step % cfg.policy_freq == 0:  # delayed policy and target updates
                actor_loss = -critic(torch.cat([o, torch.tanh(actor.mean_net(o))], 1), first_only=True).mean()
                actor_opt.zero_grad(set_to_none=True)
                actor_loss.backward()
                actor_opt.step()
                with torch.no_grad():
                    for t, src in ((target_actor.mean_net, actor.mean_net), (target_critic, critic)):
                        for tp, sp in zip(t.parameters(), src.parameters()):
                            tp.lerp_(sp, cfg.tau)
        if step % 5000 == 0:
            sps = (step - step_log) / max(time.time() - t_log, 1e-9)
            t_log, step_log = time.time(), step
            writer.add_scalar("charts/SPS", sps, step)
            writer.add_scalar("losses/critic_loss", critic_loss.item(), step)
            writer.add_scalar("losses/actor_loss", actor_loss.item(), step)
            last10 = float(np.mean(recent[-10:])) if recent else float("nan")
            eta_min = (cfg.total_steps - step) / max(sps, 1e-9) / 60  # a plain progress line for batch logs
            log(f"step {step}/{cfg.total_steps} | train return (last 10 eps) {last10:.1f} | SPS {sps:.0f} | "
                f"ETA {eta_min:.0f} min | critic_loss {critic_loss.item():.3f} | "
                f"wall {wall_before + time.time() - t_start:.0f}s")
            envs.check_losses(step, critic_loss=critic_loss, actor_loss=actor_loss)
        if step >= next_snapshot and step >= cfg.learning_starts:
            envs.check_weights(step, actor, what="the learner has")  # a NaN policy is never a snapshot
            rets = _greedy_returns(actor, "ant", cfg.snapshot_eval_episodes, seed=777)
            if cfg.stop_above is not None and rets.mean() >= cfg.stop_above:
                if len(rets) < 10:  # confirm on 10 episodes before stopping
                    rets = np.concatenate([rets, _greedy_returns(actor, "ant", 10 - len(rets), seed=778)])
                stop = rets.mean() >= cfg.stop_above
            snap = md.export_gaussian_policy(actor, dict(step=step, greedy_return_mean=float(rets.mean()),
                                                      greedy_return_episodes=len(rets)))
            _atomic_torch_save(snap, out_dir / "snapshots" / f"step_{step:010d}.pt")
            writer.add_scalar("eval/greedy_return", rets.mean(), step)
            log(f"snapshot at step {step}: greedy return {rets.mean():.1f} +- {rets.std():.1f} ({len(rets)} episodes), "
                f"wall {wall_before + time.time() - t_start:.0f}s" + (" -> stopping" if stop else ""))
            next_snapshot += cfg.snapshot_every
        if time.time() - t_ckpt > cfg.checkpoint_every_s:
            save_checkpoint()
            t_ckpt = time.time()
    save_checkpoint()
    writer.close()
    return out_dir


def list_snapshots(out_dir: pathlib.Path = md.ANT_TRAIN_DIR) -> list[tuple[int, float, pathlib.Path]]:
    """(step, greedy return of its quick evaluation, path) of every saved learner snapshot, by step."""
    snaps = []
    for f in sorted((out_dir / "snapshots").glob("step_*.pt")):
        meta = torch.load(f, weights_only=False)["meta"]
        snaps.append((meta["step"], meta["greedy_return_mean"], f))
    return snaps


# ==================================================================================================
# Exporting the small shipped policies from the learner's run
# ==================================================================================================
def _td3_actor(ck: dict) -> md.GaussianMLPPolicy:
    actor = md.GaussianMLPPolicy(envs.STATE_DIM["ant"], envs.JOINT_ACTION_DIM["ant"], ck["config"]["hidden"],
                              activation="relu", squash=True)
    actor.load_state_dict(ck["actor"])
    return actor.eval()


def _snapshot_policy(path: pathlib.Path, noise: Optional[float] = None) -> md.GaussianMLPPolicy:
    policy = md.load_gaussian_policy(torch.load(path, weights_only=False))
    if noise is not None:
        with torch.no_grad():
            policy.log_std.fill_(math.log(noise))
    return policy


def _share_of_expert(scores_pct: np.ndarray, expert_mean_pct: float) -> tuple[float, float]:
    """(mean, median) of normalised episode scores as % of the expert dataset's mean score (Table 2's shape)."""
    return 100 * float(np.mean(scores_pct)) / expert_mean_pct, 100 * float(np.median(scores_pct)) / expert_mean_pct


def search_medium(out_dir: pathlib.Path = md.ANT_TRAIN_DIR, noises=(0.1, 0.2, 0.3), n_episodes: int = 20,
                  n_confirm: int = 100, greedy_range=(0.4, 1.0), max_snapshots: int = 12, seed: int = 50505,
                  log=print) -> dict:
    """Pick the Ant `medium` behaviour policy: the (learner snapshot, action noise σ) whose sampled-action
    episodes have the mean and median score closest to Table 2's shape (68% / 81% of the expert dataset's mean;
    distance = the larger of the two gaps). Candidates: every snapshot before the expert whose quick greedy
    return lies in greedy_range x the expert's, each with every σ in noises, n_episodes each; the 3 closest are
    re-measured on n_confirm episodes and the closest of those wins (at most max_snapshots snapshots, evenly spaced,
    to bound the cost: ~6 s per candidate on one core). Returns the choice and every row measured."""
    expert = md.load_policy(md.SHIPPED["ant_expert"])  # the expert just exported (see export's _expert_at)
    ref_min, ref_max = md.reference_scores("ant")
    to_pct = lambda r: 100 * (np.asarray(r) - ref_min) / (ref_max - ref_min)  # noqa: E731
    expert_rets, _ = md.episode_returns(expert, "ant", n_confirm, seed, greedy=False)  # the expert dataset's policy
    expert_mean = float(to_pct(expert_rets).mean())
    learning_starts = load_learner_checkpoint(out_dir / "checkpoint.pt")["config"]["learning_starts"]
    snaps = [sn for sn in list_snapshots(out_dir) if learning_starts < sn[0] < expert.meta["step"]
             and min(g * ref_max for g in greedy_range) <= sn[1] <= max(g * ref_max for g in greedy_range)]
    if len(snaps) > max_snapshots:
        snaps = [snaps[i] for i in np.unique(np.linspace(0, len(snaps) - 1, max_snapshots).round().astype(int))]
    target_mean, target_median = md.ANT_MEDIUM_TARGET

    def measure(step, path, noise, n):
        rets, lengths = md.episode_returns(_snapshot_policy(path, noise), "ant", n, seed + 1, greedy=False)
        mean, median = _share_of_expert(to_pct(rets), expert_mean)
        return dict(step=step, noise=noise, episodes=n, mean_share=mean, median_share=median,
                    distance=max(abs(mean - target_mean), abs(median - target_median)),
                    fell_share=float((lengths < envs.EPISODE_STEPS["ant"]).mean()), mean_return=float(rets.mean()))

    rows = []
    for step, _, path in snaps:
        for noise in noises:
            rows.append(measure(step, path, noise, n_episodes))
            r = rows[-1]
            log(f"medium candidate step {step:>7} σ {noise:.2f}: mean {r['mean_share']:5.1f}% median "
                f"{r['median_share']:5.1f}% of the expert set's mean, {100 * r['fell_share']:.0f}% of episodes fell")
    if not rows:
        raise envs.MomaError(f"no learner snapshot in {out_dir / 'snapshots'} has a greedy return in {greedy_range} x "
                             f"the expert's; train longer or widen the range")
    paths = {step: path for step, _, path in snaps}
    confirmed = [measure(r["step"], paths[r["step"]], r["noise"], n_confirm)
                 for r in sorted(rows, key=lambda r: r["distance"])[:3]]
    best = min(confirmed, key=lambda r: r["distance"])
    log(f"medium: step {best['step']} with σ {best['noise']}: mean {best['mean_share']:.1f}% / median "
        f"{best['median_share']:.1f}% of the expert set's mean over {n_confirm} episodes (target {target_mean:.0f} / "
        f"{target_median:.0f})")
    return dict(choice=best, candidates=rows, confirmed=confirmed, expert_set_mean_pct=expert_mean,
                path=paths[best["step"]])


@contextlib.contextmanager
def _expert_at(path: pathlib.Path):
    """make_datasets reads the Ant expert (reference scores, keyed by the file's hash) at md.SHIPPED["ant_expert"]:
    point it at the expert being exported for the duration of the export, wherever that is written."""
    before = md.SHIPPED
    md.SHIPPED = {**before, "ant_expert": path}
    try:
        yield
    finally:
        md.SHIPPED = before


def export(out_dir: pathlib.Path = md.ANT_TRAIN_DIR, policy_dir: Optional[pathlib.Path] = None,
           n_replay_snapshots: int = 16, eval_episodes: int = 20, expert_min_step: int = md.EXPERT_MIN_STEP,
           medium_search: Optional[dict] = None, log=print) -> dict:
    """Export the Ant policies from the learner's run into policy_dir (default: out_dir/export; the shipped ones
    only with policy_dir = behaviour_policies) as SHIPPED_FILES:

    * expert = the best greedy policy (eval_episodes each) among the snapshots at >= expert_min_step and the
      final one (the learner's greedy return swings by several hundred between snapshots);
    * medium = search_medium's (snapshot, σ);
    * n_replay_snapshots float16 snapshots for re-enacting full-replay: the learner's steps from its warm-up to
      the expert cut into equal intervals, each re-enacted by the snapshot nearest the interval's middle.
    """
    policy_dir = pathlib.Path(policy_dir) if policy_dir is not None else out_dir / "export"
    paths = {name: policy_dir / f"{name}.pt" for name in SHIPPED_FILES}
    ck = load_learner_checkpoint(out_dir / "checkpoint.pt")
    cfg, cmd = ck["config"], "python td3_ant.py [--resume]"
    final = _td3_actor(ck)
    envs.check_weights(ck["step"], final, what=f"learner checkpoint {out_dir / 'checkpoint.pt'} holds")
    snaps = [sn for sn in list_snapshots(out_dir) if cfg["learning_starts"] <= sn[0] <= ck["step"]]
    candidates = [(ck["step"], final)] + [(st, _snapshot_policy(path)) for st, _, path in snaps
                                          if expert_min_step <= st < ck["step"]]
    scored = []
    for st, policy in candidates:
        rets = md.policy_returns("ant", policy, eval_episodes, seed=40404)
        scored.append((float(rets.mean()), st, policy))
        log(f"expert candidate at step {st}: greedy return {rets.mean():.1f} over {eval_episodes} episodes")
    expert_ret, expert_step, expert_actor = max(scored, key=lambda t: t[0])
    expert = md.export_gaussian_policy(expert_actor, dict(step=expert_step, greedy_return_mean=expert_ret,
                                                       greedy_return_episodes=eval_episodes, trained_by=cmd,
                                                       wall_time_s=round(ck["wall_s"], 1), config=cfg,
                                                       candidates={st: r for r, st, _ in scored}))
    _atomic_torch_save(expert, paths["ant_expert"])
    with _expert_at(paths["ant_expert"]):  # medium and the replay statistics are measured against the new expert
        search = search_medium(out_dir, log=log, **(medium_search or {}))
        choice = search["choice"]
        medium_actor = _snapshot_policy(search["path"], choice["noise"])
        medium = md.export_gaussian_policy(medium_actor, dict(
            step=choice["step"], noise=choice["noise"], expert_step=expert_step, trained_by=cmd,
            greedy_return_mean=float(md.policy_returns("ant", medium_actor, eval_episodes, seed=40404).mean()),
            greedy_return_episodes=eval_episodes, search={k: v for k, v in search.items() if k != "path"}))
        _atomic_torch_save(medium, paths["ant_medium"])

        bounds = np.linspace(cfg["learning_starts"], expert_step, n_replay_snapshots + 1).round().astype(int)
        by_step = {st: path for st, _, path in snaps}
        by_step.setdefault(ck["step"], None)
        replay = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            st = min(by_step, key=lambda x: abs(x - (lo + hi) / 2))
            blob = md.export_gaussian_policy(final, {}) if by_step[st] is None else torch.load(by_step[st], weights_only=False)
            blob["state_dict"] = {n: v.half() for n, v in blob["state_dict"].items()}
            blob["meta"] = dict(blob.get("meta", {}), step=int(st), covers=[int(lo), int(hi)])
            replay.append(blob)
        # The statistics of the learner's real buffer (on this machine only), kept beside the snapshots so that the
        # cards can show how close the re-enactment that every other machine builds comes to it.
        ref_min, ref_max = md.reference_scores("ant")
        buf = load_td3_replay(out_dir, ck["step"])
        ends = np.flatnonzero((buf["term"] | buf["trunc"])[:expert_step])  # the episodes finished by the expert's step
        buffer_returns = np.diff(np.concatenate([[0.0], np.cumsum(buf["rew"][:expert_step], dtype=np.float64)[ends]]))
        buffer_pct = 100 * (buffer_returns - ref_min) / (ref_max - ref_min)
        buffer_stats = dict(episodes=len(buffer_returns), transitions=int(expert_step), min_score_pct=float(buffer_pct.min()),
                            mean_score_pct=float(buffer_pct.mean()), median_score_pct=float(np.median(buffer_pct)),
                            max_score_pct=float(buffer_pct.max()), ref_min=ref_min, ref_max=ref_max)
        _atomic_torch_save(dict(snapshots=replay, learning_starts=cfg["learning_starts"], expert_step=expert_step,
                                buffer_stats=buffer_stats), paths["ant_replay_snapshots"])
        # What another machine needs to continue the learner (`python td3_ant.py --resume`): networks, optimisers and RNG states
        # of its last checkpoint; its transitions are re-enacted there (see train).
        # Weights and Adam moments in bfloat16 (fp32's exponent range, half the bytes: the shipped files stay small).
        _atomic_torch_save({k: _to_dtype(ck[k], torch.bfloat16) for k in (
            "actor", "critic", "target_actor", "target_critic", "actor_opt", "critic_opt", "step", "n_resumes", "wall_s",
            "next_snapshot", "torch_rng", "gen", "numpy_rng", "config")}, paths["ant_td3_resume"])
        info = dict(expert_step=expert_step, expert_greedy_return=expert_ret, medium_step=choice["step"],
                    medium_noise=choice["noise"], medium_mean_share=choice["mean_share"],
                    medium_median_share=choice["median_share"], train_wall_s=ck["wall_s"],
                    replay_snapshot_steps=[b["meta"]["step"] for b in replay])
    log(f"exported Ant policies to {paths['ant_expert'].parent}: {info}")
    return info


def main(args: Args) -> dict:
    torch.set_num_threads(1)  # small networks, one environment: extra threads only spin against other jobs
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    check_args(args)
    out_dir = pathlib.Path(args.learner_dir) if args.learner_dir else default_learner_dir(args.exp_name)
    if args.export_only and not (out_dir / "checkpoint.pt").exists():
        raise envs.MomaError(f"--export-only: no learner checkpoint in {out_dir}; train first (python td3_ant.py)")
    if not args.export_only:
        train(args, out_dir, log=log)
    info = export(out_dir, args.policy_dir, log=log)
    if args.policy_dir is None:
        log(f"the shipped policies are unchanged; to ship these: python {args.exp_name}.py --export-only "
            f"--policy-dir behaviour_policies (or copy {out_dir / 'export'}/*.pt there), then python make_datasets.py build")
    return info


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except envs.MomaError as e:
        raise SystemExit(f"error: {e}")
