"""run_all.sh --slurm against a real Slurm: a single-node cluster (munge, slurmctld, slurmd) started by this test in a
temporary folder, as its own processes, and stopped afterwards. It submits a few coordination-game cells of Table 3
through `./run_all.sh 3 --slurm`, with no dataset or world model built beforehand (so the prepare job runs first and
the array waits for it), waits for the array and checks the records it left.

Needs the Debian packages slurmctld, slurmd, munge and slurm-client (`.ci/run` installs them where it can); skips,
saying why, where they are missing or the daemons cannot start (e.g. not root). The daemons run under `nice -n 19`,
which Slurm passes on to the jobs. About 50 s on a free 2-core machine (49 s in CI), a few minutes on a loaded one (most of it the cells
themselves)."""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "munge")
# The cells: IQL and MOMA-PPO (which needs a world model) on the favorable dataset, seeds 1 and 2. On a machine whose
# cores are taken (nice-19 jobs crawl), MOMA_SLURM_TEST_ONLY="__favorable__iql__" leaves out MOMA-PPO and its
# world model (most of the time) and MOMA_SLURM_TEST_SEEDS="1" one seed.
ONLY = os.environ.get("MOMA_SLURM_TEST_ONLY", "__favorable__iql__ __favorable__moma_ppo__")
SEEDS = os.environ.get("MOMA_SLURM_TEST_SEEDS", "1 2")
CELLS = [name for name in (f"coordination__full__favorable__{method}__{seed}" for method in ("moma_ppo", "iql")
                           for seed in SEEDS.split()) if any(want in name for want in ONLY.split())]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: pathlib.Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else f"({path} missing)"


class Cluster:
    """A single-node Slurm cluster in `root`: its own munge key and socket, ports, state and logs."""

    def __init__(self, root: pathlib.Path):
        self.root, self.procs = root, []
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(mode=0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = r / "munge" / "munge.socket"
        self._spawn(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
                     f"--pid-file={r / 'munge/munged.pid'}", f"--log-file={r / 'munge/munged.log'}",
                     f"--seed-file={r / 'munge/munged.seed'}"], r / "munge/munged.log")
        self._wait(lambda: socket_path.exists(), 20, "munged did not create its socket", r / "munge/munged.log")
        memory_mb = int(next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
                        / 1024 * 0.8)
        self.conf.write_text(f"""ClusterName=momatest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log/slurmctld.log'}
SlurmdLogFile={r / 'log/slurmd.log'}
PlugStackConfig={r / 'plugstack.conf'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=3600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=NO MaxTime=INFINITE State=UP
""")
        (r / "plugstack.conf").write_text("")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], r / "log/slurmctld.log")
        self._spawn(["slurmd", "-D", "-f", str(self.conf)], r / "log/slurmd.log")
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() in ("idle", "mixed", "allocated"), 60,
                   "the node did not come up", r / "log/slurmctld.log", r / "log/slurmd.log")

    def _spawn(self, command: list, log: pathlib.Path) -> None:
        # under nice 19, which Slurm hands on to the jobs (the machine's cores belong to other work)
        proc = subprocess.Popen(["nice", "-n", "19", *command], env=self.env, stdout=subprocess.DEVNULL,
                                stderr=open(self.root / f"{command[0]}.stderr", "w"))
        self.procs.append(proc)
        time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {proc.returncode}: "
                               f"{_tail(self.root / f'{command[0]}.stderr')}\n{_tail(log)}")

    def _wait(self, ready, seconds: float, what: str, *logs) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if ready():
                return
            for proc in self.procs:
                if proc.poll() is not None:
                    break
            time.sleep(1)
        raise RuntimeError(f"{what} within {seconds} s: " + "\n".join(_tail(log) for log in logs))

    def run(self, *command) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)

    def jobs(self) -> str:
        return self.run("squeue", "-h", "-o", "%i %T %r").stdout.strip()

    def stop(self) -> None:
        if self.conf.exists():
            self.run("scancel", "--full", "--user", "root")
            for _ in range(30):  # the jobs' processes end before their daemons
                if not self.jobs():
                    break
                time.sleep(1)
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged: only the processes this test started
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here (missing {', '.join(missing)}; Debian: apt-get install slurmctld "
                    f"slurmd munge slurm-client)")
    root = tmp_path_factory.mktemp("slurm")
    c = Cluster(root)
    try:
        c.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        c.stop()
        pytest.skip(f"could not start a single-node Slurm here: {e}")
    yield c
    c.stop()


