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

from .. import compat
from ..environments import EnvironmentBuilder, EnvironmentSampler, Row, edit_view, past_edit
from ..errors import ODEditError
from ..hosts import build_host
from ..models.adapter import MultimodalLMAdapter
from ..pool_index import Probes, index_for
from ..validation import check_request
from .objective import EditRows, ODEditObjective, make_prefix_cache

# Originals of every parameter changed since a model's first un-restored ODEdit edit.
_HISTORY: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()
# Undo actions of hosts that insert modules (WISE, GRACE, EasyEdit's LoRA), oldest first.
_UNDO: "weakref.WeakKeyDictionary[torch.nn.Module, List]" = weakref.WeakKeyDictionary()
# The edits applied since then (``environments.past_edit``), oldest first: OUT rows of later edits.
_PAST: "weakref.WeakKeyDictionary[torch.nn.Module, List[dict]]" = weakref.WeakKeyDictionary()


class RestorePoint(dict):
    """``{parameter name: original tensor}`` that can also restore itself when called (and then
    also removes the modules a host inserted; the PyPI release only copies the tensors back)."""

    def __init__(self, model: torch.nn.Module, originals: Dict[str, torch.Tensor], undo=()):
        super().__init__(originals)
        self._model = weakref.ref(model)
        self._undo = list(undo)

    def __call__(self) -> None:
        model = self._model()
        if model is not None:
            _run_undo(model, self._undo)
            _copy_back(model, self)


def _run_undo(model: torch.nn.Module, actions: List) -> None:
    """Newest first, so each host finds the model as it left it; then forgotten."""
    pending = _UNDO.get(model, [])
    for action in reversed(list(actions)):
        action()
        if action in pending:
            pending.remove(action)
    actions.clear()


def _copy_back(model: torch.nn.Module, originals: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)
    _forget_restored(model, originals)


def _forget_restored(model: torch.nn.Module, names=None) -> bool:
    """Drops the history entries (of ``names``, default all) whose tensors equal their originals
    again - restored by ODEdit, or by the PyPI editor copying the tensors back itself, without
    ODEdit hearing of it. True when no changed tensor is left."""
    history = _HISTORY.get(model)
    if history is None:
        return True
    params = dict(model.named_parameters())
    for name in list(history if names is None else names):
        if name in history and (name not in params or torch.equal(history[name], params[name])):
            del history[name]
    return not history


def restore_all(model: torch.nn.Module) -> int:
    """Undo every ODEdit edit applied to ``model`` since it was last restored (sequential editing).
    Returns the number of tensors restored."""
    model = _unwrap(model)  # a native transformers model's history is kept under its view
    _PAST.pop(model, None)
    _run_undo(model, _UNDO.pop(model, []))
    history = _HISTORY.pop(model, {})
    _copy_back(model, history)
    return len(history)


HF_NATIVE_CLASSES = ("Qwen2VLForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")


def _unwrap(model) -> MultimodalLMAdapter:
    if isinstance(model, MultimodalLMAdapter):
        return model
    if type(model).__name__ in HF_NATIVE_CLASSES:  # GitHub main builds these itself, with a processor as tok
        from ..models.hf_native import view_for

        return view_for(model)
    raise ODEditError("model", type(model).__name__,
                      "ODEdit drives models through the plugin's adapter: set `name` (with model_name: blip2) "
                      "to a plugin checkpoint or a transformers LLaVA / BLIP-2 directory")


def _past_edits(model: torch.nn.Module) -> List[dict]:
    """The earlier edits still applied to ``model``: none once every tensor changed since the first
    un-restored edit equals its original again."""
    past = _PAST.get(model)
    if not past:
        return []
    if _forget_restored(model):
        del _PAST[model]
        return []
    return list(past)


def _edit_seed(hparams, view: dict) -> int:
    """Depends on the seed and the edit itself, never on a request's evaluation fields."""
    digest = hashlib.sha256(f"{view['prompt']}\x00{view['target']}".encode()).digest()
    return (int(hparams.seed) * 1_000_003 + int.from_bytes(digest[:4], "little")) % (2 ** 31)


def apply_odedit_to_multimodal_model(model, tok, requests, hparams, copy: bool = False,
                                     return_orig_weights: bool = False, keep_original_weight: bool = False,
                                     **kwargs):
    adapter = _unwrap(model)
    requests = [requests] if isinstance(requests, dict) else list(requests)
    views = [edit_view(check_request(r, adapter.tokenizer, i)) for i, r in enumerate(requests)]
    host = build_host(hparams)
    originals, undo = {}, []
    past = _past_edits(adapter)
    with _restore_on_failure(adapter, originals, undo):
        for view in views:
            edit_once(adapter, view, hparams, host, originals, undo, past)
            past.append(past_edit(view, adapter.image_size))
    _PAST[adapter] = past[max(len(past) - hparams.environments.past_edits, 0):]
    history = _HISTORY.setdefault(adapter, {})
    for name, value in originals.items():
        history.setdefault(name, value)
    _UNDO.setdefault(adapter, []).extend(undo)
    # nothing to restore is still callable: main calls the restore of CALLABLE_RESTORE_ALGS after every edit
    return model, (RestorePoint(adapter, originals, undo) if keep_original_weight else RestorePoint(adapter, {}))


