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
``eval_near_colour``, ``eval_far``, ``eval_other_family``; see ``evaluation.EXTRA``), with EasyEdit's
``prepare_multimodal_edit`` / ``compute_multimodal_edit_quality`` on the edited model. The
keep-type extras are also scored on the items no edit of the chunk changes (``near_kept``,
``far_kept``, ...; ``evaluation.changed_by_sequence``): in a sequence, another edit of the chunk
can edit the very concept a near-miss item shows. The runner writes one JSON line per edit to
``DIR/edits.jsonl`` and the run's metadata to ``DIR/run.json``; ``report.build`` turns them into
``results.json``, ``results.md`` and ``results.png``.

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
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .. import environments
from ..odedit.odedit_main import take_edit_logs
from . import records as records_mod
from .config import _merge, chunks, load_config
from .evaluation import (EASYEDIT_METRICS, EVALUATION_FIELDS, Evaluation, agreement, changed_by_sequence, e_results,
                         extra_metrics, harmonic)
from .ike import IkeMethod
from .memory import PeakRSS
from .meta_training import train_meta
from .methods import META_TRAINED, MetaTrainedMethod, Method, _quiet_easyedit, build_editor
from .parallel import JobRunner, run_spread
from .report import build
from .versions import base_model_info, versions


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
                 timing: List[Tuple[float, float, float, dict]], chunk: Optional[int] = None) -> List[dict]:
        rows = []
        evaluated_together = [record for _, record in records]  # the chunk; one record in single editing
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
            changed = changed_by_sequence(record, evaluated_together)
            row.update(extra_metrics(items[j], extra_post[j], extra_pre[j], changed))
            k = len(record.get("eval_gen", [])) if row.get("gen") is not None else 0
            row["i_gen_all"] = (row["i_gen"] + k * (row["gen"] or 0.0)) / (1 + k)  # image_rephrase + eval_gen
            row["hm"] = harmonic(row["i_gen_all"], row.get("near"))
            row["hm_kept"] = harmonic(row["i_gen_all"], row.get("near_kept"))
            row["edit_s"], row["peak_rss_mib"], before, logged = timing[j]
            row.update(logged)
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
            state["timing"] = (time.perf_counter() - start, self.peak.peak_mib(), before, logged_by_edit(result[0]))
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
                timing.append((time.perf_counter() - start, self.peak.peak_mib(), before, logged_by_edit(edited)))
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
    meta_trained = {method_cls.host_name: (method_cls, config[key]) for key, method_cls in META_TRAINED.items()
                    if config.get(key)}
    for v in config["variants"]:
        runs = [s for s in settings if s in v.get("settings", settings)]
        if v["host"] in meta_trained:  # MEND's editing settings; its archive is the seed's ODEdit training
            method_cls, section = meta_trained[v["host"]]
            out.append((method_cls(section, True, variant=v["name"],
                                   overrides=_merge(config["overrides"], v.get("overrides") or {})),
                        [s for s in runs if s in section.get("settings", settings)]))
            continue
        out.append((Method(v["host"], config["hosts"][v["host"]], bool(v.get("odedit", True)), variant=v["name"],
                           overrides=v.get("overrides"), common=config["overrides"]), runs))
    for method_cls, section in meta_trained.values():
        runs = [s for s in settings if s in section.get("settings", settings)]
        for odedit in (False, True):  # the bench's overrides set the editing formulation (host fields: the section's)
            out.append((method_cls(section, odedit, overrides=config["overrides"]), runs))
    if config.get("ike"):
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
                    jobs += [(seed, method, setting, c) for c in range(chunks(seq, int(setting[3:])))]
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
        run_spread(config, out, jobs, meta, workers, progress, JobRunner(plan, run_jobs, write_seed_data))
    else:
        with contextlib.chdir(out), open(edits_path, "w") as sink:  # EasyEdit writes logs/ in the cwd
            run_jobs(config, out, jobs, lambda _, rows: _write_rows(sink, rows), meta, peak, progress)
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    meta["wall_s"] = round(time.time() - started, 1)
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    if not report:
        return meta
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


def logged_by_edit(model) -> Dict[str, Optional[float]]:
    """What the last ODEdit call on ``model`` logged that a row keeps: the optimisation ``steps`` it
    took (every round; None where it did not go through ODEdit's loop: SERAC, IKE, a meta-trained
    host's executor alone) and, for a refined host (MEND), ``refined_from_unedited``: the share of
    its edits whose refinement discarded the host's proposal for the weights before it."""
    logs = take_edit_logs(model)
    steps = [entry["steps"] for entry in logs if "steps" in entry]
    logged = {"steps": float(sum(steps)) if steps else None}
    discarded = [entry["started_before_host"] for entry in logs if "started_before_host" in entry]
    if discarded:
        logged["refined_from_unedited"] = sum(discarded) / len(discarded)
    return logged


def write_seed_data(config: dict, out: str, seed: int) -> Dict[str, str]:
    """The seed's MiniMMEdit records, locality pool and images under ``out/data/seed<seed>``."""
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
    environments._PROCESSED_POOL_IMAGES.clear()


def _record_counts(data: Dict[str, str]) -> Dict[str, int]:
    counts = {}
    for key in ("train", "test", "locality_pool"):
        with open(data[key]) as f:
            counts[f"n_{key}"] = len(json.load(f))
    return counts
