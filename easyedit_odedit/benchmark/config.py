"""The bench configuration (``hparams/bench/<x>.yaml``): defaults, loading and checks."""
from __future__ import annotations

import copy
import os
from typing import Any, Dict

import yaml

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)
SHIPPED_MODEL = os.path.join(PACKAGE_DIR, "assets", "minimmedit-base")
PARAPHRASES = "easyedit_odedit.benchmark.world:paraphrases"
# the config sections of meta-trained hosts -> the plugin's host name (``methods.META_TRAINED``)
META_TRAINED_HOSTS = {"mend": "MEND", "serac": "SERAC"}

DEFAULTS: Dict[str, Any] = {
    "name": "bench",
    "base_model": "shipped",
    "seeds": [0],
    "threads": 1,
    "records": {"n_train": 50, "n_test": 20, "pool_images": 2000},
    "settings": {"single": {"n": 20}, "sequential": {"T": [5, 10], "chunks": 1}},
    "hosts": {},
    "overrides": {},     # merged into every host's ODEdit YAML (e.g. {host_hparams: {num_steps: 3}})
    "variants": [],
    "curve": None,
    "mend": None,        # {yaml, train: {host_hparams overrides}, val_records, edit_steps, edit_lr, edit_odedit, seeds, settings}
    "serac": None,       # {yaml, train: {host_hparams overrides}, val_records, seeds, settings}: single editing only
    "not_run": {},
    "ike": None,         # {k: 1}: EasyEdit's multimodal IKE alone, single editing (benchmark/ike.py)
    "plot_variants": [],  # variant names drawn in the figure beside each host (the table shows them all)
    "leakage_check": 3,  # records per method and seed edited with real and with swapped evaluation fields
}


class BenchConfigError(ValueError):
    pass

def load_config(path_or_dict) -> Dict[str, Any]:
    """The bench YAML (or a dict) merged over ``DEFAULTS``; host YAML paths made absolute
    (relative paths are relative to the bench YAML, then to the repository root)."""
    if isinstance(path_or_dict, dict):
        raw, base = copy.deepcopy(path_or_dict), os.getcwd()
        source = raw.pop("source", None)  # an already loaded config
    else:
        if not os.path.isfile(path_or_dict):
            raise BenchConfigError(f"bench config {path_or_dict!r} does not exist")
        with open(path_or_dict) as f:
            raw = yaml.safe_load(f) or {}
        base, source = os.path.dirname(os.path.abspath(path_or_dict)), os.path.abspath(path_or_dict)
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise BenchConfigError(f"bench config: unknown key(s) {unknown}; use {sorted(DEFAULTS)}")
    config = copy.deepcopy(DEFAULTS)
    for key, value in raw.items():
        if isinstance(config.get(key), dict) and isinstance(value, dict) and key not in ("hosts", "not_run", "overrides"):
            config[key].update(value)
        else:
            config[key] = value
    config["source"] = source
    if not config["hosts"] and not config.get("ike") and not any(config.get(k) for k in META_TRAINED_HOSTS):  # a probe
        raise BenchConfigError("bench config: `hosts` must name at least one host: {FT-L: path/to/odedit.yaml}")
    config["hosts"] = {h: _find(p, base) for h, p in config["hosts"].items()}
    for variant in config["variants"]:
        if not {"name", "host"} <= set(variant):
            raise BenchConfigError(f"bench config: variant {variant} needs `name` and `host`")
        meta_trained = {name for key, name in META_TRAINED_HOSTS.items() if config.get(key)}
        if variant["host"] not in config["hosts"] and variant["host"] not in meta_trained:
            raise BenchConfigError(f"bench config: variant {variant['name']!r} names host {variant['host']!r} "
                                   f"that is not in `hosts` ({sorted(config['hosts'])})")
    curve = config.get("curve")
    if curve:
        for host in curve.get("hosts", []):
            if host not in config["hosts"]:
                raise BenchConfigError(f"bench config: curve host {host!r} is not in `hosts`")
        if not curve.get("lrs"):
            raise BenchConfigError("bench config: curve needs `lrs` (the host learning-rate grid)")
    seeds = config["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise BenchConfigError(f"bench config: `seeds` must be a non-empty list of integers, got {seeds!r}")
    n_test = config["records"]["n_test"]
    single_n = (config["settings"].get("single") or {}).get("n", 0)
    seq = config["settings"].get("sequential") or {}
    _check_chunks(seq)
    need = max([single_n] + [t * chunks(seq, t) for t in seq.get("T", [])]
               + [curve.get("n", 0) if curve else 0])
    if need > n_test:
        raise BenchConfigError(f"bench config: records.n_test = {n_test} but the settings need {need} test records")
    for key, host_name in META_TRAINED_HOSTS.items():
        section = config.get(key)
        if not section:
            continue
        if "yaml" not in section:
            raise BenchConfigError(f"bench config: {key} needs `yaml` (an ODEdit YAML with host: {host_name})")
        section["yaml"] = _find(section["yaml"], base)
        if int(section.get("val_records", 10)) >= int(config["records"]["n_train"]):
            raise BenchConfigError(f"bench config: {key}.val_records must be smaller than records.n_train")
    model = config["base_model"]
    config["base_model"] = SHIPPED_MODEL if model in (None, "shipped") else _find(model, base)
    return config


def _find(path: str, base: str) -> str:
    for candidate in (path, os.path.join(base, path), os.path.join(REPO_ROOT, path)):
        if os.path.isabs(candidate) and os.path.exists(candidate):
            return candidate
    candidate = os.path.abspath(os.path.join(base, path))
    if os.path.exists(candidate):
        return candidate
    raise BenchConfigError(f"bench config: {path!r} not found (relative to {base} or {REPO_ROOT})")


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def chunks(sequential: dict, length: int) -> int:
    """How many chunks of ``length`` edits a seed runs: ``chunks`` is one count for every T, or a
    count per T ({5: 2, 10: 4}: the longer sequences, which the issues set targets for, get more)."""
    count = sequential.get("chunks", 1)
    return int(count[length]) if isinstance(count, dict) else int(count)


def _check_chunks(sequential: dict) -> None:
    count = sequential.get("chunks", 1)
    if isinstance(count, dict) and set(count) != set(sequential.get("T", [])):
        raise BenchConfigError(f"bench config: settings.sequential.chunks names T = {sorted(count)} but T is "
                               f"{sequential.get('T', [])}: give a count for each T, or one count for all")
