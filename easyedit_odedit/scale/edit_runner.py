"""``odedit edit``: every record of a user's E-VQA / E-IC file edited on its own, with EasyEdit's
datasets, editor and evaluation, on one process or on each process torchrun starts.

For each unit (one record, or ``--sequential T`` consecutive records) the runner

1. measures EasyEdit's metrics (``compute_multimodal_edit_results``) on the *unedited* model:
   ``pre`` (GitHub main's ``edit()`` measures it after the in-place edit, where pre = post);
2. edits through the algorithm ``MultimodalEditor`` dispatches to (``editor.apply_algo``), with the
   global generators seeded from the unit's first record, so a record's result does not depend on
   which process edits it or what was edited before;
3. measures ``post`` on the edited model (a sequence: every record after the last edit), locality
   as the PyPI editor computes it on both versions (post-vs-pre agreement of the answer tokens);
4. puts the weights back (the restore the algorithm returned; ODEdit's sequences: ``restore_all``)
   and checks they are back (a per-tensor checksum taken at the start), so the next unit starts
   from the unedited model (GitHub main's ``edit_dataset`` never restores);
5. appends the unit's rows to this process's results file (``shards``).

The hparams file may be an ODEdit YAML (``alg_name: ODEdit``) or EasyEdit's own YAML for one of its
multimodal methods (MEND, SERAC_MULTI; on GitHub main also WISE, GRACE, LoRA): the host alone,
through the same runner, so one tool compares both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import yaml
from tqdm.auto import tqdm

from ..errors import ODEditError, ODEditFileNotFoundError
from . import shards
from .distributed import Workers

KINDS = {"vqa": "Question: {} Short answer:", "caption": None}  # kind -> default prompt template
PRE_METRICS = ("rewrite_acc", "rephrase_acc", "image_rephrase_acc")
LOCALITY = ("locality", "multimodal_locality")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
FAIL_FOR_TEST = "ODEDIT_TEST_FAIL_AFTER"  # "RANK:K": that rank raises after K units (tests only)


@dataclasses.dataclass
class EditOptions:
    hparams: str
    data: str
    out: str
    kind: str = "vqa"
    sequential: int = 1
    limit: Optional[int] = None
    image_root: Optional[str] = None
    template: Optional[str] = None  # default: KINDS[kind]

    def check(self) -> None:
        """Bad options fail here, before a model is loaded, naming the option."""
        if self.kind not in KINDS:
            raise ODEditError("--kind", self.kind, f"use one of {sorted(KINDS)}")
        if self.sequential < 1:
            raise ODEditError("--sequential", self.sequential, "give T >= 1 (1: every record restored before the next)")
        if self.limit is not None and self.limit < 1:
            raise ODEditError("--limit", self.limit, "give N >= 1, or leave it out for every record")
        for option, path in (("--hparams", self.hparams), ("--data", self.data)):
            if not os.path.isfile(path):
                raise ODEditFileNotFoundError(option, path, "give the path of an existing file")
        if self.image_root is not None and not os.path.isdir(self.image_root):
            raise ODEditFileNotFoundError("--image-root", self.image_root, "give the folder the data's image paths "
                                          "are relative to")
        if self.template is not None and "{}" not in self.template:
            raise ODEditError("--template", self.template, "put {} where the record's question goes")

    @property
    def prompt_template(self) -> Optional[str]:
        return self.template if self.template is not None else KINDS[self.kind]


class ShardFailed(RuntimeError):
    """A process could not finish its records; the message names them."""


# -------------------------------------------------------------------------------------------------
# Hyper-parameters: ODEdit's YAML or EasyEdit's own
# -------------------------------------------------------------------------------------------------
def load_hparams(path: str, device=None):
    """ODEdit's hparams for ``alg_name: ODEdit``, else EasyEdit's own class for the YAML's
    ``alg_name`` (the classes the plugin's host registry names). ``device``: torchrun's per-process
    device, replacing the YAML's."""
    from .. import compat
    from ..hosts.easyedit_native import _require_installed, easyedit_hosts
    from ..odedit.odedit_hparams import ODEditHyperParams

    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ODEditError(f"--hparams {path}", type(config).__name__, "give a YAML mapping (an ODEdit or EasyEdit hparams file)")
    alg = config.get("alg_name")
    if alg == "ODEdit":
        if device is not None:
            config["device"] = device
        hparams = ODEditHyperParams.from_dict(config, source_path=path)
    else:
        by_alg = {h.easyedit_alg: (name, h.editing_hparams) for name, h in easyedit_hosts().items()}
        by_alg["SERAC"] = by_alg["SERAC_MULTI"]
        if alg not in by_alg:
            raise ODEditError(f"--hparams {path}: alg_name", alg, "use ODEdit, or EasyEdit's multimodal "
                              f"{', '.join(sorted(by_alg))} (IKE edits no weights: see the bench)")
        host, class_name = by_alg[alg]
        _require_installed(host, alg, f"--hparams {path}")
        hparams = getattr(compat.import_easyeditor(), class_name).from_hparams(path)
        if device is not None:
            hparams.device = device
        compat.complete_host_hparams(hparams)
    return hparams


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -------------------------------------------------------------------------------------------------
# One process's editing session
# -------------------------------------------------------------------------------------------------
class EditSession:
    """The editor, its evaluation and the weights' checksum, for the units of one process."""

    def __init__(self, options: EditOptions, hparams):
        from .. import compat
        from ..benchmark.evaluation import Evaluation
        from ..benchmark.methods import build_editor
        from ..models import hf_native

        self.options, self.hparams, self.compat = options, hparams, compat
        if options.image_root:  # EasyEdit's datasets join record paths to these
            hparams.coco_image = hparams.rephrase_image = os.path.abspath(options.image_root)
        self.editor = build_editor(hparams)
        if hf_native.is_native(self.editor.model):
            raise ODEditError("--hparams: model_name", hparams.model_name, "odedit edit evaluates with EasyEdit's "
                              "BLIP-2/MiniGPT-4 evaluation; GitHub main's Qwen2-VL / LLaVA-OneVision path is not "
                              "supported by this runner yet (use MultimodalEditor.edit)", problem="is not supported")
        self.evaluation = Evaluation(self.editor, hparams.coco_image or "")
        self.odedit = getattr(hparams, "alg_name", "") == "ODEdit"
        self.seed = int(getattr(hparams, "seed", 0) or 0)
        if options.sequential > 1 and getattr(hparams, "alg_name", "") in ("SERAC", "SERAC_MULTI"):
            raise ODEditError("--sequential", options.sequential, "SERAC keeps an edit in a memory it returns, not "
                              "in the model: edit it with --sequential 1")
        self.checksum = self._checksum()

    # -- data ---------------------------------------------------------------------------------
    def dataset(self, records: List[dict], folder: str):
        """EasyEdit's own dataset (``VQADataset`` / ``CaptionDataset``) over ``records``, written to
        a file of their own so a process loads only the images it edits."""
        classes = self.compat.multimodal_dataset_classes()
        path = os.path.join(folder, "records.json")
        with open(path, "w") as f:
            json.dump(records, f)
        return classes[self.options.kind](path, config=self.hparams)

    def request(self, item: dict) -> dict:
        """A dataset item as an edit request: the kind's prompt template on the questions (what
        GitHub main's ``edit_dataset(template=...)`` does to the prompt; the rephrase and the
        image-locality question are questions too)."""
        template = self.options.prompt_template
        request = dict(item)
        if template:
            for key in ("prompt", "rephrase_prompt", "multimodal_locality_prompt"):
                if key in request:
                    request[key] = template.format(request[key])
        return request

    # -- one unit -----------------------------------------------------------------------------
    def edit_unit(self, unit: Sequence[int], items: Sequence[dict]) -> List[dict]:
        from ..odedit.odedit_main import seeded

        requests = [self.request(item) for item in items]
        pre = [self.evaluation.five(r) for r in requests]
        restores = []
        with seeded(self.seed + unit[0]):
            start = time.perf_counter()
            try:
                edited = self.editor.model
                for request in requests:
                    edited, restore = self._apply(request, keep=not (self.odedit and len(unit) > 1))
                    restores.append((edited, restore))
                seconds = time.perf_counter() - start
                post = [self.evaluation.five(r, edited) for r in requests]
            finally:
                self._undo(restores)
        self._check_restored(unit)
        return [self._row(record, j, len(unit), pre[j], post[j], seconds / len(unit))
                for j, record in enumerate(unit)]

    def _apply(self, request: dict, keep: bool):
        with self.compat.host_scope():
            return self.editor.apply_algo(self.editor.model, self.editor.tok, [request], self.editor.hparams,
                                          copy=False, return_orig_weights=True, keep_original_weight=keep)

    def _undo(self, restores) -> None:
        """The algorithm's own restores, last edit first; an ODEdit sequence (kept edits) with
        ``restore_all``."""
        import torch

        from .. import restore_all

        if self.odedit and len(restores) > 1:
            restore_all(self.editor.model)
            return
        params = dict(self.editor.model.named_parameters())
        for edited, restore in reversed(restores):
            if callable(restore):
                restore()
            elif hasattr(edited, "unload") and edited is not self.editor.model:  # main's peft LoRA
                self.editor.model = edited.unload()
            else:
                with torch.no_grad():
                    for name, value in (restore or {}).items():
                        params[name].copy_(value.to(params[name].device))

    def _checksum(self) -> Dict[str, tuple]:
        import torch

        with torch.no_grad():
            return {k: (float(v.double().sum()), float(v.double().square().sum()))
                    for k, v in self.editor.model.state_dict().items() if torch.is_floating_point(v)}

    def _check_restored(self, unit) -> None:
        now = self._checksum()
        changed = [k for k, v in self.checksum.items() if now.get(k) != v]
        if changed:
            raise RuntimeError(f"after records {list(unit)} the restore left {len(changed)} tensors changed "
                               f"({changed[:3]}); stopped so that no later record starts from an edited model")

    @staticmethod
    def _row(record: int, position: int, length: int, pre: dict, post: dict, seconds: float) -> dict:
        from ..benchmark.evaluation import agreement

        post = dict(post)
        for key in LOCALITY:
            if f"{key}_output" in post and f"{key}_output" in pre:
                post[f"{key}_acc"] = agreement(post[f"{key}_output"], pre[f"{key}_output"])
        row = {"record": record, "pre": {k: pre[k] for k in PRE_METRICS if k in pre},
               "post": {k: v for k, v in post.items() if k.endswith("_acc")}, "edit_s": round(seconds, 4)}
        if length > 1:
            row.update(sequence_start=record - position, position=position)
        return row


# -------------------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------------------
def editable_records(options: EditOptions) -> Dict[int, dict]:
    """{index in the data file: record} for the records EasyEdit's datasets edit (they skip an
    empty ``alt``), the first ``--limit``; images checked up front."""
    with open(options.data) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ODEditError("--data", options.data, f"give a JSON list of E-VQA/E-IC records ({err})") from None
    if not isinstance(data, list):
        raise ODEditError("--data", options.data, "give a JSON list of records", problem="is not a JSON list")
    keep = {i: r for i, r in enumerate(data) if isinstance(r, dict) and r.get("alt", "") != ""}
    if options.limit:
        keep = dict(list(keep.items())[:options.limit])
    if not keep:
        raise ODEditError("--data", options.data, "give records with a non-empty `alt` (the new answer)",
                          problem="has no record to edit")
    return keep


def check_images(records: Dict[int, dict], image_root: str) -> None:
    for index, record in records.items():
        for key in IMAGE_FIELDS:
            if key not in record:
                raise ODEditError(f"--data: record {index}", sorted(record), f"every record needs `{key}`",
                                  problem=f"has no `{key}`")
            path = os.path.join(image_root, record[key])
            if not os.path.isfile(path):
                raise ODEditFileNotFoundError(f"--data: record {index} `{key}`", path,
                                              "pass --image-root (the folder the data's image paths are relative "
                                              "to), or fix coco_image in the YAML")


def run_fingerprint(options: EditOptions) -> dict:
    """What must not change between a run and its rerun in the same --out."""
    return {"hparams": os.path.abspath(options.hparams), "hparams_sha256": _sha256(options.hparams),
            "data": os.path.abspath(options.data), "data_sha256": _sha256(options.data), "kind": options.kind,
            "sequential": options.sequential, "limit": options.limit, "template": options.prompt_template,
            "image_root": os.path.abspath(options.image_root) if options.image_root else None}


def _check_same_run(out: str, fingerprint: dict) -> None:
    path = os.path.join(out, "run.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        earlier = json.load(f).get("fingerprint", {})
    for key, value in fingerprint.items():
        if key in earlier and earlier[key] != value:
            option = {"hparams_sha256": "hparams", "data_sha256": "data"}.get(key, key).replace("_", "-")
            raise ODEditError("--out", out, f"use a new --out, or delete {out} to start over "
                              f"(--{option} differs from the run whose results are there)",
                              problem="holds the results of a different run")


def _fail_for_test(workers: Workers, done: int) -> None:
    spec = os.environ.get(FAIL_FOR_TEST)
    if spec:
        rank, after = (int(x) for x in spec.split(":"))
        if rank == workers.rank and done >= after:
            raise RuntimeError(f"{FAIL_FOR_TEST}={spec}: rank {rank} fails on purpose after {after} unit(s)")


def run(options: EditOptions, workers: Optional[Workers] = None, progress: bool = True) -> Optional[dict]:
    """Edit this process's shard; the last process to arrive (rank 0) merges and summarises.
    Returns ``results.json``'s content on rank 0 (None on the other ranks)."""
    import easyedit_odedit  # noqa: F401  (registers ODEdit in EasyEdit)

    workers = workers or Workers()
    options.check()
    out = os.path.abspath(options.out)
    fingerprint = run_fingerprint(options)
    os.makedirs(out, exist_ok=True)
    _check_same_run(out, fingerprint)
    records = editable_records(options)
    all_units = shards.units(sorted(records), options.sequential)
    done_before = shards.complete_units(shards.finished(out), all_units)
    todo = shards.pending(all_units, done_before)
    mine = shards.shard(todo, workers.rank, workers.world)
    workers.barrier()  # every process has read what is finished before any writes
    if workers.rank == 0:
        _write_json(os.path.join(out, "run.json"), {"fingerprint": fingerprint})
    started = time.time()
    hparams = load_hparams(options.hparams, device=workers.device)
    image_root = os.path.abspath(options.image_root) if options.image_root else (hparams.coco_image or "")
    check_images({r: records[r] for u in mine for r in u}, image_root)
    if mine:
        _edit_shard(options, hparams, workers, mine, records, out, progress)
    workers.barrier()
    if workers.rank != 0:
        return None
    rows = shards.merge(out, all_units)
    summary = summarise(options, fingerprint, records, rows, workers,
                        {"edited": sum(len(u) for u in todo), "skipped_finished": len(done_before),
                         "wall_s": round(time.time() - started, 1)})
    write_summary(out, summary)
    return summary


def _edit_shard(options, hparams, workers: Workers, mine, records, out: str, progress: bool) -> None:
    session = EditSession(options, hparams)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".rank{workers.rank}-") as folder:
        order = [r for u in mine for r in u]
        dataset = session.dataset([records[r] for r in order], folder)
        items = dict(zip(order, (dataset[i] for i in range(len(dataset)))))
        sink = shards.Appender(shards.part_path(out, workers.rank, workers.world))
        desc = f"odedit edit rank {workers.rank}/{workers.world}" if workers.distributed else "odedit edit"
        bar = tqdm(mine, desc=desc, unit="unit" if options.sequential > 1 else "record", disable=not progress,
                   position=workers.rank if workers.distributed else None)
        for n, unit in enumerate(bar):
            try:
                _fail_for_test(workers, n)
                rows = session.edit_unit(unit, [items[r] for r in unit])
            except Exception as err:
                left = [r for u in mine[n:] for r in u]
                raise ShardFailed(
                    f"odedit edit: process {workers.rank} of {workers.world} failed on record(s) {list(unit)} "
                    f"({type(err).__name__}: {err}). Its records not edited: {left}. The {sum(map(len, mine[:n]))} "
                    f"it finished are kept in {out}; run the same command again to edit only the missing ones."
                ) from err
            sink.write(rows)


# -------------------------------------------------------------------------------------------------
# Summary
# -------------------------------------------------------------------------------------------------
def summarise(options: EditOptions, fingerprint: dict, records: Dict[int, dict], rows: List[dict],
              workers: Workers, this_run: dict) -> dict:
    from .. import compat
    from ..benchmark.versions import versions

    means = {}
    for phase in ("pre", "post"):
        keys = sorted({k for row in rows for k in row[phase]})
        means[phase] = {k: _mean([row[phase][k] for row in rows if k in row[phase]]) for k in keys}
    missing = sorted(set(records) - {row["record"] for row in rows})
    return {"command": " ".join(["odedit"] + sys.argv[1:]), "fingerprint": fingerprint,
            "easyedit": compat.flavour(), "versions": versions(), "processes": workers.world,
            "n_editable": len(records), "n_edited": len(rows), "missing": missing, "means": means,
            "this_run": this_run}


def _mean(values: Sequence[float]) -> Optional[float]:
    return round(sum(values) / len(values), 6) if values else None


def write_summary(out: str, summary: dict) -> None:
    _write_json(os.path.join(out, "results.json"), summary)
    fp = summary["fingerprint"]
    lines = [f"# odedit edit: {os.path.basename(fp['data'])} with {os.path.basename(fp['hparams'])}", "",
             f"{summary['n_edited']} of {summary['n_editable']} records edited "
             + (f"(sequences of {fp['sequential']}, restored between sequences)" if fp["sequential"] > 1
                else "(each restored before the next)")
             + f"; EasyEdit {summary['easyedit']}; pre measured on the unedited model.", "",
             "| metric | pre | post |", "|---|---|---|"]
    for key in sorted(summary["means"]["post"]):
        pre = summary["means"]["pre"].get(key)
        post = summary["means"]["post"][key]
        lines.append(f"| {key} | {'' if pre is None else f'{pre:.4f}'} | {'' if post is None else f'{post:.4f}'} |")
    if summary["missing"]:
        lines += ["", f"Not edited yet: records {summary['missing']} (rerun the same command)."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _write_json(path: str, value: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
