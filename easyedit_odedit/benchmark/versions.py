"""What a bench run records about the software and the base model it ran with."""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from typing import Any, Dict

from .. import compat
from ..models.manifest import MANIFEST


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("easyeditor", "torch", "transformers", "peft", "easy-vqa", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["easyeditor_flavour"] = compat.flavour()
    return out


def base_model_info(model_dir: str) -> Dict[str, Any]:
    with open(os.path.join(model_dir, MANIFEST)) as f:
        manifest = json.load(f)
    return {"dir": os.path.abspath(model_dir), "accuracy": manifest.get("accuracy"),
            "sha256": manifest.get("sha256"), "seed": manifest.get("seed"), "steps": manifest.get("steps"),
            "command": manifest.get("command"), "architecture": manifest.get("architecture")}
