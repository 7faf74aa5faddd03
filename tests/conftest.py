"""Test session set-up: datasets and caches go to a temporary folder, never to a user's data/."""

import os
import pathlib
import sys
import tempfile

_TMP = pathlib.Path(tempfile.mkdtemp(prefix="moma-tests-"))
# Must happen before envs (and minari) are imported anywhere.
os.environ["MINARI_DATASETS_PATH"] = str(_TMP / "minari")
os.environ["MOMA_CACHE_DIR"] = str(_TMP / "cache")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded, ever
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# Scripts write TensorBoard logs and run folders under ./runs (CleanRL's convention): run the tests from the
# temporary folder so that they never litter a user's runs/ with test runs.
os.chdir(_TMP)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def random_episodes(env, n_episodes, steps, seed):
    """Uniform-random episodes of a MuJoCo env, in the layout envs.write_minari_dataset takes."""
    import envs

    rng = np.random.default_rng(seed)
    episodes = []
    for j in range(n_episodes):
        sim = envs.make_single_agent_env(env)
        state, _ = sim.reset(seed=seed + j)
        obs, acts, rews, terms, truncs = [state], [], [], [], []
        for t in range(steps):
            a = rng.uniform(-1, 1, envs.JOINT_ACTION_DIM[env]).astype(np.float32)
            state, r, term, trunc, _ = sim.step(a)
            obs.append(state), acts.append(a), rews.append(r), terms.append(term), truncs.append(trunc or t == steps - 1)
            if term:
                break
        episodes.append(dict(observations=np.array(obs, np.float32), actions=np.array(acts), rewards=np.array(rews),
                             terminations=np.array(terms), truncations=np.array(truncs)))
    return episodes


@pytest.fixture(scope="module")
def tiny_mujoco_datasets():
    """Tiny random reacher expert-mix (4 x 50 steps) and ant random (2 x 100 steps) datasets, written afresh for
    every test module that asks: other modules overwrite these ids with their own data (wrong-shape and round-trip
    tests), so reusing whatever exists would make a test depend on the order the modules run in. Writing them
    also keeps load_dataset from ever building the real (expensive) datasets in a test."""
    import envs

    assert str(envs.DATA_DIR) == str(_TMP / "minari")  # never a user's data/
    envs.write_minari_dataset("reacher", "expert-mix", random_episodes("reacher", 4, 50, 0), -11.144625,
                              -4.2370844, "uniform random", "tiny test dataset")
    envs.write_minari_dataset("ant", "random", random_episodes("ant", 2, 100, 0), -325.6, 3879.7,
                              "uniform random", "tiny test dataset")
