"""Turn a bench run (``DIR/edits.jsonl`` + ``DIR/run.json``) into ``results.json``, ``results.md``
(also printed) and ``results.png``.

    python -m easyedit_odedit.benchmark.report DIR

``results.json``:

* ``meta``: command, dates, wall time, versions (easyeditor, torch, transformers, ...), the base
  model's manifest accuracy per question type, the memory measure, threads, device;
* ``record_counts``: records written per seed (train, test, locality pool) and edits per method
  and setting;
* ``per_seed[setting][method][seed][metric]``: means over the edits of one seed;
* ``summary[setting][method][metric]``: ``mean``/``std`` over seeds (std with ddof 1; 0 for one
  seed), ``n_seeds``, ``n_edits``;
* ``paired[setting][method][metric]``: per-edit differences *method minus its host alone* on the
  same records (same seed, chunk and record), ``mean``, bootstrap 95% interval (numpy, 2,000
  resamples of the edits, percentile), ``n``, and the differences themselves with their keys;
* ``time_memory[setting][method]``: per-edit wall time (mean, median, s), peak RSS (MiB) and, where
  the edit ran ODEdit's loop, the steps it took (``steps_mean``/``_median``/``_max``); for a refined
  host (MEND), the share of edits whose refinement discarded the host's proposal (``refined_from_unedited``);
* ``curve``: Rel-vs-locality points over the host learning rate, host alone and with ODEdit;
* ``excluded[setting][method][metric]``: items left out of the fair locality figures
  (``excluded``), items there were (``items``) and the ``share``;
* ``fair_fallback_rows[setting]``: rows of an ``edits.jsonl`` written before the fair figures (their
  all-items figures stand in; the tables say so);
* ``not_run``: what the config lists as not run, with the reason;
* ``per_edit``: every row of ``edits.jsonl``, as written.

Metrics (fractions in [0, 1]; the tables show %): ``rel`` (EasyEdit ``rewrite_acc``), ``t_gen``
(``rephrase_acc``, the held-out template), ``i_gen`` (``image_rephrase_acc``), ``t_loc``
(``locality_acc``), ``i_loc`` (``multimodal_locality_acc``, one near miss), ``gen`` (the new answer
on up to 5 more images of the edited concept), ``near`` (post-vs-pre agreement on up to 10 near-miss
images: ``near_shape`` same shape other colour, ``near_colour`` same colour other shape), ``far``
(other shape and colour), ``other_family`` (the other question family on the edit image),
``i_gen_all`` (I-Gen over ``image_rephrase`` and the ``gen`` images), ``hm`` (per-edit harmonic mean
of ``i_gen_all`` and ``near``).

Fair locality: ``near_kept``, ``near_shape_kept``, ``near_colour_kept``, ``far_kept``,
``other_family_kept`` and ``hm_kept`` are the same figures over the items that no edit evaluated
with the record changes (``evaluation.changed_by_sequence``). In single editing that is every item
(the figures are equal); in a sequence it leaves out the items whose concept and question family
another edit of the chunk edits, which a perfect editor must change. The tables show the fair
figures as Near, Far, Other-Q and HM, and in sequences today's all-items figures beside them as
"(all items)".
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

# the fair figure (items no edit evaluated with it changes) -> today's figure over all items
KEPT = {"near_kept": "near", "near_shape_kept": "near_shape", "near_colour_kept": "near_colour",
        "far_kept": "far", "other_family_kept": "other_family", "hm_kept": "hm"}
METRICS = ("rel", "t_gen", "i_gen", "t_loc", "i_loc", "gen", "near", "near_shape", "near_colour", "far",
           "other_family", "i_gen_all", "hm") + tuple(KEPT)
PAIRED = ("rel", "t_gen", "i_gen", "i_gen_all", "near", "hm", "i_loc", "far", "t_loc", "other_family") + tuple(KEPT)
LABELS = {"rel": "Rel", "t_gen": "T-Gen", "i_gen": "I-Gen", "t_loc": "T-Loc", "i_loc": "I-Loc", "gen": "Gen5",
          "near_kept": "Near", "near_shape_kept": "Near-S", "near_colour_kept": "Near-C", "far_kept": "Far",
          "other_family_kept": "Other-Q", "i_gen_all": "I-Gen6", "hm_kept": "HM(I-Gen6,Near)",
          "near": "Near (all items)", "near_shape": "Near-S (all items)", "near_colour": "Near-C (all items)",
          "far": "Far (all items)", "other_family": "Other-Q (all items)", "hm": "HM (all items)"}
TABLE_COLUMNS = ("rel", "t_gen", "i_gen", "t_loc", "i_loc", "gen", "near_kept", "far_kept", "other_family_kept",
                 "hm_kept")
ALL_ITEMS_COLUMNS = ("near", "far", "other_family")  # beside the fair figures in sequence tables
PAIRED_COLUMNS = ("rel", "t_gen", "i_gen", "i_gen_all", "near_kept", "far_kept", "hm_kept")
EXCLUDED_SHOWN = ("near", "far", "other_family")
BOOTSTRAP = 2000
SETTING_ORDER = ("single", "seq5", "seq10")


def load_rows(out: str) -> List[dict]:
    with open(os.path.join(out, "edits.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def bootstrap_ci(diffs: Sequence[float], resamples: int = BOOTSTRAP, seed: int = 0) -> List[float]:
    """Percentile 95% interval of the mean, resampling the paired edits."""
    values = np.asarray(diffs, dtype=float)
    if len(values) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def with_fair_fallback(rows: List[dict]) -> Tuple[List[dict], Dict[str, int]]:
    """The rows the tables read, and per setting how many rows predate the fair locality figures
    (an ``edits.jsonl`` written before them): those rows get today's all-items figures in their
    place - the same figures in single editing, where no other edit is evaluated with a record;
    the report says so for sequences."""
    out, old = [], defaultdict(int)
    for r in rows:
        if "excluded" in r:
            out.append(r)
        else:
            old[r["setting"]] += 1
            out.append({**r, **{fair: r.get(everything) for fair, everything in KEPT.items()}})
    return out, dict(old)


def excluded_shares(rows: List[dict]) -> Dict[str, Dict[str, Dict[str, Dict[str, float]]]]:
    """Per setting, method and keep-type metric: items left out of the fair figure (changed by
    another edit of the chunk), items there were, and the share; rows without the counts are not
    counted."""
    counts: Dict[tuple, List[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        if r["setting"] == "curve" or "excluded" not in r:
            continue
        for metric, n_items in r["items"].items():
            counts[r["setting"], r["method"], metric][0] += r["excluded"][metric]
            counts[r["setting"], r["method"], metric][1] += n_items
    out: Dict[str, Dict[str, Dict[str, Dict[str, float]]]] = {}
    for (setting, method, metric), (e, n) in counts.items():
        out.setdefault(setting, {}).setdefault(method, {})[metric] = {"excluded": e, "items": n,
                                                                      "share": e / n if n else 0.0}
    return out


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _sorted_settings(settings) -> List[str]:
    return sorted(settings, key=lambda s: (SETTING_ORDER.index(s) if s in SETTING_ORDER else 99, s))


def summarise(rows: List[dict]) -> Dict[str, Any]:
    main = [r for r in rows if r["setting"] != "curve"]
    per_seed: Dict[str, Dict[str, Dict[str, Dict[str, Optional[float]]]]] = {}
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in main:
        groups[(r["setting"], r["method"], r["seed"])].append(r)
    for (setting, method, seed), rs in groups.items():
        per_seed.setdefault(setting, {}).setdefault(method, {})[str(seed)] = {
            **{m: _mean(r.get(m) for r in rs) for m in METRICS}, "n_edits": len(rs)}
    summary: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for setting, by_method in per_seed.items():
        for method, by_seed in by_method.items():
            entry = {}
            for m in METRICS:
                values = [s[m] for s in by_seed.values() if s[m] is not None]
                if values:
                    entry[m] = {"mean": float(np.mean(values)),
                                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                                "n_seeds": len(values)}
            entry["n_edits"] = sum(s["n_edits"] for s in by_seed.values())
            summary.setdefault(setting, {})[method] = entry
    return {"per_seed": per_seed, "summary": summary}


def paired_differences(rows: List[dict]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Every method that is not a host alone, minus its host alone, edit by edit."""
    main = [r for r in rows if r["setting"] != "curve"]
    alone = {(r["setting"], r["host"], r["seed"], r["chunk"], r["record"]): r
             for r in main if not r["odedit"] and not r["variant"]}
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    by_method: Dict[tuple, List[dict]] = defaultdict(list)
    for r in main:
        if r["odedit"] or r["variant"]:
            by_method[(r["setting"], r["method"])].append(r)
    for (setting, method), rs in by_method.items():
        entry: Dict[str, Any] = {"versus": rs[0]["host"]}
        for m in PAIRED:
            keys, diffs = [], []
            for r in rs:
                base = alone.get((r["setting"], r["host"], r["seed"], r["chunk"], r["record"]))
                if base is None or r.get(m) is None or base.get(m) is None:
                    continue
                keys.append([r["seed"], r["chunk"], r["record"]])
                diffs.append(float(r[m]) - float(base[m]))
            if diffs:
                entry[m] = {"mean": float(np.mean(diffs)), "ci95": bootstrap_ci(diffs), "n": len(diffs),
                            "diffs": diffs, "keys": keys}
        out.setdefault(setting, {})[method] = entry
    return out


