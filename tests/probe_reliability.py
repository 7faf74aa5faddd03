"""Reliability probe (docs/usage.md, "Run safety"): tries bad inputs and injects faults, one subprocess per
case, and counts how many are handled.

    python tests/probe_reliability.py                # 8-80 min on a shared 2-core machine
    python tests/probe_reliability.py --only resume  # the cases whose name contains "resume"
    python tests/probe_reliability.py --repo /tmp/old-checkout   # measure another checkout (e.g. before a fix)

Not a pytest module (its name does not start with test_): it is the re-runnable measurement behind the
figures in docs/usage.md ("Run safety"). Everything it writes (datasets, caches, run folders) lives in a
temporary folder; a tiny random reacher dataset stands in for the real one so that the TD3 family runs in
seconds.

* A bad input is handled when the script exits non-zero with a message (a one-line `error: ...`, or tyro's
  own parsing error), no Python traceback, and leaves no run folder behind.
* A fault survives when no wrong result comes out: the script stops with a clean error and writes no
  summary.json (nor leaves a half-written checkpoint), or it exits 0 with the correct result.
* Controls are legitimate uses (resuming with the same configuration, extending a run) that must keep working.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--repo", default=str(pathlib.Path(__file__).resolve().parents[1]), help="checkout to probe")
parser.add_argument("--only", default="", help="run only the cases whose name contains this")
parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
parser.add_argument("-v", "--verbose", action="store_true", help="print every case's stderr tail")
cli = parser.parse_args()
REPO = pathlib.Path(cli.repo).resolve()
WORK = pathlib.Path(tempfile.mkdtemp(prefix="moma-probe-"))
ENV = dict(os.environ, MINARI_DATASETS_PATH=str(WORK / "minari"), MOMA_CACHE_DIR=str(WORK / "cache"),
           HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")

# Small budgets: every case runs in seconds (most of it is Python start-up and imports).
GAME = ["--env", "coordination", "--torch-threads", "1", "--eval-episodes", "10"]
SMALL = {
    "iql.py": GAME + ["--dataset", "neutral", "--seed", "3", "--total-steps", "200", "--hidden", "32",
                      "--eval-every", "0", "--checkpoint-every", "50"],
    "ibc.py": GAME + ["--dataset", "neutral", "--seed", "3", "--total-steps", "200", "--hidden", "32",
                      "--eval-every", "0", "--checkpoint-every", "50"],
    "maiql.py": GAME + ["--dataset", "neutral", "--seed", "3", "--total-steps", "200", "--hidden", "32",
                        "--eval-every", "0", "--checkpoint-every", "50"],
    "moma_ppo.py": GAME + ["--dataset", "neutral", "--seed", "3", "--iterations", "4", "--rollout-batch", "256",
                           "--minibatch-size", "256", "--eval-every", "2", "--eval-episodes-during", "2",
                           "--checkpoint-every", "2"],
}
for _script in ("itd3bc.py", "icql.py", "omar.py"):
    SMALL[_script] = ["--env", "reacher", "--obs", "independent", "--dataset", "expert-mix", "--seed", "3",
                      "--torch-threads", "1", "--total-steps", "20", "--batch-size", "32", "--hidden", "16",
                      "--history-dim", "8", "--eval-every", "0", "--eval-episodes", "1", "--checkpoint-every", "10"]
    if _script != "itd3bc.py":
        SMALL[_script] += ["--cql-samples", "2"]
LENGTH_FLAG = {s: "--iterations" if s == "moma_ppo.py" else "--total-steps" for s in SMALL}
SCRIPTS = list(SMALL)


def with_flags(script: str, **changes) -> list:
    """SMALL[script] with some flags replaced (flag names with underscores) or added."""
    args = list(SMALL[script])
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in args:
            i = args.index(flag)
            args[i + 1:i + 2] = [str(value)]
        else:
            args += [flag, str(value)]
    return args


def run(script: str, args: list, inject: str = "", env: dict | None = None, cwd=None, timeout: int = 600,
        background: bool = False):
    """Run `python script args` (with `inject` executed first in the same interpreter, to patch a fault in)."""
    path = str(REPO / script)
    if inject:
        code = (textwrap.dedent(inject) + f"\nimport runpy, sys\nsys.argv = [{path!r}] + {list(map(str, args))!r}\n"
                f"runpy.run_path({path!r}, run_name='__main__')\n")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, path] + list(map(str, args))
    popen = subprocess.Popen(cmd, cwd=str(cwd or WORK), env=env or ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    if background:
        return popen
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, err = popen.communicate()
    return popen.returncode, out, err


def python(code: str, env: dict | None = None, background: bool = False):
    popen = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=str(WORK), env=env or ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if background:
        return popen
    out, err = popen.communicate()
    return popen.returncode, out, err


def clean_error(rc: int, err: str) -> bool:
    """Non-zero exit with a message and no traceback: `error: ...` (MomaError) or tyro's parsing error (exit 2)."""
    if rc == 0 or "Traceback" in err:
        return False
    lines = [l for l in err.strip().splitlines() if l.strip()]
    return bool(lines) and (lines[-1].startswith("error: ") or rc == 2)


