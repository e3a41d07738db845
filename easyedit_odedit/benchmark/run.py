"""The MiniMMEdit benchmark runner (``odedit bench --config hparams/bench/<x>.yaml --out DIR``).

For every seed the runner writes MiniMMEdit records with ``benchmark.records`` (train and test
split, the train-split locality pool, the image root), then for every host of the config edits the
test records twice through the *same* code path - the host alone (the ODEdit YAML with
``enabled: false``) and the host with ODEdit - with the same host hyper-parameters and steps:

* ``single``: each record through EasyEdit's own ``MultimodalEditor.edit(...,
  keep_original_weight=True)`` (EasyEdit restores the model after every record and computes its own
  pre/post metrics; locality is post-vs-pre argmax agreement on the answer positions, as the PyPI
  editor computes it);
* ``seqT``: T records applied one after another with
  ``apply_odedit_to_multimodal_model(..., keep_original_weight=False)`` on the editor's model, then
  all T evaluated with EasyEdit's ``compute_multimodal_edit_results`` (locality against the outputs
  of the same function before the first edit), then ``easyedit_odedit.restore_all``.

MEND and SERAC (the config's ``mend:`` / ``serac:`` sections): per seed, the host is meta-trained
on the train split with EasyEdit's own ``MultimodalTrainer`` twice - with the host's own key
(EasyEdit's objective) and with ``alg: ODEdit`` (EasyEdit's losses plus ODEdit's) - and each archive
edits through EasyEdit's own executor: MEND's (``MENDMultimodalHparams`` with ``archive``; an
optional per-edit refinement), SERAC's (``SERACMultimodalHparams``: the edit goes into SERAC's
memory and the model EasyEdit returns is evaluated).

Every edit is also scored on the protocol's extra evaluation (``eval_gen``, ``eval_near_shape``,
``eval_near_colour``, ``eval_far``, ``eval_other_family``; see ``EXTRA``), with EasyEdit's
``prepare_multimodal_edit`` / ``compute_multimodal_edit_quality`` on the edited model. The runner
writes one JSON line per edit to ``DIR/edits.jsonl`` and the run's metadata to ``DIR/run.json``;
``report.build`` turns them into ``results.json``, ``results.md`` and ``results.png``.

What an editor sees: the record's ``image``/``src``/``alt`` (through EasyEdit's request), the
train-split pool (``environments.locality_pool``) and ``world.paraphrases`` (never a held-out
template). The evaluation fields only reach EasyEdit's evaluation.

Time and memory: ``edit_s`` is the wall time of the edit call alone (the algorithm EasyEdit
dispatches to; evaluation excluded); ``peak_rss_mib`` is the process's resident-set high-water mark
during that call (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; where that is
not possible, the process-lifetime ``ru_maxrss``: see ``run.json: memory_measure``). CPU only here.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import platform
import re
import resource
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from tqdm.auto import tqdm

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)
SHIPPED_MODEL = os.path.join(PACKAGE_DIR, "assets", "minimmedit-base")
PARAPHRASES = "easyedit_odedit.benchmark.world:paraphrases"
VQA = "Question: {} Short answer:"

# extra evaluation: record field -> (metric name, kind). "edit": accuracy of the edit's new answer
# (``alt``); "keep": post-vs-pre argmax agreement on the answer positions (EasyEdit's locality rule).
EXTRA = (("eval_gen", "gen", "edit"), ("eval_near_shape", "near_shape", "keep"),
         ("eval_near_colour", "near_colour", "keep"), ("eval_far", "far", "keep"),
         ("eval_other_family", "other_family", "keep"))
# what an editor must never read (the protocol's evaluation fields of an E-VQA record)
EVALUATION_FIELDS = ("rephrase", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")
EASYEDIT_METRICS = (("rewrite_acc", "rel"), ("rephrase_acc", "t_gen"), ("image_rephrase_acc", "i_gen"),
                    ("locality_acc", "t_loc"), ("multimodal_locality_acc", "i_loc"))

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
    "leakage_check": 3,  # records per method and seed edited with real and with swapped evaluation fields
}


class BenchConfigError(ValueError):
    pass


# -------------------------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------------------------
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
    if not config["hosts"] and not config.get("ike") and not any(config.get(k) for k in META_TRAINED):  # a probe
        raise BenchConfigError("bench config: `hosts` must name at least one host: {FT-L: path/to/odedit.yaml}")
    config["hosts"] = {h: _find(p, base) for h, p in config["hosts"].items()}
    for variant in config["variants"]:
        if not {"name", "host"} <= set(variant):
            raise BenchConfigError(f"bench config: variant {variant} needs `name` and `host`")
        if variant["host"] not in config["hosts"]:
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
    need = max([single_n] + [t * seq.get("chunks", 1) for t in seq.get("T", [])]
               + [curve.get("n", 0) if curve else 0])
    if need > n_test:
        raise BenchConfigError(f"bench config: records.n_test = {n_test} but the settings need {need} test records")
    for key, method_cls in META_TRAINED.items():
        section = config.get(key)
        if not section:
            continue
        if "yaml" not in section:
            raise BenchConfigError(f"bench config: {key} needs `yaml` (an ODEdit YAML with host: {method_cls.host_name})")
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


# -------------------------------------------------------------------------------------------------
# Measurements
# -------------------------------------------------------------------------------------------------
class PeakRSS:
    """Resident-set high-water mark of this process over a block (MiB)."""

    def __init__(self):
        self.resettable = self._try_reset()
        self.measure = ("VmHWM (process RSS high-water mark, reset before each edit via /proc/self/clear_refs)"
                        if self.resettable else "ru_maxrss (process RSS high-water mark since start)")

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return PeakRSS._vmhwm() is not None
        except OSError:
            return False

    @staticmethod
    def _vmhwm() -> Optional[float]:
        try:
            with open("/proc/self/status") as f:
                match = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
            return int(match.group(1)) / 1024 if match else None
        except OSError:
            return None

    def reset(self) -> float:
        """Start a block; returns the current RSS (MiB)."""
        if self.resettable:
            self._try_reset()
        return self.current_mib()

    @staticmethod
    def current_mib() -> float:
        try:
            with open("/proc/self/status") as f:
                match = re.search(r"VmRSS:\s+(\d+)\s+kB", f.read())
            return int(match.group(1)) / 1024 if match else float("nan")
        except OSError:
            return float("nan")

    def peak_mib(self) -> float:
        if self.resettable:
            value = self._vmhwm()
            if value is not None:
                return value
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2 ** 20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def versions() -> Dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("easyeditor", "torch", "transformers", "peft", "easy-vqa", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    from .. import compat

    out["easyeditor_flavour"] = compat.flavour()
    return out


def base_model_info(model_dir: str) -> Dict[str, Any]:
    with open(os.path.join(model_dir, "odedit_model.json")) as f:
        manifest = json.load(f)
    return {"dir": os.path.abspath(model_dir), "accuracy": manifest.get("accuracy"),
            "sha256": manifest.get("sha256"), "seed": manifest.get("seed"), "steps": manifest.get("steps"),
            "command": manifest.get("command"), "architecture": manifest.get("architecture")}


# -------------------------------------------------------------------------------------------------
# EasyEdit's evaluation
# -------------------------------------------------------------------------------------------------
def image_path(image_root: str, rel: str) -> str:
    return os.path.abspath(os.path.join(image_root, rel))


def edit_arguments(records: Sequence[dict], image_root: str) -> dict:
    """``MultimodalEditor.edit`` / ``_prepare_requests`` arguments for MiniMMEdit records (absolute
    image paths: the PyPI release joins them to ``coco_image``, a no-op for absolute paths)."""
    path = functools.partial(image_path, image_root)
    return dict(prompts=[VQA.format(r["src"]) for r in records], targets=[r["alt"] for r in records],
                image=[path(r["image"]) for r in records],
                rephrase_prompts=[VQA.format(r["rephrase"]) for r in records],
                rephrase_image=[path(r["image_rephrase"]) for r in records],
                locality_inputs={"text": {"prompt": [r["loc"] for r in records],
                                          "ground_truth": [r["loc_ans"] for r in records]},
                                 "vision": {"image": [path(r["m_loc"]) for r in records],
                                            "prompt": [VQA.format(r["m_loc_q"]) for r in records],
                                            "ground_truth": [r["m_loc_a"] for r in records]}})


class Evaluation:
    """EasyEdit's multimodal evaluation functions for one editor, plus the protocol's extras."""

    def __init__(self, editor, image_root: str, image_cache: Optional[Dict[str, Any]] = None):
        from .. import compat

        self.compat = compat
        self.editor = editor
        self.image_root = image_root
        self.image_size = getattr(editor.model, "image_size", None)
        evaluate = compat.multimodal_evaluation()
        self._results = evaluate.compute_multimodal_edit_results
        self._prepare = evaluate.prepare_multimodal_edit
        self._quality = evaluate.compute_multimodal_edit_quality
        self._images: Dict[str, Any] = {} if image_cache is None else image_cache

    def path(self, rel: str) -> str:
        return image_path(self.image_root, rel)

    def image(self, rel: str):
        """A record image as EasyEdit's request preparation processes it (its BLIP processor), then
        the adapter's own resize to the model's resolution, which the adapter would apply anyway
        (``pixels.to_model_size``): cached at 64 px instead of 364 px (1.6 MB a tensor)."""
        if rel not in self._images:
            from .pixels import to_model_size

            pixels = self.compat.process_image_file(self.editor.vis_tok, self.path(rel))
            if self.image_size:
                pixels = to_model_size(pixels[None], self.image_size)[0]
            self._images[rel] = pixels
        return self._images[rel]

    def edit_arguments(self, records: Sequence[dict]) -> dict:
        return edit_arguments(records, self.image_root)

    def requests(self, records: Sequence[dict]) -> List[dict]:
        with self.compat.host_scope():
            return self.editor._prepare_requests(**self.edit_arguments(records))

    def five(self, request: dict, model=None) -> dict:
        """EasyEdit's ``compute_multimodal_edit_results`` on ``model`` (the editor's model as it is
        now by default)."""
        e = self.editor
        with self.compat.host_scope():
            return e_results(self._results(e.model if model is None else model, e.model_name, e.hparams, e.tok,
                                           request, e.hparams.device))

    def extra_items(self, record: dict) -> List[Tuple[str, str, str, str, str]]:
        """(metric, kind, image, prompt, target) for every extra evaluation item of a record."""
        items = []
        for field, metric, kind in EXTRA:
            for item in record.get(field, []):
                items.append((metric, kind, item["image"], VQA.format(item["question"]), item["answer"]))
        return items

    def argmax(self, items: Sequence[Tuple[str, str, str, str, str]], model=None) -> List[Tuple[tuple, tuple]]:
        """(predicted ids, target ids) on the answer positions of each item, through EasyEdit's
        ``prepare_multimodal_edit`` + ``compute_multimodal_edit_quality``; batched per target length.
        ``model``: the edited model EasyEdit's algorithm returned (SERAC's is not the editor's own
        model); the editor's model by default."""
        import torch

        e = self.editor
        out: List[Optional[Tuple[tuple, tuple]]] = [None] * len(items)
        groups: Dict[int, List[int]] = {}
        for i, (_, _, _, _, target) in enumerate(items):
            groups.setdefault(len(e.tok(target, add_special_tokens=False)["input_ids"]), []).append(i)
        with self.compat.host_scope():
            for idx in groups.values():
                images = torch.stack([self.image(items[i][2]) for i in idx]).to(f"cuda:{e.hparams.device}")
                batch = self._prepare(e.hparams, e.tok, [items[i][4] for i in idx], [items[i][3] for i in idx], images)
                _, pred_ids = self._quality(e.model if model is None else model, batch)
                labels = batch["labels"].cpu().numpy()
                for row, i in enumerate(idx):
                    target = tuple(int(x) for x in labels[row])
                    out[i] = (answer_ids(pred_ids[row], len(target)), target)
        return out  # type: ignore[return-value]