def time_memory(rows: List[dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        if r["setting"] != "curve":
            groups[(r["setting"], r["method"])].append(r)
    for (setting, method), rs in groups.items():
        t = np.array([r["edit_s"] for r in rs])
        mem = np.array([r["peak_rss_mib"] for r in rs])
        delta = np.array([r.get("rss_delta_mib", np.nan) for r in rs], dtype=float)
        out.setdefault(setting, {})[method] = {"edit_s_mean": float(t.mean()), "edit_s_median": float(np.median(t)),
                                               "edit_s_max": float(t.max()), "peak_rss_mib_median": float(np.median(mem)),
                                               "peak_rss_mib_max": float(mem.max()),
                                               "rss_delta_mib_median": float(np.median(delta)),
                                               "rss_delta_mib_max": float(np.max(delta)), "n": len(rs)}
        steps = [r["steps"] for r in rs if r.get("steps") is not None]
        if steps:  # the optimisation steps an edit took (ODEdit's loop; every re-probing round)
            out[setting][method].update(steps_mean=float(np.mean(steps)), steps_median=float(np.median(steps)),
                                        steps_max=float(np.max(steps)))
        discarded = [r["refined_from_unedited"] for r in rs if r.get("refined_from_unedited") is not None]
        if discarded:
            out[setting][method]["refined_from_unedited"] = float(np.mean(discarded))
    return out


def curve_points(rows: List[dict]) -> List[dict]:
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for r in rows:
        if r["setting"] == "curve":
            groups[(r["host"], r["odedit"], r["lr"])].append(r)
    points = []
    for (host, odedit, lr), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        points.append({"host": host, "odedit": odedit, "method": rs[0]["method"], "lr": lr, "n": len(rs),
                       "seeds": sorted({r["seed"] for r in rs}),
                       **{m: _mean(r.get(m) for r in rs) for m in METRICS}})
    return points


def build(out: str, show: bool = True) -> Dict[str, Any]:
    original = load_rows(out)
    rows, without_fair = with_fair_fallback(original)
    with open(os.path.join(out, "run.json")) as f:
        meta = json.load(f)
    config = meta.get("config", {})
    results: Dict[str, Any] = {
        "meta": {k: meta.get(k) for k in ("command", "started", "finished", "wall_s", "versions", "memory_measure",
                                          "threads", "device", "platform", "cpu_count")},
        "config": config,
        "base_model": meta.get("base_model"),
        "record_counts": {"per_seed": {s: {k: v for k, v in d.items() if k.startswith("n_")}
                                       for s, d in meta.get("data", {}).items()}},
        "metric_definitions": {m: LABELS[m] for m in METRICS},
    }
    results.update(summarise(rows))
    edits = defaultdict(dict)
    for setting, by_method in results["summary"].items():
        for method, entry in by_method.items():
            edits[setting][method] = entry["n_edits"]
    results["record_counts"]["edits"] = dict(edits)
    results["paired"] = paired_differences(rows)
    results["time_memory"] = time_memory(rows)
    results["curve"] = curve_points(rows)
    results["excluded"] = excluded_shares(rows)
    results["fair_fallback_rows"] = without_fair
    results["meta_training"] = meta.get("meta_training", {})
    results["leakage"] = meta.get("leakage", {})
    results["not_run"] = config.get("not_run", {})
    results["per_edit"] = original
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    plot(results, os.path.join(out, "results.png"))
    if show:
        print(md)
        print(f"written: {os.path.join(out, 'results.json')}, results.md, results.png")
    return results


# -------------------------------------------------------------------------------------------------
# Markdown
# -------------------------------------------------------------------------------------------------
def _pct(entry: Optional[dict], std: bool = True) -> str:
    if not entry:
        return "–"
    if std and entry.get("n_seeds", 1) > 1:
        return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"
    return f"{100 * entry['mean']:.1f}"


def _method_order(methods, config) -> List[str]:
    hosts = list(config.get("hosts", {}))

    def key(m: str):
        host = m.split("+")[0].split("[")[0]
        return (hosts.index(host) if host in hosts else 99, "+" in m, "[" in m, m)

    return sorted(methods, key=key)


def markdown(results: Dict[str, Any]) -> str:
    meta, config = results["meta"], results.get("config", {})
    v = meta.get("versions") or {}
    acc = (results.get("base_model") or {}).get("accuracy") or {}
    lines = [f"# MiniMMEdit benchmark: {config.get('name', '')}", "",
             f"Command: `{meta.get('command') or 'odedit bench --config ' + str(config.get('source'))}`  ",
             f"Run: {meta.get('started')} → {meta.get('finished')} ({meta.get('wall_s')} s), {meta.get('device')}, "
             f"{meta.get('threads')} thread(s), {meta.get('cpu_count')} cores  ",
             f"Versions: easyeditor {v.get('easyeditor')} ({v.get('easyeditor_flavour')}), torch {v.get('torch')}, "
             f"transformers {v.get('transformers')}, peft {v.get('peft')}, python {v.get('python')}  ",
             "Base model (shipped manifest, teacher-forced answer accuracy): " + ", ".join(
                 f"{k} {acc[k]}%" for k in ("colour", "shape", "yesno", "text_heldout") if k in acc) + "  ",
             f"Seeds: {config.get('seeds')}; records per seed: " + "; ".join(
                 f"seed {s}: {c.get('n_train')} train / {c.get('n_test')} test / {c.get('n_locality_pool')} pool entries"
                 for s, c in results["record_counts"]["per_seed"].items()), "",
             "Values: % (mean ± std over seeds of the per-seed mean over edits). Rel/T-Gen/I-Gen/T-Loc/I-Loc: "
             "EasyEdit's own evaluation (locality = post-vs-pre argmax agreement). Gen5: new answer on 5 more images "
             "of the edited concept; Near: agreement on 10 near-miss images (same shape other colour, same colour "
             "other shape); Far: other shape and colour; Other-Q: the other question family on the edit image; "
             "HM: per-edit harmonic mean of I-Gen6 (image_rephrase + Gen5 images) and Near. In sequences "
             "(seqT) Near/Far/Other-Q/HM leave out the items another edit of the chunk changes; '(all items)': "
             "over every item (the same figures in single editing). "
             "steps: mean optimisation steps an edit took in ODEdit's loop (every round; '–' where the edit "
             "does not run it). "
             f"s/edit: median wall time of the edit call; MiB: median peak process RSS during it "
             f"({meta.get('memory_measure')}); +MiB: the largest growth of that peak over the RSS at the start of the "
             "edit (what the edit itself added; the process RSS includes the shared caches). CPU, "
             f"{meta.get('threads')} torch thread(s).",
             ""]
    for setting in _sorted_settings(results["summary"]):
        lines += setting_section(results, setting)
    if results["curve"]:
        lines += ["## Rel vs locality over the host learning rate (single editing)", "",
                  "| method | lr | n | Rel | T-Gen | I-Gen6 | I-Loc | Near | Far | HM |", "|---|---:|---:|" + "---:|" * 7]
        for p in results["curve"]:
            lines.append(f"| {p['method']} | {p['lr']:g} | {p['n']} | " + " | ".join(
                "–" if p.get(c) is None else f"{100 * p[c]:.1f}"
                for c in ("rel", "t_gen", "i_gen_all", "i_loc", "near_kept", "far_kept", "hm_kept")) + " |")
        lines.append("")
    for host, by_seed in (results.get("meta_training") or {}).items():
        lines += [f"## {host} meta-training (EasyEdit's MultimodalTrainer, train split; EasyEdit's validation on "
                  "held-back train records)", "",
                  "| seed | objective | iters × batch | s | edit/acc_val | image_rephrase/acc_val | loc/acc_val | image_loc/acc_val |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for seed, by_alg in by_seed.items():
            for alg, info in by_alg.items():
                val = info.get("val", {})
                lines.append(f"| {seed} | {f'{host}+ODEdit (alg ODEdit)' if alg == 'ODEdit' else host} | "
                             f"{info.get('max_iters')} × {info.get('batch_size')} | {info.get('seconds')} | " + " | ".join(
                                 "–" if k not in val else f"{100 * val[k]:.1f}"
                                 for k in ("edit/acc_val", "image_rephrase/acc_val", "loc/acc_val", "image_loc/acc_val")) + " |")
        lines.append("")
    if results.get("leakage"):
        lines += ["## No leakage", "", "Each method edited the first records of each seed twice, with their own and with "
                  "another record's evaluation fields (rephrase, image_rephrase, loc, m_loc...): edited weights "
                  "bit-identical in", ""]
        for method, by_seed in results["leakage"].items():
            total = sum(c["records"] for c in by_seed.values())
            same = sum(c["bit_identical"] for c in by_seed.values())
            what = next((c["what"] for c in by_seed.values() if c.get("what")), None)
            if what and any("context_free" in c for c in by_seed.values()):  # IKE: its in-context prompt
                free = sum(c.get("context_free", 0) for c in by_seed.values())
                lines.append(f"- {method}: {what} identical in {same} of {total} records; free of the record's "
                             f"held-out rephrase and text-locality question in {free} of {total}")
            elif what:  # SERAC: its memory as well as the weights
                lines.append(f"- {method}: {what} identical in {same} of {total} records")
            else:
                lines.append(f"- {method}: {same} of {total} records")
        lines.append("")
    if results.get("not_run"):
        lines += ["## Not run", ""] + [f"- **{k}**: {v}" for k, v in results["not_run"].items()] + [""]
    return "\n".join(lines)


def is_sequence(setting: str) -> bool:
    return setting.startswith("seq")


def shows_all_items(results: Dict[str, Any], setting: str) -> bool:
    """Sequence tables show the all-items figures beside the fair ones, where the rows have both."""
    return is_sequence(setting) and not (results.get("fair_fallback_rows") or {}).get(setting)


def _steps(t: Dict[str, float]) -> str:
    return f"{t['steps_mean']:.0f}" if "steps_mean" in t else "–"


def setting_section(results: Dict[str, Any], setting: str) -> List[str]:
    """One setting's table, its fair-locality note (sequences), its paired differences."""
    config, by_method = results.get("config", {}), results["summary"][setting]
    tm = results["time_memory"].get(setting, {})
    columns = TABLE_COLUMNS + (ALL_ITEMS_COLUMNS if shows_all_items(results, setting) else ())
    lines = [f"## {setting}" + (" (each edit restored)" if setting == "single" else
                                 f" (T = {setting[3:]} edits applied, then all evaluated)"), "",
             "| method | edits | " + " | ".join(LABELS[c] for c in columns) + " | steps | s/edit | MiB | +MiB |",
             "|---|---:|" + "---:|" * (len(columns) + 4)]
    for method in _method_order(by_method, config):
        e, t = by_method[method], tm.get(method, {})
        lines.append(f"| {method} | {e['n_edits']} | " + " | ".join(_pct(e.get(c)) for c in columns)
                     + f" | {_steps(t)} | {t.get('edit_s_median', float('nan')):.3f} | {t.get('peak_rss_mib_median', float('nan')):.0f}"
                     f" | {t.get('rss_delta_mib_max', float('nan')):.0f} |")
    lines.append("")
    if is_sequence(setting):
        lines += [fair_note(results, setting), ""]
    lines += paired_table(results, setting)
    alone = [m for m in _method_order(by_method, config)
             if "+" not in m and "[" not in m and not any(o.startswith(m + "+") for o in by_method)]
    if alone:
        lines += [f"{', '.join(alone)}: no +ODEdit partner (IKE changes no weights, so ODEdit cannot decorate it); "
                  "not in the paired differences.", ""]
    return lines


def fair_note(results: Dict[str, Any], setting: str) -> str:
    """What a sequence table's Near/Far/Other-Q leave out, and how much."""
    old = (results.get("fair_fallback_rows") or {}).get(setting, 0)
    if old:
        return (f"**Fair locality not recorded**: {old} rows of this setting come from an edits.jsonl written before "
                "the runner told apart the items another edit of the chunk changes; Near/Far/Other-Q/HM here are "
                "over all items (a perfect editor scores below 100 on them).")
    by_method = (results.get("excluded") or {}).get(setting, {})
    return ("Near, Far, Other-Q and HM count only the items no edit of the chunk changes: an item whose image shows "
            "the (shape, colour) another edit of the chunk edits, asked in that edit's question family, must change "
            "for that edit to hold, so it is left out (items left out: " + excluded_text(by_method) + "). "
            "The '(all items)' columns are post-vs-pre agreement over every item, as in single editing.")


def excluded_text(by_method: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """"Near 19.0% (38 of 200 per method), ..." where every method left out the same items (they
    edit the same chunks), else the range of the shares over methods."""
    parts = []
    for metric in EXCLUDED_SHOWN:
        counts = {(c[metric]["excluded"], c[metric]["items"]) for c in by_method.values() if metric in c}
        if len(counts) == 1:
            (e, n), = counts
            parts.append(f"{LABELS[metric + '_kept']} {100 * e / n:.1f}% ({e} of {n} per method)")
        elif counts:
            shares = [100 * e / n for e, n in counts]
            parts.append(f"{LABELS[metric + '_kept']} {min(shares):.1f}–{max(shares):.1f}% by method")
    return ", ".join(parts)


def paired_table(results: Dict[str, Any], setting: str) -> List[str]:
    paired = results["paired"].get(setting, {})
    if not paired:
        return []
    cols = PAIRED_COLUMNS + (("near",) if shows_all_items(results, setting) else ())
    lines = [f"Paired per-edit differences (method − host alone, points; bootstrap 95% CI, {BOOTSTRAP} resamples):", "",
             "| method | n | " + " | ".join(f"Δ{LABELS[c]}" for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for method in _method_order(paired, results.get("config", {})):
        p = paired[method]
        cells = [_difference(p.get(c)) for c in cols]
        n_pairs = max((p[c]["n"] for c in cols if c in p), default=0)
        lines.append(f"| {method} | {n_pairs} | " + " | ".join(cells) + " |")
    return lines + [""]


def _difference(d: Optional[dict]) -> str:
    """A paired difference with its interval, in points."""
    return "–" if not d else f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"


# -------------------------------------------------------------------------------------------------
# Figure
# -------------------------------------------------------------------------------------------------
def plotted_methods(methods, config) -> List[str]:
    """Each host alone and with ODEdit, and the variants the config's ``plot_variants`` names."""
    shown = set(config.get("plot_variants") or ())
    return [m for m in _method_order(methods, config) if "[" not in m or m[m.index("[") + 1:-1] in shown]


def plot(results: Dict[str, Any], path: str) -> None:
    import matplotlib  # heavy: loaded only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = results.get("config", {})
    summary = results["summary"]
    settings = _sorted_settings(summary)
    metrics = ("rel", "t_gen", "i_gen_all", "i_loc", "near_kept", "far_kept", "hm_kept")
    has_curve = bool(results["curve"])
    n_panels = len(settings) + (1 if has_curve else 0)
    n_cols = min(max(n_panels, 1), 2)
    n_rows = -(-max(n_panels, 1) // n_cols)
    fig, grid = plt.subplots(n_rows, n_cols, figsize=(8.0 * n_cols, 5.2 * n_rows), squeeze=False)
    axes = list(grid.reshape(-1))
    for ax in axes[n_panels:]:
        ax.axis("off")
    axes = axes[:max(n_panels, 1)]
    cmap = plt.get_cmap("tab10")
    hosts = list(config.get("hosts", {}))
    for ax, setting in zip(axes, settings):
        shown = set(config.get("plot_variants") or ())
        methods = plotted_methods(summary[setting], config)
        width = 0.8 / max(len(methods), 1)
        x = np.arange(len(metrics))
        for k, method in enumerate(methods):
            host = method.split("+")[0]
            colour = cmap(hosts.index(host) % 10 if host in hosts else 9)
            e = summary[setting][method]
            means = [100 * e[m]["mean"] if m in e else np.nan for m in metrics]
            stds = [100 * e[m]["std"] if m in e else 0 for m in metrics]
            hatch = ("xx" if "[" in method else "//") if "+ODEdit" in method else None
            ax.bar(x + (k - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, color=colour,
                   alpha=1.0 if "+ODEdit" in method else 0.45, hatch=hatch,
                   edgecolor="black", linewidth=0.4, label=method)
        ax.set_xticks(x)
        ax.set_xticklabels([LABELS[m] if m != "hm_kept" else "HM" for m in metrics], fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        variants = " and its [variants] (cross-hatched)" if shown else ""
        fair = "; Near/Far: items no edit of the chunk changes" if is_sequence(setting) else ""
        ax.set_title(f"{setting}: host alone (light) vs +ODEdit (hatched){variants}, ± std over seeds{fair}",
                     fontsize=9)
        ax.legend(fontsize=7, ncol=min(len(methods), 4), loc="upper center", bbox_to_anchor=(0.5, -0.08),
                  frameon=False)
        ax.grid(axis="y", alpha=0.3)
    if has_curve:
        ax = axes[-1]
        groups: Dict[tuple, List[dict]] = defaultdict(list)
        for p in results["curve"]:
            groups[(p["host"], p["odedit"])].append(p)
        for (host, odedit), pts in groups.items():
            pts = sorted(pts, key=lambda p: p["lr"])
            colour = cmap(hosts.index(host) % 10 if host in hosts else 9)
            xs = [100 * (p["near_kept"] or 0) for p in pts]
            ys = [100 * (p["rel"] or 0) for p in pts]
            ax.plot(xs, ys, marker="o", linestyle="-" if odedit else "--", color=colour,
                    alpha=1.0 if odedit else 0.6, label=f"{host}{'+ODEdit' if odedit else ''}")
            for p, xv, yv in zip(pts, xs, ys):
                ax.annotate(f"{p['lr']:g}", (xv, yv), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("near-miss locality (%)")
        ax.set_ylabel("Rel (%)")
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.set_title("Rel vs near-miss locality over the host lr (labels)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m easyedit_odedit.benchmark.report DIR", file=sys.stderr)
        return 2
    build(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