def tail(err: str, n: int = 3) -> str:
    return " | ".join(l.strip()[:160] for l in err.strip().splitlines()[-n:])


results = {"bad input": [], "fault": [], "control": []}


def record(kind: str, name: str, ok: bool, detail: str = "") -> None:
    results[kind].append((name, ok))
    mark = "ok  " if ok else "FAIL"
    print(f"[{kind:9s}] {mark} {name}" + (f"  -- {detail}" if (detail and (not ok or cli.verbose)) else ""), flush=True)


def wanted(name: str) -> bool:
    return cli.only in name


# --------------------------------------------------------------------------------------------------
# Set-up: coordination datasets (built by the scripts), a tiny reacher dataset, finished base runs to resume.
# --------------------------------------------------------------------------------------------------
def write_tiny_reacher(env: dict) -> None:
    rc, _, err = python("""
        import numpy as np, envs
        rng = np.random.default_rng(0)
        episodes = []
        for j in range(4):
            sim = envs.make_single_agent_env("reacher")
            s, _ = sim.reset(seed=j)
            obs, acts, rews = [s], [], []
            for t in range(50):
                a = rng.uniform(-1, 1, 2).astype(np.float32)
                s, r, term, trunc, _ = sim.step(a)
                obs.append(s), acts.append(a), rews.append(r)
            episodes.append(dict(observations=np.array(obs, np.float32), actions=np.array(acts), rewards=np.array(rews),
                                 terminations=np.zeros(50, bool), truncations=np.arange(50) == 49))
        envs.write_minari_dataset("reacher", "expert-mix", episodes, -11.1, -4.2, "uniform random", "probe dataset")
    """, env=env)
    assert rc == 0, err


def base_run(script: str) -> pathlib.Path:
    """A finished run of `script` at SMALL's flags (made once, copied by the cases that resume it)."""
    folder = WORK / "base" / script.replace(".py", "")
    if not (folder / "summary.json").exists():
        rc, _, err = run(script, SMALL[script] + ["--run-dir", folder])
        assert rc == 0, f"base run of {script} failed: {tail(err, 8)}"
    return folder


def reference_run(script: str) -> pathlib.Path:
    """A second finished run at SMALL's flags, made after the base run, so that its world model (MOMA-PPO) is loaded
    from the cache as in every later case, never trained in the same process (see the control below)."""
    base_run(script)
    folder = WORK / "reference" / script.replace(".py", "")
    if not (folder / "summary.json").exists():
        rc, _, err = run(script, SMALL[script] + ["--run-dir", folder])
        assert rc == 0, f"reference run of {script} failed: {tail(err, 8)}"
    return folder


def copy_of_base(script: str, name: str) -> pathlib.Path:
    dest = WORK / "cases" / name
    shutil.copytree(base_run(script), dest)
    return dest


def summary_of(run_dir: pathlib.Path):
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        return "invalid JSON"


def leftovers(run_dir: pathlib.Path) -> list:
    return [p.name for p in run_dir.glob("*.tmp")] if run_dir.exists() else []