def answer_ids(predicted, n_answer: int) -> tuple:
    """The predictions at a row's ``n_answer`` answer positions, from what EasyEdit's evaluator
    returns: the PyPI release returns those positions only, main the whole row (0 outside the
    answer, which ends every left-padded row) - the last ``n_answer`` either way."""
    return tuple(int(x) for x in predicted.reshape(-1)[-n_answer:])


def e_results(result: dict) -> dict:
    """Accuracies as floats; locality outputs as flat integer lists."""
    import numpy as np

    out = {}
    for key, value in result.items():
        if key.endswith("_output"):
            out[key] = np.asarray(value).reshape(-1).astype(int).tolist()
        elif key.endswith("_acc"):
            out[key] = float(value)
    return out


def agreement(post: Sequence[int], pre: Sequence[int]) -> float:
    """EasyEdit's (PyPI) locality: mean(post == pre) over the answer positions."""
    assert len(post) == len(pre), (len(post), len(pre))
    return float(sum(a == b for a, b in zip(post, pre)) / max(len(post), 1))


def extra_metrics(items, post, pre) -> Dict[str, Optional[float]]:
    """Per-edit extra metrics: ``gen`` (accuracy of the new answer), ``near_shape``, ``near_colour``,
    ``far``, ``other_family`` (post-vs-pre agreement), ``near`` (both near-miss lists pooled)."""
    sums: Dict[str, List[float]] = {}
    for (metric, kind, *_), (post_ids, labels), (pre_ids, _) in zip(items, post, pre):
        if kind == "edit":
            value = float(sum(p == t for p, t in zip(post_ids, labels)) / max(len(labels), 1))
        else:
            value = agreement(post_ids, pre_ids)
        sums.setdefault(metric, []).append(value)
        if metric in ("near_shape", "near_colour"):
            sums.setdefault("near", []).append(value)
    return {m: (sum(v) / len(v) if v else None) for m, v in sums.items()}