@contextlib.contextmanager
def _restore_on_failure(adapter: MultimodalLMAdapter, originals: Dict[str, torch.Tensor], undo: List):
    """Any exception - NaN, a bad host, KeyboardInterrupt - leaves the model as it was."""
    try:
        yield
    except BaseException:
        _run_undo(adapter, undo)
        _copy_back(adapter, originals)
        raise


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
    """One edit: environments, then the host's optimisation with the ODEdit objective. ``past``: the
    earlier edits of a sequence still applied (``environments.past_edit``)."""
    seed = _edit_seed(hparams, view)
    use_odedit = bool(getattr(hparams, "enabled", True))
    in_row = Row("IN", view["prompt"], view["target"], view.get("image"))
    # WISE also reads an unrelated prompt from ODEdit's OUT rows, even when ODEdit itself is off
    needs_rows = use_odedit or getattr(host, "needs_out_rows", False)
    with adapter.reusing_image_encodings():  # the set-up changes no weight
        host_rows = build_rows(adapter, view, hparams, seed, past) if needs_rows else [in_row]
        rows = host_rows if use_odedit else [in_row]
        named = dict(adapter.named_parameters())
        touched = host.touched(adapter)
        # the touched weights as this edit found them (in a sequence, ``originals`` holds older ones)
        before_host = ({name: named[name].detach().clone() for name in touched}
                       if _may_start_before_host(host, hparams) else None)
        for name in touched:
            originals.setdefault(name, before_host[name] if before_host else named[name].detach().clone())
        cache = make_prefix_cache(adapter, touched, hparams)
        edit_rows = EditRows(adapter, rows, hparams.risks.kl_positions, cache)  # unedited-model references
    previous = {n: p.requires_grad for n, p in adapter.named_parameters()}  # before a host or peft freezes them
    if hasattr(host, "run_host"):  # refine family: the host edits first, ODEdit starts from its solution
        with seeded(seed):
            host.run_host(adapter, adapter.tokenizer, view, host_rows, undo)
    with seeded(seed):
        params = host.prepare(adapter)
    _train_only(adapter, params)
    try:
        objective = ODEditObjective(adapter, edit_rows, params, hparams, host.lr, host.optimizer, use_odedit, seed)
        sampler = EnvironmentSampler(rows, hparams.environments, seed)
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
        _restore_requires_grad(adapter, previous)
    return logs


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


def build_rows(adapter: MultimodalLMAdapter, view: dict, hparams, seed: int, past: Sequence[dict] = ()) -> List[Row]:
    env = hparams.environments
    builder = EnvironmentBuilder(env, _image_processor(hparams), getattr(hparams, "coco_image", ""), seed,
                                 view_size=adapter.image_size)
    rows = builder.in_and_se(view)
    out = builder.out_candidates(view)

    n_tokens = len(adapter.tokenizer(view["target"])["input_ids"])
    index = None
    if builder.by_content:  # the pool's features and fixed probes' answers, computed once per (model, pool)
        pool = [e.image_path for e in builder.pool if e.image_path is not None]
        key = (env.locality_pool, env.locality_image_root, adapter.image_size, env.probe_batch)
        index = index_for(adapter, key, list(dict.fromkeys(pool)), builder.load_image, env.probe_batch,
                          unedited=not past)
    probes = Probes(adapter, lambda rows, n: unedited_answers(adapter, rows, n), n_tokens, env.probe_batch,
                    env.probes, index)
    rows += out["text"] + builder.near_and_far(view, rows, out["image"], probes.features, probes.answers)
    _fill_unedited_answers(adapter, rows, n_tokens)
    return rows + builder.past(past)


def _image_processor(hparams):
    """The processor EasyEdit's LAVIS path applies to request images, so pool images match them."""
    return compat.module("dataset.processor.blip_processors").BlipImageEvalProcessor(image_size=364, mean=None, std=None)


def _fill_unedited_answers(adapter: MultimodalLMAdapter, rows: List[Row], n_tokens: int) -> None:
    """Rows without a target get the unedited model's greedy answer (what must not change)."""
    todo = [r for r in rows if r.target is None]
    for row, answer in zip(todo, unedited_answers(adapter, todo, n_tokens)):
        row.target = answer


@torch.no_grad()
def unedited_answers(adapter: MultimodalLMAdapter, probes: List[Row], n_tokens: int) -> List[str]:
    """The model's greedy answer (``n_tokens`` tokens) to each row's prompt and image, batched."""
    answers, ids = [""] * len(probes), [[] for _ in probes]
    for _ in range(max(n_tokens, 1) if probes else 0):
        texts = [f"{r.prompt} {a}".rstrip() for r, a in zip(probes, answers)]
        lens = [len(adapter.tokenizer(t)["input_ids"]) for t in texts]
        batch = adapter.embed(texts, [r.image for r in probes], lens)
        logits, _ = adapter.decode(batch, tail=1)
        for row_ids, token in zip(ids, logits[:, -1].argmax(-1).tolist()):
            row_ids.append(token)
        # the tokens decoded together: a word split into sub-words comes back as one word
        answers = [adapter.tokenizer.decode(row_ids, skip_special_tokens=True).strip() for row_ids in ids]
    return answers
