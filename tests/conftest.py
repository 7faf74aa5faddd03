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

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