def harmonic(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


# -------------------------------------------------------------------------------------------------
# One method on one seed
# -------------------------------------------------------------------------------------------------
class Method:
    """One row of the table: a host alone, with ODEdit, or an ODEdit variant."""

    edit_kind: Optional[str] = None  # what an edit leaves, where it is not only weights (no-leakage check)

    def __init__(self, host: str, yaml_path: str, odedit: bool, variant: Optional[str] = None,
                 overrides: Optional[dict] = None, lr: Optional[float] = None, common: Optional[dict] = None):
        self.host, self.yaml_path, self.odedit = host, yaml_path, odedit
        self.variant, self.overrides, self.lr, self.common = variant, overrides or {}, lr, common or {}

    @property
    def name(self) -> str:
        base = f"{self.host}+ODEdit" if self.odedit else self.host
        return f"{base}[{self.variant}]" if self.variant else base

    def hparams(self, data: Dict[str, str], model_dir: str, seed: int):
        from ..odedit.odedit_hparams import ODEditHyperParams

        with open(self.yaml_path) as f:
            config = yaml.safe_load(f)
        config = _merge(_merge(config, self.common), self.overrides)
        if self.lr is not None:
            config.setdefault("host_hparams", {})
            if not isinstance(config["host_hparams"], dict):
                raise BenchConfigError(f"{self.yaml_path}: the lr curve needs inline host_hparams")
            config["host_hparams"]["lr"] = float(self.lr)
        _point_at_world(config, data, model_dir, seed, enabled=self.odedit)
        return ODEditHyperParams.from_dict(config, source_path=self.yaml_path)

    def host_lr(self, hp) -> Optional[float]:
        return float(getattr(hp.host_params, "lr", float("nan"))) if hasattr(hp.host_params, "lr") else None

    @staticmethod
    def edited_state(editor, hp, requests) -> dict:
        """What an edit of ``requests`` leaves in the model: every tensor, after which it is undone."""
        from ..odedit.odedit_main import apply_odedit_to_multimodal_model

        _, restore = apply_odedit_to_multimodal_model(editor.model, editor.tok, requests, hp, keep_original_weight=True)
        state = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
        restore()
        return state

    @staticmethod
    def edit_in_sequence(editor, hp, request):
        """One edit of a sequence, kept; returns the model to evaluate."""
        from ..odedit.odedit_main import apply_odedit_to_multimodal_model

        apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp, keep_original_weight=False)
        return editor.model

    @staticmethod
    def end_sequence(editor) -> None:
        from .. import restore_all

        restore_all(editor.model)


