"""``apply_odedit_to_multimodal_model``: what ``ALG_MULTIMODAL_DICT['ODEdit']`` runs.

Called by EasyEdit's ``MultimodalEditor`` exactly like any multimodal method:
``apply(model, tok, [request] or request, hparams, copy=False, return_orig_weights=True,
keep_original_weight=...)`` -> ``(edited_model, restore)``. ``restore`` is a ``RestorePoint``: a
callable (GitHub main restores callables for algorithms in ``CALLABLE_RESTORE_ALGS``) that is also
a ``{name: original tensor}`` mapping (the PyPI release copies ``weights_copy.items()`` back).
"""
from __future__ import annotations

import contextlib
import hashlib
import weakref
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..environments import EnvironmentSampler, Row, carried_rows, edit_view, past_edit
from ..errors import ODEditError
from ..hosts import build_host
from ..models.adapter import MultimodalLMAdapter
from ..validation import check_request
from .objective import EditRows, ODEditObjective, make_prefix_cache
from .restore import (RestorePoint, at_sequence_start, past_edits, remember, restored_on_failure,
                      start_recoverable, unwrap)
from .rows import build_rows
from .spill import spilled

_EDIT_LOGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def edit_seed(hparams, view: dict) -> int:
    """Depends on the seed and the edit itself, never on a request's evaluation fields."""
    digest = hashlib.sha256(f"{view['prompt']}\x00{view['target']}".encode()).digest()
    return (int(hparams.seed) * 1_000_003 + int.from_bytes(digest[:4], "little")) % (2 ** 31)


def apply_odedit_to_multimodal_model(model, tok, requests, hparams, copy: bool = False,
                                     return_orig_weights: bool = False, keep_original_weight: bool = False,
                                     **kwargs):
    adapter = unwrap(model)
    requests = [requests] if isinstance(requests, dict) else list(requests)
    views = [edit_view(check_request(r, adapter.tokenizer, i)) for i, r in enumerate(requests)]
    host = build_host(hparams)
    originals, undo = {}, []
    past, logs = past_edits(adapter), []
    _EDIT_LOGS.pop(adapter, None)
    with restored_on_failure(adapter, originals, undo):
        for view in views:
            logs.append(edit_once(adapter, view, hparams, host, originals, undo, past))
            past.append(past_edit(view, adapter.image_size))
    _EDIT_LOGS[adapter] = logs
    remember(adapter, originals, undo, past[max(len(past) - hparams.environments.past_edits, 0):])
    # nothing to restore is still callable: main calls the restore of CALLABLE_RESTORE_ALGS after every edit
    return model, (RestorePoint(adapter, originals, undo) if keep_original_weight else RestorePoint(adapter, {}))


def take_edit_logs(model) -> List[Dict[str, float]]:
    """What each edit of the last ODEdit call on ``model`` logged (``steps`` taken, the objective's
    last terms, re-probing rounds), once: the logs are forgotten when taken. Empty where the last
    call failed or did not go through ODEdit."""
    try:
        adapter = unwrap(model)
    except ODEditError:  # a host's own model class (SERAC's wrapper): never edited through ODEdit
        return []
    return _EDIT_LOGS.pop(adapter, [])


@contextlib.contextmanager
def seeded(seed: int):
    """Torch's, Python's and NumPy's global generators seeded with ``seed`` for the block and put
    back afterwards: the host's and LoRA's random draws (initialisation, WISE's mask, GRACE's cold
    values) come from the edit's seed; the bench seeds EasyEdit's MEND meta-training with it."""
    import random

    import numpy as np

    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def edit_once(adapter: MultimodalLMAdapter, view: dict, hparams, host, originals: Dict[str, torch.Tensor],
              undo: Optional[List] = None, past: Sequence[dict] = ()) -> Dict:
    """One edit: environments, then the host's optimisation with the ODEdit objective, and - where
    ``constraints.reprobe_rounds`` asks - more rounds with the rows the edit spilled into
    (``spill.spilled``). ``past``: the earlier edits of a sequence still applied
    (``environments.past_edit``)."""
    seed = edit_seed(hparams, view)
    use_odedit = bool(getattr(hparams, "enabled", True))
    in_row = Row("IN", view["prompt"], view["target"], view.get("image"))
    # WISE also reads an unrelated prompt from ODEdit's OUT rows, even when ODEdit itself is off
    needs_rows = use_odedit or getattr(host, "needs_out_rows", False)
    reference = _sequence_reference(adapter, hparams, originals, undo, past if use_odedit else ())
    with adapter.reusing_image_encodings():  # the set-up changes no weight (or puts it back)
        with reference() if reference else contextlib.nullcontext():
            host_rows = build_rows(adapter, view, hparams, seed, past, unedited=not past or bool(reference)) \
                if needs_rows else [in_row]
        rows = host_rows if use_odedit else [in_row]
        named = dict(adapter.named_parameters())
        touched = host.touched(adapter)
        # the touched weights as this edit found them (in a sequence, ``originals`` holds older ones)
        before_host = ({name: named[name].detach().clone() for name in touched}
                       if _may_start_before_host(host, hparams) else None)
        for name in touched:
            originals.setdefault(name, before_host[name] if before_host else named[name].detach().clone())
        edit_rows = EditRows(adapter, rows, hparams.risks.kl_positions, make_prefix_cache(adapter, touched, hparams),
                             reference)  # OUT references
    previous = {n: p.requires_grad for n, p in adapter.named_parameters()}  # before a host or peft freezes them
    try:
        if hasattr(host, "run_host"):  # refine family: the host edits first, ODEdit starts from its solution
            with seeded(seed):
                host.run_host(adapter, adapter.tokenizer, view, host_rows, undo)
        logs = _optimise(adapter, host, hparams, edit_rows, seed, use_odedit, before_host)
        rounds, added, most = 0, 0, _reprobe_rounds(adapter, hparams, view, undo, use_odedit)
        while rounds < most:
            found = spilled(adapter, view, len(adapter.tokenizer(view["target"])["input_ids"]), hparams.environments)
            if not found:
                break
            rounds, added, rows = rounds + 1, added + len(found), rows + found
            with adapter.reusing_image_encodings():  # references from the weights before the edit (or sequence)
                edit_rows = EditRows(adapter, rows, hparams.risks.kl_positions, make_prefix_cache(adapter, touched, hparams),
                                     lambda: at_sequence_start(adapter, originals))
            steps = logs["steps"]
            logs = _optimise(adapter, host, hparams, edit_rows, seed + rounds, use_odedit)
            logs["steps"] += steps
    finally:
        _restore_requires_grad(adapter, previous)
    if most:
        logs.update(reprobe_rounds=float(rounds), spill_rows=float(added))
    if hparams.environments.past_reference == "sequence_start":  # what later edits of a sequence keep
        view["carried"] = carried_rows(rows, hparams.environments.past_rows)
    return logs


