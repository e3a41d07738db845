"""Which records a process edits, and the per-record results every process appends.

A *unit* is what is edited between two restores: one record, or a sequence of ``T`` consecutive
records (never split over processes). The units still to do are dealt round-robin over the
processes, so the shards depend only on what is already finished and on the number of processes.

Results are JSON lines, one a record (``record``: its index in the data file). A process alone
appends to ``DIR/edits.jsonl``; under torchrun, rank ``r`` appends to ``DIR/edits.rank<r>.jsonl``.
``merge`` folds every such file into ``DIR/edits.jsonl``, ordered by record, so a run on any number
of processes (or several interrupted runs) ends with the same file.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Iterable, List, Sequence, Tuple

RESULTS = "edits.jsonl"
Unit = Tuple[int, ...]  # record indices in the data file, edited in this order before one restore


def units(records: Sequence[int], length: int) -> List[Unit]:
    """Consecutive groups of ``length`` records (the last one may be shorter)."""
    return [tuple(records[i:i + length]) for i in range(0, len(records), length)]


def pending(all_units: Sequence[Unit], finished: Iterable[int]) -> List[Unit]:
    """Units with a record that has no result yet (a unit is redone whole: its records were
    edited on top of each other)."""
    done = set(finished)
    return [u for u in all_units if not set(u) <= done]


def shard(todo: Sequence[Unit], rank: int, world: int) -> List[Unit]:
    return list(todo[rank::world])


def part_path(out: str, rank: int, world: int) -> str:
    return os.path.join(out, RESULTS if world == 1 else f"edits.rank{rank}.jsonl")


def _files(out: str) -> List[str]:
    main = os.path.join(out, RESULTS)
    return ([main] if os.path.isfile(main) else []) + sorted(glob.glob(os.path.join(out, "edits.rank*.jsonl")))


def finished(out: str) -> Dict[int, dict]:
    """Every record with a result in ``out`` (any process, any earlier run). A line cut short by a
    killed process is ignored: that record is edited again."""
    rows: Dict[int, dict] = {}
    for path in _files(out):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                rows.setdefault(int(row["record"]), row)
    return rows


def complete_units(rows: Dict[int, dict], all_units: Sequence[Unit]) -> Dict[int, dict]:
    """Only the rows of units whose records all finished (a sequence cut short is redone)."""
    keep = {r for u in all_units if all(i in rows for i in u) for r in u}
    return {r: row for r, row in rows.items() if r in keep}


def merge(out: str, all_units: Sequence[Unit]) -> List[dict]:
    """Write ``DIR/edits.jsonl`` with every finished unit's rows, ordered by record, and remove the
    per-rank files. Returns the rows."""
    rows = complete_units(finished(out), all_units)
    ordered = [rows[r] for r in sorted(rows)]
    target = os.path.join(out, RESULTS)
    with open(target + ".tmp", "w") as f:
        for row in ordered:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(target + ".tmp", target)
    for path in glob.glob(os.path.join(out, "edits.rank*.jsonl")):
        os.remove(path)
    return ordered


class Appender:
    """Appends a unit's rows to this process's file, flushed as soon as the unit finishes."""

    def __init__(self, path: str):
        self.path = path

    def write(self, rows: Sequence[dict]) -> None:
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
