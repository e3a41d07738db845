"""What a perfect editor scores on sequence locality, on MiniMMEdit's own records.

    python benchmarks/sequence_ceiling.py --seeds 0 1 2 --n-test 60 --T 5 10 --chunks 4 \
        --check-rows benchmarks/results/full-2026-11-26-paper/edits.jsonl

For each seed the test records are rebuilt as the bench writes them (``records.build_records`` with
the shipped base model's answers as ``pred``; ``--check-rows`` compares every rebuilt record's scope
and new answer with the rows of a bench's ``edits.jsonl``). Each item's unedited answer is the base
model's greedy answer (``records.model_predictor``, the function that gives the records' ``pred``).

A perfect editor gives each edit's new answer wherever the edit's scope (shape, colour, question
family) holds and leaves every other answer as the unedited model gave it. For every chunk of T
consecutive records its answers go through ``evaluation.extra_metrics`` exactly as the bench's
rows do: ``near`` / ``far`` / ``other_family`` are today's all-items figures (post-vs-pre agreement
over every item: a perfect editor's ceiling), ``*_kept`` the fair figures (100 for a perfect
editor, or the exclusion rule is wrong). Means as the report takes them: per seed over the edits,
then over seeds. Also prints the share of items each setting leaves out of the fair figures.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from easyedit_odedit.benchmark import records as records_mod  # noqa: E402
from easyedit_odedit.benchmark.config import SHIPPED_MODEL  # noqa: E402
from easyedit_odedit.benchmark.evaluation import (Evaluation, changed_by_sequence, extra_entries,  # noqa: E402
                                                  extra_metrics, item_concept, new_answers)
from easyedit_odedit.models.loading import load_adapter  # noqa: E402

SHOWN = ("near", "far", "other_family")


def unedited_answers(predict, records: Sequence[dict]) -> Dict[Tuple[str, str], str]:
    """(image, prompt) -> the base model's answer, for every extra item of ``records``."""
    keys = sorted({(image, prompt) for r in records for _, _, image, prompt, _ in Evaluation.extra_items(r)})
    return dict(zip(keys, predict(keys)))


def perfect_rows(chunk: Sequence[dict], pre: Dict[Tuple[str, str], str]) -> List[dict]:
    """``extra_metrics`` of every record of a chunk, for an editor that makes exactly the chunk's edits."""
    edited = new_answers(chunk)
    rows = []
    for record in chunk:
        items = Evaluation.extra_items(record)
        before, after = [], []
        for (_, kind, entry), (_, _, image, prompt, target) in zip(extra_entries(record), items):
            old = pre[(image, prompt)]
            new = sorted(edited.get(item_concept(entry), ()))
            answer = record["alt"] if kind == "edit" else (new[0] if new else old)
            before.append(((old,), (target,)))
            after.append(((answer,), (target,)))
        rows.append(extra_metrics(items, after, before, changed_by_sequence(record, chunk)))
    return rows


def check_rows(path: str, by_seed: Dict[int, List[dict]]) -> int:
    """Rows of a bench's edits.jsonl whose scope or new answer differ from the rebuilt records."""
    mismatches, seen = 0, 0
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row["seed"] not in by_seed or row["setting"] == "curve":
                continue
            record = by_seed[row["seed"]][row["record"]]
            seen += 1
            scope = {k: record["edit"][k] for k in ("shape", "colour", "family")}
            mismatches += row["scope"] != scope or row["target"] != record["alt"]
    print(f"--check-rows: {seen} rows of {path} compared, {mismatches} differ from the rebuilt records")
    return mismatches


def summary(rows_by_seed: Dict[int, List[dict]]) -> Dict[str, float]:
    """Per metric: mean over seeds of the per-seed mean over edits (the report's mean)."""
    out = {}
    for metric in SHOWN + tuple(f"{m}_kept" for m in SHOWN):
        per_seed = [np.mean([r[metric] for r in rows if r.get(metric) is not None]) for rows in rows_by_seed.values()]
        out[metric] = float(np.mean(per_seed))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--T", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--check-rows", help="a bench's edits.jsonl to compare the rebuilt records with")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    predict = records_mod.model_predictor(load_adapter(SHIPPED_MODEL))
    by_seed = {seed: records_mod.build_records("test", args.n_test, seed, predict) for seed in args.seeds}
    if args.check_rows and check_rows(args.check_rows, by_seed):
        return 1
    pre = {seed: unedited_answers(predict, records) for seed, records in by_seed.items()}
    figures = {}
    for T in args.T:
        rows = {seed: [row for c in range(args.chunks) for row in perfect_rows(records[c * T:(c + 1) * T], pre[seed])]
                for seed, records in by_seed.items()}
        counts = collections.Counter()
        for row in (r for rs in rows.values() for r in rs):
            for m in SHOWN:
                counts[m, "excluded"] += row["excluded"][m]
                counts[m, "items"] += row["items"][m]
        means = summary(rows)
        figures[f"seq{T}"] = {**{f"ceiling_{m}": means[m] for m in SHOWN},
                              **{f"perfect_{m}_kept": means[f"{m}_kept"] for m in SHOWN},
                              **{f"excluded_{m}": counts[m, "excluded"] / counts[m, "items"] for m in SHOWN}}
        print(f"T = {T}, {args.chunks} chunks x {len(args.seeds)} seeds ({sum(map(len, rows.values()))} edits): "
              "perfect editor, all items / fair (%): " + ", ".join(
                  f"{m} {100 * means[m]:.1f} / {100 * means[m + '_kept']:.1f}" for m in SHOWN)
              + "; items changed by the chunk: " + ", ".join(
                  f"{m} {100 * counts[m, 'excluded'] / counts[m, 'items']:.1f}% "
                  f"({counts[m, 'excluded']} of {counts[m, 'items']})" for m in SHOWN))
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