# --------------------------------------------------------------------------------------------------
# Bad inputs: each must stop at once with a clean error and no run folder left behind.
# --------------------------------------------------------------------------------------------------
A_FILE = WORK / "a_file.txt"
BAD_INPUTS = {
    "moma_ppo.py": [("iterations", 0), ("iterations", -5), ("eval_episodes", 0), ("rollout_horizon", 0),
                    ("rollout_batch", 0), ("minibatch_size", 0), ("checkpoint_every", 0), ("eval_every", 0),
                    ("eval_episodes_during", 0), ("update_epochs", 0), ("hidden_dim", 0), ("lambda_g", "nan"),
                    ("lambda_r", "inf"), ("learning_rate", -1), ("learning_rate", "nan"), ("gamma", "nan"),
                    ("clip_coef", -0.1), ("seed", -1), ("torch_threads", 0), ("dataset", "bogus")],
    "iql.py": [("total_steps", 0), ("total_steps", -5), ("eval_episodes", 0), ("batch_size", 0), ("beta", "nan"),
               ("learning_rate", -1), ("learning_rate", "inf"), ("expectile", 1.5), ("gamma", "nan"), ("tau", "nan"),
               ("seed", -1), ("torch_threads", 0), ("hidden", 0), ("eval_every", -1), ("checkpoint_every", -1),
               ("history_len", -1), ("max_weight", 0), ("dataset", "bogus")],
    "ibc.py": [("total_steps", 0), ("eval_episodes", 0), ("learning_rate", "nan"), ("seed", -1), ("hidden", -3),
               ("torch_threads", -1)],
    "maiql.py": [("total_steps", -1), ("eval_episodes", 0), ("beta", "nan"), ("populate_every", 0),
                 ("grad_clip", "nan"), ("seed", -2)],
    "itd3bc.py": [("total_steps", 0), ("eval_episodes", 0), ("alpha", "nan"), ("learning_rate", 0),
                  ("policy_noise", "inf")],
    "icql.py": [("total_steps", 0), ("eval_episodes", 0), ("cql_alpha", "nan"), ("cql_samples", 0), ("seed", -1)],
    "omar.py": [("total_steps", 0), ("eval_episodes", 0), ("omar_coef", "nan"), ("omar_elites", 30),
                ("torch_threads", 0)],
}