def _point_at_world(config: dict, data: Dict[str, str], model_dir: str, seed: int, enabled: bool) -> None:
    """The model, image roots, seed and train-split pool of one bench world, into an ODEdit config."""
    image_root = os.path.abspath(data["image_root"])
    config.update(enabled=enabled, name=model_dir, tokenizer_name=model_dir, model_name="blip2",
                  coco_image=image_root, rephrase_image=image_root, seed=int(seed))
    env = dict(config.get("environments") or {})
    env.update(locality_pool=os.path.abspath(data["locality_pool"]), locality_image_root=image_root,
               paraphrases=env.get("paraphrases") or PARAPHRASES)
    config["environments"] = env


class MetaTrainedMethod(Method):
    """A host meta-trained per seed on the train split with EasyEdit's own ``MultimodalTrainer``
    (``train_meta``): the host alone with EasyEdit's objective (``alg`` = the host's key), the host
    with ODEdit with ``alg: ODEdit`` (EasyEdit's losses plus ODEdit's terms). ``trained(seed, alg)``
    gives the training's record (``archive``, ...), training on first use."""

    section_key: str = ""   # the bench config's section
    host_name: str = ""     # the plugin's host name (registry)
    host_alg: str = ""      # EasyEdit's training key

    def __init__(self, section: dict, odedit: bool, trained=None):
        super().__init__(self.host_name, section["yaml"], odedit)
        self.section, self.trained = section, trained

    @staticmethod
    def training_fields(model_dir: str, results_dir: str, seed: int) -> dict:
        """Host fields the seed's training needs beyond the section's (kept in the training record)."""
        return {}

    @property
    def training_alg(self) -> str:
        return "ODEdit" if self.odedit else self.host_alg

    def host_fields(self, editing_class) -> Tuple[dict, dict]:
        """The section's host fields that EasyEdit's editing hparams class takes."""
        import dataclasses

        with open(self.yaml_path) as f:
            config = yaml.safe_load(f)
        names = {f.name for f in dataclasses.fields(editing_class)}
        host = _merge(config["host_hparams"], self.section.get("train") or {})
        return config, {k: v for k, v in host.items() if k in names}


class MendMethod(MetaTrainedMethod):
    """MEND edited by EasyEdit's MEND executor from its archive: both rows edit through the same path
    (``enabled: false``, ``optimiser.steps`` = ``edit_steps``, 0 by default: the executor's edit
    only). With ``edit_odedit: true`` and ``edit_steps`` > 0, MEND+ODEdit also refines each edit under
    the ODEdit objective (the refine family) while MEND alone refines under the edit's NLL, same steps."""

    section_key, host_name, host_alg = "mend", "MEND", "MEND"

    def hparams(self, data: Dict[str, str], model_dir: str, seed: int):
        from .. import compat
        from ..odedit.odedit_hparams import ODEditHyperParams

        config, host = self.host_fields(compat.import_easyeditor().MENDMultimodalHparams)
        host.update(archive=self.trained(seed, self.training_alg)["archive"],
                    lr_scale=float(host.get("lr_scale", 1.0)), alg="MEND")
        config["host_hparams"] = host
        optimiser = dict(config.get("optimiser") or {}, steps=int(self.section.get("edit_steps", 0)))
        if self.section.get("edit_lr") is not None:  # the refinement's step, both rows (default: |edit_lr|)
            optimiser["lr"] = float(self.section["edit_lr"])
        config["optimiser"] = optimiser
        _point_at_world(config, data, model_dir, seed, enabled=self.odedit and bool(self.section.get("edit_odedit")))
        return ODEditHyperParams.from_dict(config, source_path=self.yaml_path)

    def host_lr(self, hp) -> Optional[float]:
        return float(hp.host_params.edit_lr)