def _optimise(adapter: MultimodalLMAdapter, host, hparams, edit_rows: EditRows, seed: int, use_odedit: bool,
              before_host: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, float]:
    """The host's optimisation of the ODEdit objective over ``edit_rows``: a fixed number of steps,
    or - with ``constraints`` on - until the edit's rows hold (at most ``max_steps``). Gradients flow
    to the host's parameters only (the caller puts every ``requires_grad`` back)."""
    with seeded(seed):
        params = host.prepare(adapter)
    _train_only(adapter, params)
    try:
        objective = ODEditObjective(adapter, edit_rows, params, hparams, host.lr, host.optimizer, use_odedit, seed)
        sampler = EnvironmentSampler(edit_rows.rows, hparams.environments, seed)
        started_before_host = before_host is not None and objective.start_from_better(before_host)
        logs, c = {}, hparams.constraints
        checks = use_odedit and c.enabled
        steps, limit = 0, (c.max_steps if checks else host.num_steps)
        for steps in tqdm(range(1, 1 + limit), desc=f"ODEdit[{hparams.host}]", leave=False,
                          disable=not getattr(hparams, "progress", False)):
            logs = objective.update(sampler.sample())
            if checks and (steps % c.check_every == 0 or steps == limit) and objective.constraints_hold():
                break
        objective.finish()
        logs["steps"] = float(steps)
        if before_host is not None:
            logs["started_before_host"] = float(started_before_host)
    finally:
        host.finalize(adapter)
    return logs


def _reprobe_rounds(adapter: MultimodalLMAdapter, hparams, view: dict, undo, use_odedit: bool) -> int:
    """Rounds of re-probing on the edited weights: with constraints on, where the content miner
    described candidates and the weights before the edit can be had by copying tensors back."""
    c = hparams.constraints
    possible = use_odedit and c.enabled and bool(view.get("watched")) and start_recoverable(adapter, undo)
    return c.reprobe_rounds if possible else 0


def _sequence_reference(adapter: MultimodalLMAdapter, hparams, originals, undo, past):
    """``past_reference: sequence_start`` inside a sequence: a context that puts the model before the
    sequence back for the set-up (``restore.at_sequence_start``); None where the reference is the
    model as it is (single edits, ``current``, or a host that inserted modules)."""
    if not past or hparams.environments.past_reference != "sequence_start" or not start_recoverable(adapter, undo):
        return None
    return lambda: at_sequence_start(adapter, originals)


def _may_start_before_host(host, hparams) -> bool:
    """A refine host whose changed weights ODEdit then optimises for some steps (MEND; not the hosts
    that add modules, WISE/GRACE/LoRA), with ``refine_start: better``."""
    return (getattr(host, "refines_touched", False) and host.num_steps > 0
            and hparams.optimiser.refine_start == "better")


def _train_only(adapter: MultimodalLMAdapter, params: Dict[str, torch.nn.Parameter]) -> None:
    """Gradients only for the edited parameters (``_restore_requires_grad`` puts them back)."""
    chosen = {id(p) for p in params.values()}
    for p in adapter.parameters():
        p.requires_grad_(id(p) in chosen)


def _restore_requires_grad(adapter: MultimodalLMAdapter, previous: Dict[str, bool]) -> None:
    for name, p in adapter.named_parameters():
        if name in previous:
            p.requires_grad_(previous[name])