def probe_bad_inputs() -> None:
    A_FILE.write_text("not a folder\n")
    cases = []
    for script, changes in BAD_INPUTS.items():
        for flag, value in changes:
            cases.append((f"{script} --{flag.replace('_', '-')} {value}", script, with_flags(script, **{flag: value}), None))
    for script in ("moma_ppo.py", "iql.py", "ibc.py", "itd3bc.py"):
        cases.append((f"{script} --run-dir <a file>", script, SMALL[script], A_FILE))
    cases.append(("iql.py --run-dir <a file>/run", "iql.py", SMALL["iql.py"], A_FILE / "run"))
    for script in ("moma_ppo.py", "iql.py", "ibc.py", "maiql.py", "itd3bc.py", "icql.py", "omar.py"):
        # the record is copied there after training: a file must be refused before it, not after
        cases.append((f"{script} --results-dir <a file>", script, SMALL[script] + ["--results-dir", str(A_FILE)], None))
    unwritable = WORK / "readonly" if os.geteuid() != 0 else pathlib.Path("/proc/moma-probe-run")
    if os.geteuid() != 0:  # root writes into a read-only folder anyway; /proc refuses every new folder
        unwritable.mkdir()
        unwritable.chmod(0o555)
    for script in ("moma_ppo.py", "iql.py", "ibc.py"):
        run_dir = unwritable / "run" if os.geteuid() != 0 else unwritable
        cases.append((f"{script} --run-dir <unwritable place>", script, SMALL[script], run_dir))
    for script in ("moma_ppo.py", "iql.py"):
        cases.append((f"{script} --resume without --run-dir", script, SMALL[script] + ["--resume"], "none"))
        cases.append((f"{script} --resume of a missing run", script, SMALL[script] + ["--resume"], None))
    cases.append(("iql.py --env bogus", "iql.py", ["--env", "bogus"], None))
    # The other command lines: the world model, the dataset builders and the two online behaviour learners
    # (no --run-dir for the first three: a case passes "none"; a learner's folder would appear under runs/).
    game_model = ["--env", "coordination", "--dataset", "neutral", "--torch-threads", "1"]
    for flag, value in (("max_steps", 0), ("eval_every", 0), ("checkpoint_every", 0), ("seed", -1),
                        ("torch_threads", 0), ("learning_rate", "nan"), ("n_elites", 9), ("holdout_fraction", 1)):
        cases.append((f"world_model.py --{flag.replace('_', '-')} {value}", "world_model.py",
                      game_model + [f"--{flag.replace('_', '-')}", str(value)], "none"))
    for flag, value in (("n_transitions", 0), ("seed", -1)):
        cases.append((f"envs.py --{flag.replace('_', '-')} {value}", "envs.py",
                      ["--env", "coordination", "--dataset", "neutral", "--force", f"--{flag.replace('_', '-')}",
                       str(value)], "none"))
    for flag, value in (("n_transitions", 0), ("seed", -1), ("workers", 0)):
        cases.append((f"make_datasets.py build --{flag.replace('_', '-')} {value}", "make_datasets.py",
                      ["build", "--only", "ant/random", f"--{flag.replace('_', '-')}", str(value)], "none"))
    learner = ["--env", "reacher", "--torch-threads", "1", "--total-steps", "1000"]
    for flag, value in (("eval_episodes", 0), ("eval_every", -1), ("checkpoint_every", -1), ("seed", -1),
                        ("minibatch_size", 0), ("learning_rate", "nan")):
        cases.append((f"mappo.py --{flag.replace('_', '-')} {value}", "mappo.py",
                      learner + [f"--{flag.replace('_', '-')}", str(value)], "none"))
    for flag, value in (("policy_freq", 0), ("seed", -1), ("batch_size", 0), ("tau", "nan")):
        cases.append((f"td3_ant.py --{flag.replace('_', '-')} {value}", "td3_ant.py",
                      ["--total-steps", "1000", f"--{flag.replace('_', '-')}", str(value),
                       "--learner-dir", str(WORK / "td3_learner")], "none"))
    for name, script, args, run_dir in cases:
        if not wanted(name):
            continue
        given = run_dir is not None
        run_dir = None if run_dir == "none" else (run_dir or WORK / "bad" / name.replace(" ", "_").replace("/", "_"))
        runs_before = set((WORK / "runs").glob("*"))
        existed = run_dir is not None and run_dir.exists()
        rc, _, err = run(script, args + (["--run-dir", run_dir] if run_dir is not None else []))
        left = (run_dir is not None and not existed and run_dir.exists()) or set((WORK / "runs").glob("*")) != runs_before
        ok = clean_error(rc, err) and not left
        record("bad input", name, ok, f"rc={rc} folder_left={left} {tail(err)}")
        if run_dir is not None and not existed and run_dir.exists() and run_dir.is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------
NAN_WEIGHTS = """
    import torch
    _step, _calls = torch.optim.Adam.step, [0]
    def step(self, *a, **k):  # weights turn NaN after a few updates (a diverged training)
        out = _step(self, *a, **k)
        _calls[0] += 1
        if _calls[0] >= 5:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))
        return out
    torch.optim.Adam.step = step
"""

ENOSPC_ON_SECOND_SAVE = """
    import errno, torch
    _save, _calls = torch.save, [0]
    def save(obj, f, *a, **k):  # the disk fills up during the second checkpoint: part of the file, then ENOSPC
        _calls[0] += 1
        if _calls[0] >= 2:
            with open(f, "wb") as handle:
                handle.write(b"PK" + b"\\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return _save(obj, f, *a, **k)
    torch.save = save
"""

DISK_FULL = """
    import errno, shutil, collections, torch
    _usage = collections.namedtuple("usage", "total used free")
    shutil.disk_usage = lambda path: _usage(10**11, 10**11 - 5 * 2**20, 5 * 2**20)  # 5 MB free
    def save(obj, f, *a, **k):
        with open(f, "wb") as handle:
            handle.write(b"PK" + b"\\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    torch.save = save
"""


