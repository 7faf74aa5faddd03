"""Diagnosis row (f) of docs/diagnosis.md: does a world model trained further than world_model.py's step cap change
MOMA-PPO? Continues the cached ensemble of (env, dataset, seed) for --steps more gradient steps with the learning rate
annealed from world_model.py's 1e-3 to --lr-min along a half cosine (Adam restarts), and writes it into a separate
cache folder, so that MOMA-PPO can use it without touching the project's cache:

    python bench/continue_world_model.py --dataset medium --steps 40000 --out runs/wm_long/medium
    MOMA_CACHE_DIR=runs/wm_long/medium/cache python moma_ppo.py --env ant --obs partial --dataset medium --seed 1

The folder gets the model (cache/world_models/), the reference scores and a link to the flattened datasets, and
report.json / report.txt (world_model.py's held-out report of the continued model, its curve in "history")."""
import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
import world_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="ant")
    parser.add_argument("--dataset", default="medium")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40_000)
    parser.add_argument("--lr-min", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    source = world_model.artifact_path(a.env, a.dataset, a.seed)
    if not source.exists():
        raise SystemExit(f"error: no cached world model {source}; train it first (python world_model.py --env {a.env} "
                         f"--dataset {a.dataset})")
    previous = world_model.load(source, a.env, a.dataset, seed=a.seed)
    # the settings the cached model was trained with (its network sizes above all), for a.steps more steps
    fields = {f.name for f in dataclasses.fields(world_model.Args)}
    trained_with = {k: v for k, v in previous.config.items() if k in fields}
    args = world_model.resolve(world_model.Args(**{**trained_with, "env": a.env, "dataset": a.dataset, "seed": a.seed,
                                                   "max_steps": a.steps, "lr_decays": 0, "patience": 10**9,
                                                   "torch_threads": a.threads, "resume": False, "force": False}))
    lr_start = args.learning_rate

    class CosineAdam(torch.optim.Adam):  # world_model.train's optimiser with the annealed learning rate
        def step(self, closure=None):
            t = getattr(self, "_t", 0)
            self._t = t + 1
            for group in self.param_groups:
                group["lr"] = a.lr_min + 0.5 * (lr_start - a.lr_min) * (1 + math.cos(math.pi * min(t, a.steps) / a.steps))
            return super().step(closure)

    fresh = world_model.WorldModel

    def from_previous(*args_, **kwargs):  # train() builds its network here: start from the cached weights instead
        model = fresh(*args_, **kwargs)
        model.network.load_state_dict(previous.network.state_dict())
        return model

    world_model.torch.optim.Adam, world_model.WorldModel = CosineAdam, from_previous
    data = envs.load_dataset(a.env, a.dataset)
    t0 = time.time()
    model, metrics = world_model.train(data, args, progress=True)
    metrics["wall_s"] = time.time() - t0
    metrics["continued_from"] = {"path": str(source), "train_steps": previous.metrics.get("train_steps"),
                                 "holdout_mse": previous.metrics.get("holdout_mse")}
    metrics["schedule"] = f"{a.steps} more steps, lr {lr_start:g} -> {a.lr_min:g} (half cosine), Adam restarted"
    out = pathlib.Path(a.out)
    cache = out / "cache"
    path = cache / "world_models" / source.name
    path.parent.mkdir(parents=True, exist_ok=True)
    world_model.WorldModel = fresh
    world_model.save(model, path, a.seed, dataclasses.asdict(args), metrics)
    if (envs.CACHE_DIR / "reference_scores.json").exists():  # the MuJoCo envs' scores (the game's are fixed)
        shutil.copy(envs.CACHE_DIR / "reference_scores.json", cache / "reference_scores.json")
    if not (cache / "datasets").exists():
        (cache / "datasets").symlink_to((envs.CACHE_DIR / "datasets").resolve())
    report = world_model.format_report(metrics, data.dataset_id)
    (out / "report.json").write_text(json.dumps(metrics, default=str, indent=1))
    (out / "report.txt").write_text(report + "\n")
    print(report)
    print(f"saved {path}; use it with MOMA_CACHE_DIR={cache.resolve()}")


if __name__ == "__main__":
    main()
