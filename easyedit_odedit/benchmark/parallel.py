"""``odedit bench --workers N``: the bench's jobs spread over N processes, one result.

A job of ``runner.plan`` (seed x method x setting x chunk) depends only on its seed's records and, for
MEND/SERAC, on that seed's meta-training; every edit seeds itself. So jobs can run anywhere, as long
as the jobs that share a meta-training run in one process (it is trained once, and its folder is
written by one process). The parent writes every seed's records first, deals the job groups to the
processes (longest first, each to the least loaded process: deterministic), starts them with
``torch.multiprocessing`` and merges their rows back in plan order: ``edits.jsonl`` holds the same
rows in the same order as a run in one process (times and memory aside), and ``report.build``
makes the same tables from it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, NamedTuple, Sequence, Tuple

from tqdm.auto import tqdm

from .memory import PeakRSS
from .methods import MetaTrainedMethod, _quiet_easyedit

WORK = ".workers"  # per-process rows and metadata while the bench runs
TRAINING_COST = 100  # a meta-training, in edits of the cost model below (a rough guide for the dealing only)


def job_groups(jobs: Sequence[tuple]) -> List[List[int]]:
    """Job indices that must share a process: a seed's meta-trained host (both objectives and
    every setting, which reuse its archives and scope classifier); every other job alone."""
    groups: Dict[tuple, List[int]] = {}
    for i, (seed, method, _, _) in enumerate(jobs):
        key = ("meta", seed, method.section_key) if isinstance(method, MetaTrainedMethod) else ("job", i)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _cost(config: dict, job: tuple) -> float:
    """Edits a job makes, ODEdit's counted three times (it costs about 3-4x its host on the CPU)."""
    _, method, setting, _ = job
    if setting == "single":
        n = config["settings"]["single"]["n"]
    elif setting == "curve":
        n = config["curve"].get("n", config["settings"]["single"]["n"])
    else:
        n = int(setting[3:])
    return n * (3 if method.odedit else 1)


def deal(config: dict, jobs: Sequence[tuple], workers: int) -> List[List[int]]:
    """Job indices per process: groups longest first, each to the process with the least work."""
    def cost(group: List[int]) -> float:
        training = TRAINING_COST * len({jobs[i][1].training_alg for i in group
                                        if isinstance(jobs[i][1], MetaTrainedMethod)})
        return training + sum(_cost(config, jobs[i]) for i in group)

    loads: List[Tuple[float, int]] = [(0.0, w) for w in range(workers)]
    shares: List[List[int]] = [[] for _ in range(workers)]
    for group in sorted(job_groups(jobs), key=lambda g: (-cost(g), g[0])):
        load, w = min(loads)
        loads[w] = (load + cost(group), w)
        shares[w] += group
    return [sorted(share) for share in shares]


class JobRunner(NamedTuple):
    """The one-process runner's functions (``benchmark.runner``), handed in rather than imported so
    that this module sits below the runner; spawned processes unpickle them by name."""
    plan: Callable
    run_jobs: Callable
    write_seed_data: Callable


def run_spread(config: dict, out: str, jobs: Sequence[tuple], meta: Dict[str, Any], workers: int,
               progress: bool, runner: JobRunner) -> None:
    """Run ``jobs`` over ``workers`` processes; write ``out/edits.jsonl`` in plan order and fill
    ``meta`` as a run in one process does."""
    import torch.multiprocessing as mp

    seeds = sorted({job[0] for job in jobs})
    data = {seed: runner.write_seed_data(config, out, seed)
            for seed in tqdm(seeds, desc="records", disable=not progress)}
    shares = deal(config, jobs, workers)
    folder = os.path.join(out, WORK)
    os.makedirs(folder, exist_ok=True)
    mp.start_processes(_worker, args=(config, out, shares, data, progress, runner), nprocs=workers, join=True,
                       start_method="spawn")
    rows: List[Tuple[int, int, dict]] = []
    for w in range(workers):
        with open(os.path.join(folder, f"{w}.jsonl")) as f:
            rows += [(entry["job"], n, entry["row"]) for n, entry in enumerate(map(json.loads, f))]
        with open(os.path.join(folder, f"{w}.meta.json")) as f:
            _merge_meta(meta, json.load(f))
    with open(os.path.join(out, "edits.jsonl"), "w") as sink:
        for _, _, row in sorted(rows, key=lambda r: (r[0], r[1])):
            sink.write(json.dumps(row) + "\n")
    meta["shares"] = shares
    for w in range(workers):
        for suffix in (".jsonl", ".meta.json"):
            os.remove(os.path.join(folder, f"{w}{suffix}"))
    os.rmdir(folder)


def _worker(w: int, config: dict, out: str, shares: List[List[int]], data: Dict[int, Dict[str, str]],
            progress: bool, runner: JobRunner) -> None:
    """One process: its share of the plan, through the same ``run_jobs`` a single process uses."""
    import contextlib

    import torch

    import easyedit_odedit  # noqa: F401  (registers ODEdit in EasyEdit)

    torch.set_num_threads(int(config["threads"]))
    _quiet_easyedit()
    jobs = runner.plan(config)
    mine = shares[w]
    meta: Dict[str, Any] = {"data": {}}
    with contextlib.chdir(out), open(os.path.join(out, WORK, f"{w}.jsonl"), "w") as sink:
        def write(i: int, rows: Sequence[dict]) -> None:
            for row in rows:
                sink.write(json.dumps({"job": mine[i], "row": row}) + "\n")
            sink.flush()

        runner.run_jobs(config, out, [jobs[i] for i in mine], write, meta, PeakRSS(), progress, data=data,
                       desc=f"bench worker {w}", position=w)
    with open(os.path.join(out, WORK, f"{w}.meta.json"), "w") as f:
        json.dump(meta, f, default=str)


def _merge_meta(meta: Dict[str, Any], part: Dict[str, Any]) -> None:
    """A process's data, meta-training and no-leakage records into the run's (keyed by seed)."""
    meta["data"].update(part.get("data", {}))
    for key in ("meta_training", "leakage"):
        for name, by_seed in part.get(key, {}).items():
            meta.setdefault(key, {}).setdefault(name, {}).update(by_seed)