def fault_stopped_cleanly(rc, err, run_dir, summary_before=None) -> tuple[bool, str]:
    """The fault was survived by stopping: clean error, summary untouched (or absent), no .tmp left."""
    summary = summary_of(run_dir)
    ok = clean_error(rc, err) and summary == summary_before and not leftovers(run_dir)
    return ok, f"rc={rc} summary={'changed' if summary != summary_before else 'unchanged'} tmp={leftovers(run_dir)} {tail(err)}"


def probe_faults() -> None:
    # Non-finite data: a coordination dataset with a few NaN rewards (its own Minari folder).
    nan_env = dict(ENV, MINARI_DATASETS_PATH=str(WORK / "minari_nan"), MOMA_CACHE_DIR=str(WORK / "cache_nan"))
    if any(wanted(f"nan rewards {s}") for s in SCRIPTS):
        rc, _, err = python("""
            import numpy as np, envs
            rng = np.random.default_rng(0)
            R, episodes = envs.COORDINATION_ROUNDS, []
            for j in range(200):
                actions = (rng.random((R, 2)) < [0.25, 0.75]).astype(np.int64)
                rewards = (actions[:, 0] == actions[:, 1]).astype(np.float64)
                if j % 50 == 0:
                    rewards[3] = np.nan
                episodes.append(dict(observations=(np.arange(R + 1, dtype=np.float32) / R)[:, None], actions=actions,
                                     rewards=rewards, terminations=np.zeros(R, bool), truncations=np.arange(R) == R - 1))
            envs.write_minari_dataset("coordination", "neutral", episodes, 0.0, 10.0, "probe", "NaN rewards")
        """, env=nan_env)
        assert rc == 0, err
    for script in ("iql.py", "ibc.py", "maiql.py", "moma_ppo.py"):
        name = f"nan rewards {script}"
        if wanted(name):
            run_dir = WORK / "cases" / name.replace(" ", "_")
            rc, _, err = run(script, SMALL[script] + ["--run-dir", run_dir], env=nan_env)
            record("fault", name, *fault_stopped_cleanly(rc, err, run_dir))

    # Weights turn NaN during training: no summary may be written.
    for script in SCRIPTS:
        name = f"nan weights during training {script}"
        if wanted(name):
            run_dir = WORK / "cases" / name.replace(" ", "_")
            rc, _, err = run(script, SMALL[script] + ["--run-dir", run_dir], inject=NAN_WEIGHTS)
            record("fault", name, *fault_stopped_cleanly(rc, err, run_dir))

    # Resume with another configuration: refused, the finished run untouched.
    for script in SCRIPTS:
        name = f"resume with another configuration {script}"
        if wanted(name):
            run_dir = copy_of_base(script, name.replace(" ", "_"))
            before = summary_of(run_dir)
            length = 8 if script == "moma_ppo.py" else 300
            other = dict(seed=7, learning_rate=0.1, **{LENGTH_FLAG[script][2:]: length})
            if script in ("iql.py", "ibc.py", "maiql.py", "moma_ppo.py"):
                other["dataset"] = "unfavorable"
            rc, _, err = run(script, with_flags(script, **other) + ["--run-dir", run_dir, "--resume"])
            record("fault", name, *fault_stopped_cleanly(rc, err, run_dir, before))

    # The disk fills up at the second checkpoint: clean error, no partial file, the first checkpoint intact.
    for script in SCRIPTS:
        name = f"disk full at a checkpoint {script}"
        if wanted(name):
            if script == "moma_ppo.py":  # its world model cached first: the injection counts the run's own saves
                base_run(script)
            run_dir = WORK / "cases" / name.replace(" ", "_")
            rc, _, err = run(script, SMALL[script] + ["--run-dir", run_dir], inject=ENOSPC_ON_SECOND_SAVE)
            ok, detail = fault_stopped_cleanly(rc, err, run_dir)
            rc2, out2, err2 = python(f"""
                import torch; ck = torch.load({str(run_dir / 'checkpoint.pt')!r}, weights_only=False)
                print(ck.get("step", ck.get("iteration")))""")
            ok = ok and rc2 == 0
            record("fault", name, ok, detail + f" first checkpoint loads: {rc2 == 0}")

    # The disk is (nearly) full from the start: stop at once, nothing half-written.
    for script in SCRIPTS:
        name = f"disk full at start {script}"
        if wanted(name):
            run_dir = WORK / "cases" / name.replace(" ", "_")
            rc, _, err = run(script, SMALL[script] + ["--run-dir", run_dir], inject=DISK_FULL)
            ok, detail = fault_stopped_cleanly(rc, err, run_dir)
            ok = ok and not (run_dir / "checkpoint.pt").exists()
            record("fault", name, ok, detail)

    # Corrupt checkpoints: garbage or a truncated file, then --resume.
    for script in SCRIPTS:
        for kind in ("garbage", "truncated"):
            name = f"{kind} checkpoint {script}"
            if not wanted(name):
                continue
            run_dir = copy_of_base(script, name.replace(" ", "_"))
            before = summary_of(run_dir)
            ck = run_dir / "checkpoint.pt"
            if kind == "garbage":
                ck.write_bytes(os.urandom(4096))
            else:
                ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
            rc, _, err = run(script, SMALL[script] + ["--run-dir", run_dir, "--resume"])
            record("fault", name, *fault_stopped_cleanly(rc, err, run_dir, before))

    # A checkpoint whose weights are NaN, resumed and extended: no summary for a broken policy.
    for script in ("iql.py", "moma_ppo.py"):
        name = f"nan weights in a checkpoint {script}"
        if wanted(name):
            run_dir = copy_of_base(script, name.replace(" ", "_"))
            before = summary_of(run_dir)
            key = "agents" if script == "moma_ppo.py" else "agent"
            rc, _, err = python(f"""
                import torch; path = {str(run_dir / 'checkpoint.pt')!r}
                ck = torch.load(path, weights_only=False)
                for v in ck[{key!r}].values():
                    v.fill_(float("nan"))
                torch.save(ck, path)""")
            assert rc == 0, err
            length = 6 if script == "moma_ppo.py" else 300
            rc, _, err = run(script, with_flags(script, **{LENGTH_FLAG[script][2:]: length}) + ["--run-dir", run_dir, "--resume"])
            record("fault", name, *fault_stopped_cleanly(rc, err, run_dir, before))

    # SIGKILL after the first checkpoint, then resume: the same result as an uninterrupted run.
    for script in ("iql.py", "moma_ppo.py"):
        name = f"killed and resumed {script}"
        if not wanted(name):
            continue
        reference = summary_of(reference_run(script))
        run_dir = WORK / "cases" / name.replace(" ", "_")
        popen = run(script, SMALL[script] + ["--run-dir", run_dir], background=True)
        deadline = time.time() + 300
        while not (run_dir / "checkpoint.pt").exists() and popen.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        killed = popen.poll() is None
        if killed:
            popen.send_signal(signal.SIGKILL)
        popen.communicate()
        rc, _, err = run(script, SMALL[script] + ["--run-dir", run_dir] + (["--resume"] if (run_dir / "checkpoint.pt").exists() else []))
        summary = summary_of(run_dir)
        same = rc == 0 and isinstance(summary, dict) and summary["episode_returns"] == reference["episode_returns"]
        record("fault", name, same, f"killed={killed} rc={rc} {tail(err)}")

    # Datasets: concurrent builds, a killed build, a deleted metadata.json, a corrupt flattened cache.
    fingerprint = None
    name = "two concurrent builds of one dataset"
    if wanted(name):
        env_c = dict(ENV, MINARI_DATASETS_PATH=str(WORK / "minari_concurrent"), MOMA_CACHE_DIR=str(WORK / "cache_c1"))
        code = "import envs; print(envs.load_dataset('coordination', 'favorable').fingerprint)"
        procs = [python(code, env=dict(env_c, MOMA_CACHE_DIR=str(WORK / f"cache_c{i}")), background=True) for i in range(2)]
        outs = [p.communicate() + (p.returncode,) for p in procs]
        prints = {(o[0].strip().splitlines() or [""])[-1] for o in outs}  # the fingerprint, after the build's lines
        ok = all(o[2] == 0 for o in outs) and len(prints) == 1
        fingerprint = prints.pop() if ok else None
        record("fault", name, ok, " / ".join(tail(o[1]) for o in outs))
    name = "killed dataset build"
    if wanted(name):
        env_k = dict(ENV, MINARI_DATASETS_PATH=str(WORK / "minari_killed"), MOMA_CACHE_DIR=str(WORK / "cache_k"))
        popen = python("import envs; envs.build_dataset('coordination', 'favorable')", env=env_k, background=True)
        deadline = time.time() + 120
        while not (WORK / "minari_killed" / ".staging").exists() and popen.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        killed = popen.poll() is None
        popen.kill()
        popen.communicate()
        rc, out, err = python("import envs; print(envs.load_dataset('coordination', 'favorable').fingerprint)", env=env_k)
        printed = (out.strip().splitlines() or [""])[-1]  # the fingerprint, after the rebuild's own lines
        ok = rc == 0 and (fingerprint is None or printed == fingerprint)
        record("fault", name, ok, f"killed mid-build={killed} rc={rc} fingerprint {printed} "
                                  f"(an unkilled build's: {fingerprint}) {tail(err)}")
    name = "deleted metadata.json"
    if wanted(name):
        base_run("iql.py")  # the neutral dataset exists
        env_m = dict(ENV, MINARI_DATASETS_PATH=str(WORK / "minari_meta"), MOMA_CACHE_DIR=str(WORK / "cache_meta"))
        shutil.copytree(WORK / "minari", WORK / "minari_meta", ignore=shutil.ignore_patterns(".locks", ".staging"))
        (WORK / "minari_meta" / "moma" / "coordination" / "neutral-v0" / "data" / "metadata.json").unlink()
        run_dir = WORK / "cases" / "deleted_metadata"
        rc, _, err = run("iql.py", SMALL["iql.py"] + ["--run-dir", run_dir], env=env_m)
        summary = summary_of(run_dir)
        ok = (rc == 0 and isinstance(summary, dict)) or fault_stopped_cleanly(rc, err, run_dir)[0]
        record("fault", name, ok, f"rc={rc} {tail(err)}")
    name = "corrupt dataset cache"
    if wanted(name):
        reference = summary_of(base_run("iql.py"))
        for npz in (WORK / "cache" / "datasets").glob("*neutral*.npz"):
            npz.write_bytes(os.urandom(2048))
        run_dir = WORK / "cases" / "corrupt_cache"
        rc, _, err = run("iql.py", SMALL["iql.py"] + ["--run-dir", run_dir])
        summary = summary_of(run_dir)
        ok = rc == 0 and isinstance(summary, dict) and summary["episode_returns"] == reference["episode_returns"]
        record("fault", name, ok, f"rc={rc} {tail(err)}")

    # Two runs with default run folders started in the same second: two folders, two summaries.
    name = "two runs started in the same second"
    if wanted(name):
        base_run("iql.py")
        cwd = WORK / "same_second"
        cwd.mkdir(exist_ok=True)
        procs = [run("iql.py", SMALL["iql.py"], cwd=cwd, background=True) for _ in range(2)]
        outs = [p.communicate() + (p.returncode,) for p in procs]
        folders = [p for p in (cwd / "runs").glob("*") if p.is_dir()] if (cwd / "runs").exists() else []
        ok = all(o[2] == 0 for o in outs) and len(folders) == 2 and all(summary_of(f) for f in folders)
        record("fault", name, ok, f"folders={len(folders)} rcs={[o[2] for o in outs]}")

    # A world model file copied to another seed's name: refused.
    name = "world model of another seed"
    if wanted(name):
        base_run("moma_ppo.py")
        models = WORK / "cache" / "world_models"
        source = next(models.glob("coordination__neutral__seed0.pt"))
        shutil.copy(source, models / "coordination__neutral__seed5.pt")
        run_dir = WORK / "cases" / "swapped_world_model"
        rc, _, err = run("moma_ppo.py", SMALL["moma_ppo.py"] + ["--world-model-seed", "5", "--run-dir", run_dir])
        record("fault", name, *fault_stopped_cleanly(rc, err, run_dir))

    # A world model file of another dataset swapped in: refused as such, not called stale and trained over.
    name = "world model of another dataset"
    if wanted(name):
        base_run("moma_ppo.py")
        models = WORK / "cache" / "world_models"
        source, swapped = models / "coordination__neutral__seed0.pt", models / "coordination__favorable__seed0.pt"
        shutil.copy(source, swapped)
        run_dir = WORK / "cases" / "other_dataset_world_model"
        rc, _, err = run("moma_ppo.py", with_flags("moma_ppo.py", dataset="favorable")
                         + ["--run-dir", run_dir])
        ok, detail = fault_stopped_cleanly(rc, err, run_dir)
        ok = ok and "stale" not in err and swapped.read_bytes() == source.read_bytes()
        record("fault", name, ok, detail)

    # A stale temporary checkpoint left by a killed process: resume works and gives the same result.
    name = "stale checkpoint temp file"
    if wanted(name):
        run_dir = copy_of_base("iql.py", "stale_tmp")
        before = summary_of(run_dir)
        for tmp_name in ("checkpoint.pt.tmp", f"checkpoint.pt.{os.getpid()}.tmp"):
            (run_dir / tmp_name).write_bytes(b"garbage")
        rc, _, err = run("iql.py", SMALL["iql.py"] + ["--run-dir", run_dir, "--resume"])
        summary = summary_of(run_dir)
        ok = rc == 0 and isinstance(summary, dict) and summary["episode_returns"] == before["episode_returns"]
        record("fault", name, ok, f"rc={rc} {tail(err)}")


