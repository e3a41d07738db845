"""Meta-training a host (MEND, SERAC) per seed with EasyEdit's own ``MultimodalTrainer``."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict

import yaml

from .. import compat
from ..hosts.easyedit_native import build_easyedit_hparams
from ..odedit.odedit_hparams import ODEditHyperParams
from ..odedit.odedit_main import seeded
from .config import _merge
from .methods import _model_fields, _quiet_easyedit


def train_meta(method_cls, section: dict, alg: str, data: Dict[str, str], model_dir: str, seed: int,
               results_dir: str, progress: bool = True) -> Dict[str, Any]:
    """Meta-train a host (MEND, SERAC) on the train split with EasyEdit's own ``MultimodalTrainer``:
    ``alg`` = the host's key (EasyEdit's training hparams class) or ``ODEdit`` (the section's ODEdit
    YAML). The last ``val_records`` train records are the validation set; ``training_fields`` adds
    what a host needs per seed (SERAC's scope classifier). Returns the archive path and EasyEdit's
    final validation metrics."""
    with open(section["yaml"]) as f:
        config = yaml.safe_load(f)
    host = _merge(config["host_hparams"], section.get("train") or {})
    host.update(seed=int(seed), archive=None)
    extra = method_cls.training_fields(model_dir, results_dir, int(seed))
    host.update(extra)
    model_fields = _model_fields(section["yaml"], data, model_dir, results_dir)
    if alg != "ODEdit":
        hp = build_easyedit_hparams(method_cls.host_name, dict(host, alg=alg), model_fields,
                                    f"bench {method_cls.section_key}")
    else:
        env = dict(config.get("environments") or {})
        env.update(locality_pool=os.path.abspath(data["locality_pool"]),
                   locality_image_root=os.path.abspath(data["image_root"]))
        hp = ODEditHyperParams.from_dict(dict(config, host_hparams=host, environments=env, seed=int(seed),
                                              **model_fields), source_path=section["yaml"])
    n_val = int(section.get("val_records", 10))
    with open(data["train"]) as f:
        records = json.load(f)
    split = {"fit": records[:-n_val], "val": records[-n_val:]}
    paths = {}
    os.makedirs(results_dir, exist_ok=True)
    for key, recs in split.items():
        paths[key] = os.path.join(results_dir, f"train_{key}.json")
        with open(paths[key], "w") as f:
            json.dump(recs, f)
    VQADataset = compat.module("dataset.vqa").VQADataset
    start = time.perf_counter()
    # EasyEdit's MultimodalTrainer ignores config.seed: initial weights (MEND's torch.randn) and the
    # shuffled batch order come from the global generators, so unseeded runs trained different hosts
    with seeded(int(seed)):
        trainer = compat.import_easyeditor().MultimodalTrainer(
            config=hp, train_set=VQADataset(paths["fit"], config=hp), val_set=VQADataset(paths["val"], config=hp))
        _quiet_easyedit()
        trainer.run()
    seconds = time.perf_counter() - start
    with open(os.path.join(results_dir, "results.json")) as f:
        val = json.load(f).get("results", {})
    archive = os.path.join(results_dir, "models", alg, "blip2")
    if not os.path.isfile(archive):
        raise RuntimeError(f"{method_cls.host_alg} training ({alg}) wrote no archive at {archive}")
    return {"archive": archive, "alg": alg, "seconds": round(seconds, 1), "n_fit": len(split["fit"]),
            "n_val": len(split["val"]), "max_iters": host.get("max_iters"), "batch_size": host.get("batch_size"),
            "val": {k: float(v) for k, v in val.items() if isinstance(v, (int, float))}, **extra}