class SeracMethod(MetaTrainedMethod):
    """SERAC edited by EasyEdit's own SERAC executor (``SERACMultimodalHparams`` with the archive):
    the edit goes into SERAC's memory, no weight changes; the edited model EasyEdit returns (the
    base model, the scope classifier and the counterfactual model with the edit in memory) is what
    is evaluated. ODEdit acts through meta-training only (SERAC has no weights an edit changes)."""

    section_key, host_name, host_alg = "serac", "SERAC", "SERAC_MULTI"
    edit_kind = "SERAC's memory (the edit texts it keeps) and every weight"

    @staticmethod
    def training_fields(model_dir: str, results_dir: str, seed: int) -> dict:
        """The scope classifier to start from: a small BERT over the model's vocabulary, the same for
        both objectives of a seed."""
        from ..hosts.serac import scope_classifier_for

        folder = os.path.join(os.path.dirname(results_dir), "scope-bert")
        return {"cls_name": scope_classifier_for(model_dir, folder, seed=seed)}

    def hparams(self, data: Dict[str, str], model_dir: str, seed: int):
        from .. import compat
        from ..hosts.easyedit_native import build_easyedit_hparams

        training = self.trained(seed, self.training_alg)
        _, host = self.host_fields(compat.import_easyeditor().SERACMultimodalHparams)
        host.update(archive=training["archive"], cls_name=training["cls_name"], alg_name="SERAC_MULTI")
        return build_easyedit_hparams("SERAC", host, _model_fields(self.yaml_path, data, model_dir), "bench serac")

    def host_lr(self, hp) -> Optional[float]:
        return None

    @staticmethod
    def edit_in_sequence(editor, hp, request):
        """EasyEdit's SERAC executor edits its own unedited SERAC each time (a memory of one edit):
        for a sequence it continues from the SERAC the last edit returned, so the memory grows."""
        from .. import compat

        with compat.host_scope():  # EasyEdit's executor outside its editor's own (scoped) entry points
            edited, _ = editor.apply_algo(editor.model, editor.tok, [request], hp, keep_original_weight=False)
        compat.editor_executor(editor).alg = edited
        return edited

    @staticmethod
    def end_sequence(editor) -> None:
        """Back to the memory-less SERAC the archive loaded (its memory is all a sequence changed)."""
        from .. import compat

        executor = compat.editor_executor(editor)
        if executor.is_init:
            executor.reset_model()  # EasyEdit's own reset: the next edit loads the archive again

    @staticmethod
    def edited_state(editor, hp, requests) -> dict:
        """SERAC's edit is its memory: the texts it keeps, and the weights (which must not change)."""
        from .. import compat

        with compat.host_scope():
            edited, _ = editor.apply_algo(editor.model, editor.tok, requests, hp, keep_original_weight=True)
        tensors = {**{f"base.{k}": v for k, v in editor.model.state_dict().items()},
                   **{k: v for k, v in edited.state_dict().items() if hasattr(v, "detach")}}
        return {"memory": (list(edited.cache_inputs), list(edited.cache_labels)),
                **{k: v.detach().clone() for k, v in tensors.items()}}


def _model_fields(yaml_path: str, data: Dict[str, str], model_dir: str, results_dir: Optional[str] = None) -> dict:
    """The model and image fields EasyEdit's own hparams classes take, for one bench world."""
    with open(yaml_path) as f:
        config = yaml.safe_load(f)
    image_root = os.path.abspath(data["image_root"])
    fields = dict(model_name="blip2", name=model_dir, tokenizer_name=model_dir,
                  tokenizer_class=config.get("tokenizer_class", "PreTrainedTokenizerFast"),
                  coco_image=image_root, rephrase_image=image_root, device=config.get("device", 0))
    if results_dir is not None:
        fields["results_dir"] = results_dir
    return fields


META_TRAINED = {"mend": MendMethod, "serac": SeracMethod}


def train_meta(method_cls, section: dict, alg: str, data: Dict[str, str], model_dir: str, seed: int,
               results_dir: str, progress: bool = True) -> Dict[str, Any]:
    """Meta-train a host (MEND, SERAC) on the train split with EasyEdit's own ``MultimodalTrainer``:
    ``alg`` = the host's key (EasyEdit's training hparams class) or ``ODEdit`` (the section's ODEdit
    YAML). The last ``val_records`` train records are the validation set; ``training_fields`` adds
    what a host needs per seed (SERAC's scope classifier). Returns the archive path and EasyEdit's
    final validation metrics."""
    from easyeditor import MultimodalTrainer

    from .. import compat
    from ..hosts.easyedit_native import build_easyedit_hparams
    from ..odedit.odedit_hparams import ODEditHyperParams
    from ..odedit.odedit_main import seeded

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
        trainer = MultimodalTrainer(config=hp, train_set=VQADataset(paths["fit"], config=hp),
                                    val_set=VQADataset(paths["val"], config=hp))
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