# --------------------------------------------------------------------------------------------------
# Controls: legitimate resumes keep working.
# --------------------------------------------------------------------------------------------------
def probe_controls() -> None:
    name = "moma_ppo.py gives the same result whether its world model was trained in the process or cached"
    if wanted(name):
        trained, cached = summary_of(base_run("moma_ppo.py")), summary_of(reference_run("moma_ppo.py"))
        record("control", name, trained["episode_returns"] == cached["episode_returns"],
               f"scores {trained['normalized_score_mean']} (trained) vs {cached['normalized_score_mean']} (cached)")
    for script in SCRIPTS:
        name = f"resume a finished run with the same flags {script}"
        if wanted(name):
            run_dir = copy_of_base(script, name.replace(" ", "_"))
            before = summary_of(run_dir)
            rc, _, err = run(script, SMALL[script] + ["--run-dir", run_dir, "--resume", "--torch-threads", "1"])
            after = summary_of(run_dir)
            ok = rc == 0 and isinstance(after, dict) and after["episode_returns"] == before["episode_returns"]
            record("control", name, ok, f"rc={rc} {tail(err)}")
        name = f"extend a finished run {script}"
        if wanted(name):
            run_dir = copy_of_base(script, name.replace(" ", "_"))
            before = summary_of(run_dir)
            _, trained_s, _ = python(f"import torch; print(torch.load({str(run_dir / 'checkpoint.pt')!r}, "
                                     f"weights_only=False)['wall_s'])")
            length = 6 if script == "moma_ppo.py" else (30 if SMALL[script][1] == "reacher" else 300)
            rc, _, err = run(script, with_flags(script, **{LENGTH_FLAG[script][2:]: length}) + ["--run-dir", run_dir, "--resume"])
            after = summary_of(run_dir)
            # the wall time counts every process's training (the checkpoint's wall_s), not only the last one
            ok = (rc == 0 and isinstance(after, dict) and after["train_steps"] > before["train_steps"]
                  and after["wall_time_s"] > float(trained_s))
            record("control", name, ok, f"rc={rc} steps {before['train_steps']} -> "
                   f"{after.get('train_steps') if isinstance(after, dict) else None} {tail(err)}")


if __name__ == "__main__":
    t0 = time.time()
    print(f"probing {REPO} in {WORK}", flush=True)
    write_tiny_reacher(ENV)
    try:
        probe_bad_inputs()
        probe_faults()
        probe_controls()
    finally:
        if not cli.keep:
            shutil.rmtree(WORK, ignore_errors=True)
    print()
    for kind, label in (("bad input", "bad inputs tried / handled cleanly"), ("fault", "faults injected / survived"),
                        ("control", "controls run / passed")):
        rows = results[kind]
        print(f"{label}: {len(rows)} / {sum(ok for _, ok in rows)}")
    print(f"({time.time() - t0:.0f} s)")