def test_run_all_slurm_runs_the_cells_as_a_job_array(cluster, tmp_path):
    t0 = time.time()
    # a copy of the repository's code: the prepare job and the cells write nothing into the checkout
    repo = tmp_path / "repo"
    repo.mkdir()
    for path in list(REPO.glob("*.py")) + [REPO / "run_all.sh"]:
        shutil.copy(path, repo / path.name)
    results, runs = tmp_path / "results", tmp_path / "runs"
    env = {**cluster.env, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
           "SEEDS_GAME": SEEDS, "ONLY": ONLY, "RESULTS": str(results), "RUNS": str(runs),
           "MINARI_DATASETS_PATH": str(tmp_path / "minari"), "MOMA_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "MOMA_PROGRESS_EVERY": "10"}
    out = subprocess.run(["nice", "-n", "19", "bash", "run_all.sh", "3", "--slurm", "--partition", "debug",
                          "--torch-threads", "1"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    n = len(CELLS)
    assert n and f"plan (budget quick): {n} cells, 0 done already at this budget, {n} to run" in out.stdout, out.stdout
    assert "submitted prepare job" in out.stdout and "1 dataset(s)" in out.stdout, out.stdout
    assert "submitted job" in out.stdout, out.stdout

    deadline = time.time() + 3600  # minutes on a free machine; a busy one runs nice-19 jobs far slower
    while cluster.jobs():
        assert time.time() < deadline, f"the array did not finish: {cluster.jobs()}\n" + "\n".join(
            _tail(log) for log in sorted((runs / "logs").glob("slurm-*.log")))
        time.sleep(5)
    elapsed = time.time() - t0

    logs = sorted((runs / "logs").glob("slurm-3-*.log"))
    prepare_logs = [log for log in logs if "-prepare-" in log.name]
    task_logs = [log for log in logs if "-prepare-" not in log.name]
    assert len(prepare_logs) == 1 and len(task_logs) == n, [log.name for log in logs]  # one log per task
    assert "prepared coordination/favorable" in prepare_logs[0].read_text(), _tail(prepare_logs[0])
    moma = any("moma_ppo" in name for name in CELLS)
    assert (tmp_path / "cache/world_models/coordination__favorable__seed0.pt").exists() == moma
    for log in task_logs:  # every task found the world model the prepare job trained; none trained it again
        assert "[world model " not in log.read_text() and "waiting for another process" not in log.read_text(), _tail(log)
    # no terminal in a batch job: the long phases wrote plain progress lines (phase, step/total, rate, ETA)
    assert bool(re.search(r"\[world model moma/coordination/favorable-v0\] \d+/3000 \(",
                          prepare_logs[0].read_text())) == moma
    task_text = "\n".join(log.read_text() for log in task_logs)
    for method, last in (("iql", "[IQL coordination/full/favorable] 1000/1000 ("),
                         ("moma_ppo", "[MOMA-PPO coordination/full/favorable] 20/20 (")):
        assert task_text.count(last) == sum(f"__{method}__" in name for name in CELLS), task_text[-3000:]
    states = cluster.run("scontrol", "show", "job").stdout
    assert states.count("JobState=COMPLETED") == n + 1 and "JobState=FAILED" not in states, states

    scores = {}
    for name in CELLS:
        summary = json.loads((results / "3" / name / "summary.json").read_text())
        assert summary["budget"] == "quick" and (results / "3" / name / "curve.csv").exists()
        scores[name] = summary["normalized_score_mean"]
    # the favorable dataset's behaviour scores 0.62; both methods learn to coordinate on it (both go right)
    assert all(0.9 <= s <= 1.0 for s in scores.values()), scores

    # submitted again: nothing is left to run
    again = subprocess.run(["nice", "-n", "19", "bash", "run_all.sh", "3", "--slurm", "--partition", "debug"],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to submit: every cell of 3 is done" in again.stdout, again.stdout
    print(f"\nSlurm array of {len(CELLS)} cells (and its prepare job) done in {elapsed:.0f} s; scores {scores}")