def _quiet_easyedit() -> None:
    """EasyEdit logs every edit at INFO to the console and logs/run.log; the bench keeps its own."""
    for name in ("easyeditor.editors.multimodal_editor", "easyeditor.editors.editor", "easyeditor",
                 "easyeditor.trainer.BaseTrainer", "easyeditor.trainer.MultimodalTrainer", "easyeditor.trainer.algs.MEND",
                 "easyeditor.trainer.models", "easyeditor.trainer.algs.local_nn", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_editor(hp):
    from easyeditor import MultimodalEditor

    editor = MultimodalEditor.from_hparams(hp)
    _quiet_easyedit()
    return editor


class SeedRun:
    """Everything of one seed: the records, the editor per method, the pre-edit cache."""

    def __init__(self, config: dict, seed: int, data: Dict[str, str], out: str, peak: PeakRSS, progress: bool):
        self.config, self.seed, self.data, self.out, self.peak = config, seed, data, out, peak
        self.progress = progress
        with open(data["test"]) as f:
            self.test = json.load(f)
        self._pre_extra: Dict[tuple, tuple] = {}
        self.images: Dict[str, Any] = {}  # evaluation images of this seed, shared by every method
        self.meta_training: Dict[str, Dict[str, Dict[str, Any]]] = {}  # host -> alg -> training record
        self.leakage: Dict[str, Dict[str, int]] = {}

    def trainer_for(self, method: MetaTrainedMethod):
        """``method.trained``: the seed's training of that host with ``alg`` (trained on first use)."""
        def trained(seed: int, alg: str) -> Dict[str, Any]:
            assert seed == self.seed
            done = self.meta_training.setdefault(method.host_name, {})
            if alg not in done:
                results_dir = os.path.join(self.out, method.section_key, f"seed{seed}", alg)
                done[alg] = train_meta(type(method), self.config[method.section_key], alg, self.data,
                                       self.config["base_model"], seed, results_dir, self.progress)
            return done[alg]

        return trained

    # -- pre-edit references on the unedited model (the same for every method of this seed) --
    def pre_extra(self, ev: Evaluation, record: dict, items) -> list:
        keys = [(it[2], it[3], it[4]) for it in items]
        todo = [i for i, k in enumerate(keys) if k not in self._pre_extra]
        if todo:
            for i, value in zip(todo, ev.argmax([items[i] for i in todo])):
                self._pre_extra[keys[i]] = value
        return [self._pre_extra[k] for k in keys]

    def rows_for(self, method: Method, hp, setting: str, records: List[Tuple[int, dict]], five_post: List[dict],
                 five_pre: List[dict], extra_post: List[list], extra_pre: List[list], items: List[list],
                 timing: List[Tuple[float, float]], chunk: Optional[int] = None) -> List[dict]:
        rows = []
        for j, (index, record) in enumerate(records):
            post, pre = five_post[j], five_pre[j]
            row = {"seed": self.seed, "setting": setting, "chunk": chunk, "method": method.name,
                   "host": method.host, "odedit": method.odedit, "variant": method.variant,
                   "lr": method.host_lr(hp), "curve": method.lr is not None, "record": index,
                   "position": j, "scope": {k: record["edit"][k] for k in ("shape", "colour", "family")},
                   "target": record["alt"], "pred": record["pred"]}
            for key, name in EASYEDIT_METRICS:
                row[name] = post.get(key)
            for key, name in EASYEDIT_METRICS[:3]:
                row[f"pre_{name}"] = pre.get(key)
            row.update(extra_metrics(items[j], extra_post[j], extra_pre[j]))
            k = len(record.get("eval_gen", [])) if row.get("gen") is not None else 0
            row["i_gen_all"] = (row["i_gen"] + k * (row["gen"] or 0.0)) / (1 + k)  # image_rephrase + eval_gen
            row["hm"] = harmonic(row["i_gen_all"], row.get("near"))
            row["edit_s"], row["peak_rss_mib"], before = timing[j]
            row["rss_delta_mib"] = row["peak_rss_mib"] - before  # growth over the RSS at the start of the edit
            rows.append(row)
        return rows

    # -- single editing through MultimodalEditor.edit ----------------------------------------
    def single(self, method: Method, n: int, setting: str = "single") -> List[dict]:
        if getattr(method, "runs_itself", False):  # IKE (benchmark/ike.py): no weights, its own loop
            return method.single(self, n, setting)
        hp = method.hparams(self.data, self.config["base_model"], self.seed)
        editor = build_editor(hp)
        ev = Evaluation(editor, self.data["image_root"], self.images)
        original_apply = editor.apply_algo
        state: Dict[str, Any] = {}

        def timed_apply(model, tok, requests, hparams, **kwargs):
            """What EasyEdit dispatches to, timed; the extra evaluation runs on the edited model
            before EasyEdit restores it."""
            before = self.peak.reset()
            start = time.perf_counter()
            result = original_apply(model, tok, requests, hparams, **kwargs)
            state["timing"] = (time.perf_counter() - start, self.peak.peak_mib(), before)
            state["extra_post"] = ev.argmax(state["items"], model=result[0])
            return result

        editor.apply_algo = timed_apply
        snapshot = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
        rows = []
        records = list(enumerate(self.test[:n]))
        bar = tqdm(records, desc=f"seed {self.seed} {setting} {method.name}" + (f" lr={method.lr:g}" if method.lr else ""),
                   leave=False, disable=not self.progress)
        for index, record in bar:
            items = ev.extra_items(record)
            extra_pre = self.pre_extra(ev, record, items)
            state["items"] = items
            metrics, _, _ = editor.edit(**ev.edit_arguments([record]), keep_original_weight=True, verbose=False)
            post, pre = e_results(metrics[0]["post"]), e_results(metrics[0]["pre"])
            rows += self.rows_for(method, hp, setting, [(index, record)], [post], [pre], [state["extra_post"]],
                                  [extra_pre], [items], [state["timing"]])
        self._check_restored(editor, snapshot)
        if setting == "single":
            self.leakage[method.name] = self.leakage_check(method, editor, hp, ev,
                                                           records[:int(self.config["leakage_check"])])
        return rows

    def leakage_check(self, method: Method, editor, hp, ev: Evaluation,
                      records: List[Tuple[int, dict]]) -> Dict[str, int]:
        """The protocol's no-leakage rule, for this method: each record edited twice - as it is, and
        with the next record's evaluation fields - must give a bit-identical edit."""
        identical = 0
        for (_, record), (_, other) in zip(records, records[1:] + records[:1]):
            swapped = {**record, **{k: other[k] for k in EVALUATION_FIELDS}}
            edits = [method.edited_state(editor, hp, ev.requests([rec])) for rec in (record, swapped)]
            identical += all(_equal(edits[0][k], edits[1][k]) for k in edits[0])
        check = {"records": len(records), "bit_identical": identical}
        if method.edit_kind:
            check["what"] = method.edit_kind
        return check

    # -- sequential editing ----------------------------------------------------------------
    def sequential(self, method: Method, T: int, chunk: int) -> List[dict]:
        hp = method.hparams(self.data, self.config["base_model"], self.seed)
        editor = build_editor(hp)
        ev = Evaluation(editor, self.data["image_root"], self.images)
        records = list(enumerate(self.test))[chunk * T:(chunk + 1) * T]
        requests = ev.requests([r for _, r in records])
        items = [ev.extra_items(r) for _, r in records]
        extra_pre = [self.pre_extra(ev, r, it) for (_, r), it in zip(records, items)]
        five_pre = [ev.five(req) for req in requests]
        original = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
        timing = []
        try:
            for req in tqdm(requests, desc=f"seed {self.seed} seq{T}/{chunk} {method.name}", leave=False,
                            disable=not self.progress):
                before = self.peak.reset()
                start = time.perf_counter()
                edited = method.edit_in_sequence(editor, hp, req)
                timing.append((time.perf_counter() - start, self.peak.peak_mib(), before))
            five_post = [ev.five(req, edited) for req in requests]
            extra_post = [ev.argmax(it, edited) for it in items]
        finally:
            method.end_sequence(editor)
        changed = [k for k, v in editor.model.state_dict().items() if not _equal(original[k], v)]
        if changed:
            raise RuntimeError(f"{method.name} seq{T} left {len(changed)} tensors changed after its restore: {changed[:3]}")
        for post, pre in zip(five_post, five_pre):  # locality as the PyPI editor computes it
            for key in ("locality", "multimodal_locality"):
                if f"{key}_output" in post:
                    post[f"{key}_acc"] = agreement(post[f"{key}_output"], pre[f"{key}_output"])
        return self.rows_for(method, hp, f"seq{T}", records, five_post, five_pre, extra_post, extra_pre, items,
                             timing, chunk=chunk)

    @staticmethod
    def _check_restored(editor, snapshot) -> None:
        """After single editing (EasyEdit restores after every record) the model must be unchanged."""
        changed = [k for k, v in editor.model.state_dict().items() if not _equal(snapshot[k], v)]
        if changed:
            raise RuntimeError(f"EasyEdit's restore left {len(changed)} tensors changed: {changed[:3]}")


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


# -------------------------------------------------------------------------------------------------
# The whole bench
# -------------------------------------------------------------------------------------------------
def methods(config: dict) -> List[Tuple[Method, List[str]]]:
    """(method, settings it runs in) for every host alone / with ODEdit and every variant."""
    settings = _settings(config)
    out = []
    for host, path in config["hosts"].items():
        out.append((Method(host, path, False, common=config["overrides"]), settings))
        out.append((Method(host, path, True, common=config["overrides"]), settings))
    for v in config["variants"]:
        out.append((Method(v["host"], config["hosts"][v["host"]], bool(v.get("odedit", True)), variant=v["name"],
                           overrides=v.get("overrides"), common=config["overrides"]),
                    [s for s in settings if s in v.get("settings", settings)]))
    for key, method_cls in META_TRAINED.items():
        section = config.get(key)
        if section:
            runs = [s for s in settings if s in section.get("settings", settings)]
            for odedit in (False, True):
                out.append((method_cls(section, odedit), runs))
    if config.get("ike"):
        from .ike import IkeMethod

        out.append((IkeMethod(config["ike"]), [s for s in settings if s == "single"]))
    return out


def _settings(config: dict) -> List[str]:
    out = []
    if (config["settings"].get("single") or {}).get("n"):
        out.append("single")
    seq = config["settings"].get("sequential") or {}
    out += [f"seq{t}" for t in seq.get("T", [])]
    return out


def plan(config: dict) -> List[Tuple[int, Method, str, Optional[int]]]:
    """Every (seed, method, setting, chunk) the bench runs, in order."""
    seq = config["settings"].get("sequential") or {}
    jobs = []
    curve = config.get("curve") or {}
    for seed in config["seeds"]:
        for method, settings in methods(config):
            if isinstance(method, MetaTrainedMethod) and seed not in method.section.get("seeds", config["seeds"]):
                continue
            for setting in settings:
                if setting == "single":
                    jobs.append((seed, method, "single", None))
                else:
                    jobs += [(seed, method, setting, c) for c in range(seq.get("chunks", 1))]
        if curve and seed in curve.get("seeds", config["seeds"][:1]):
            for host in curve.get("hosts", []):
                for lr in curve["lrs"]:
                    for odedit in (False, True):
                        jobs.append((seed, Method(host, config["hosts"][host], odedit, lr=float(lr),
                                                  common=config["overrides"]), "curve", None))
    return jobs


def run_bench(config_or_path, out: str, progress: bool = True, report: bool = True, workers: int = 1) -> Dict[str, Any]:
    """Run the bench; returns ``results.json``'s content (``report=False``: the run metadata).
    ``workers`` > 1: the jobs spread over that many processes, with the same result."""
    import torch

    import easyedit_odedit  # noqa: F401  (registers ODEdit in EasyEdit)

    config = load_config(config_or_path)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(int(config["threads"]))
    peak = PeakRSS()
    _quiet_easyedit()
    started = time.time()
    edits_path = os.path.join(out, "edits.jsonl")
    jobs = plan(config)
    meta = {"config": config, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "command": " ".join(["odedit"] + sys.argv[1:]) if sys.argv and "odedit" in os.path.basename(sys.argv[0]) else None,
            "versions": versions(), "base_model": base_model_info(config["base_model"]),
            "memory_measure": peak.measure, "threads": int(config["threads"]), "device": "cpu"
            if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "data": {}, "jobs": len(jobs),
            "workers": int(workers)}
    if workers > 1:  # the same jobs over several processes, merged in plan order (benchmark/parallel.py)
        from .parallel import run_spread

        run_spread(config, out, jobs, meta, workers, progress)
    else:
        with contextlib.chdir(out), open(edits_path, "w") as sink:  # EasyEdit writes logs/ in the cwd
            run_jobs(config, out, jobs, lambda _, rows: _write_rows(sink, rows), meta, peak, progress)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    meta["wall_s"] = round(time.time() - started, 1)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    if not report:
        return meta
    from .report import build

    return build(out, show=progress)


# -- the hook benchmark/parallel.py uses: any subset of the plan, run in order -----------------------
def run_jobs(config: dict, out: str, jobs: Sequence[tuple], sink, meta: Dict[str, Any], peak: PeakRSS,
             progress: bool, data: Optional[Dict[int, Dict[str, str]]] = None, desc: str = "bench",
             position: Optional[int] = None) -> None:
    """Run ``jobs`` (entries of ``plan(config)``) in order in this process: ``sink(i, rows)`` gets
    the rows of ``jobs[i]``; the seeds' data, meta-training and no-leakage records go into
    ``meta``. ``data``: seeds whose records are already written (``write_seed_data``)."""
    seeds_done: Dict[int, SeedRun] = {}
    bar = tqdm(jobs, desc=desc, disable=not progress, position=position)
    for i, (seed, method, setting, chunk) in enumerate(bar):
        if seed not in seeds_done:
            if data and seed in data:
                seed_data = data[seed]
            else:
                bar.set_postfix_str(f"records seed {seed}")
                seed_data = write_seed_data(config, out, seed)
            meta["data"][str(seed)] = {**seed_data, **_record_counts(seed_data)}
            _drop_pool_image_cache()  # the previous seed's pool images are not used again
            seeds_done = {seed: SeedRun(config, seed, seed_data, out, peak, progress)}
        run = seeds_done[seed]
        training = False
        if isinstance(method, MetaTrainedMethod):
            method.trained = run.trainer_for(method)
            training = method.training_alg not in run.meta_training.get(method.host_name, {})
        bar.set_postfix_str(f"seed {seed} " + (f"meta-training {method.name}, then " if training else "")
                            + f"{setting} {method.name}")
        if setting == "single":
            rows = run.single(method, int(config["settings"]["single"]["n"]))
        elif setting == "curve":
            rows = run.single(method, int(config["curve"].get("n", config["settings"]["single"]["n"])), "curve")
        else:
            rows = run.sequential(method, int(setting[3:]), int(chunk))
        sink(i, rows)
        for host, by_alg in run.meta_training.items():
            meta.setdefault("meta_training", {}).setdefault(host, {})[str(seed)] = by_alg
        for name, check in run.leakage.items():
            meta.setdefault("leakage", {}).setdefault(name, {})[str(seed)] = check


def write_seed_data(config: dict, out: str, seed: int) -> Dict[str, str]:
    """The seed's MiniMMEdit records, locality pool and images under ``out/data/seed<seed>``."""
    from . import records as records_mod

    rc = config["records"]
    return records_mod.write_benchmark(config["base_model"], os.path.join(out, "data", f"seed{seed}"),
                                       int(rc["n_train"]), int(rc["n_test"]), int(seed),
                                       int(rc.get("pool_images", 2000)))


def _write_rows(sink, rows: Sequence[dict]) -> None:
    for row in rows:
        sink.write(json.dumps(row) + "\n")
    sink.flush()


def _drop_pool_image_cache() -> None:
    """ODEdit keeps the pool images it has processed (up to ``POOL_IMAGE_CACHE_BYTES``) for the life
    of the process; each seed has its own pool, so drop the previous seed's."""
    from .. import environments

    environments._PROCESSED_POOL_IMAGES.clear()


def _record_counts(data: Dict[str, str]) -> Dict[str, int]:
    counts = {}
    for key in ("train", "test", "locality_pool"):
        with open(data[key]) as f:
            counts[f"n_{key}"] = len(json.load(f))
    return counts
