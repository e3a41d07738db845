"""What comes with the package besides code: the ``hparams/`` YAMLs and the MiniMMEdit locality pool.

* ``hparams_path("bench/demo.yaml")``: a file of the repository's ``hparams/`` folder. An installed
  package carries that folder as ``easyedit_odedit/hparams/`` (``setup.py`` maps it in at build
  time), read through ``importlib.resources``; a source checkout reads the folder beside the package.
* ``locality_pool: minimmedit:train`` in a YAML names the pool the MiniMMEdit benchmark writes for
  the shipped model (``benchmark.records.locality_pool``: easy-vqa questions on *train* images and
  the train-split text-only questions), built on first use into ``$ODEDIT_CACHE/minimmedit/``
  (default ``~/.cache/easyedit_odedit``) with its images beside it. Only the train split exists
  under that name: an edit never draws on test images or held-out questions.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from importlib import resources
from typing import Optional, Tuple

from .errors import ODEditError

CACHE_ENV = "ODEDIT_CACHE"
MINIMMEDIT_POOL = "minimmedit:train"
# the bench's defaults (``records.pool_images``, seed 0); a new version number rebuilds old caches
POOL_IMAGES, POOL_SEED, POOL_VERSION = 2000, 0, 1
RECORDS_COMMAND = ("python -m easyedit_odedit.benchmark.records --model easyedit_odedit/assets/minimmedit-base "
                   "--out data/minimmedit")


def hparams_path(relpath: str) -> str:
    """``relpath`` inside ``hparams/``: the installed package data, else the checkout's folder."""
    installed = resources.files(__package__) / "hparams" / relpath
    if installed.is_file():
        return str(installed)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hparams", relpath)


def cache_dir() -> str:
    """``$ODEDIT_CACHE``, else ``$XDG_CACHE_HOME/easyedit_odedit``, else ``~/.cache/easyedit_odedit``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "easyedit_odedit")


def resolve_locality_pool(value: str, image_root: Optional[str]) -> Tuple[str, Optional[str]]:
    """``environments.locality_pool`` and ``locality_image_root`` as files: a pool name becomes the
    built pool and its image folder; a path is returned as it is."""
    if not value.startswith("minimmedit:"):
        return value, image_root
    if value != MINIMMEDIT_POOL:
        raise ODEditError("environments.locality_pool", value,
                          f"use `{MINIMMEDIT_POOL}`: a locality pool is the train split only, so that an edit "
                          "never sees test images or held-out questions")
    if image_root is not None:
        raise ODEditError("environments.locality_image_root", image_root,
                          f"remove it: `{MINIMMEDIT_POOL}` brings its own images", problem="is not used")
    return minimmedit_pool()


def minimmedit_pool() -> Tuple[str, str]:
    """(pool JSON, image folder) of the MiniMMEdit train-split pool, built the first time."""
    folder = os.path.join(cache_dir(), "minimmedit", f"train-pool-v{POOL_VERSION}")
    path = os.path.join(folder, "locality_pool.json")
    if not os.path.isfile(path):
        _build_minimmedit_pool(folder)
    return path, os.path.join(folder, "images")


def _build_minimmedit_pool(folder: str) -> None:
    """Written in a staging folder and renamed into place, so that a second process never reads a
    half-written pool (whichever finishes second keeps the first one's)."""
    from .benchmark import records

    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(dir=parent, prefix=".building-")
    except OSError as err:
        raise ODEditError(f"the cache folder ({CACHE_ENV})", parent,
                          f"set {CACHE_ENV} to a folder you can write ({err.strerror})",
                          problem="cannot be written") from None
    print(f"easyedit_odedit: building the MiniMMEdit locality pool in {folder} (once)", file=sys.stderr)
    try:
        pool = records.locality_pool(POOL_IMAGES, POOL_SEED)
        records.copy_images({entry["image"] for entry in pool if "image" in entry}, os.path.join(staging, "images"))
        with open(os.path.join(staging, "locality_pool.json"), "w") as f:
            json.dump(pool, f)
        try:
            os.rename(staging, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "locality_pool.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
