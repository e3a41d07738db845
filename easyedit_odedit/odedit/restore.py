"""Undoing edits: what ODEdit changed in a model since it was last restored, and how to put it back.

``RestorePoint`` is what an edit returns to EasyEdit (a ``{name: original tensor}`` mapping the PyPI
release copies back, and a callable GitHub main calls); ``restore_all`` undoes every un-restored
edit of a sequence in one call. Hosts that insert modules (WISE, GRACE, EasyEdit's LoRA) leave undo
actions, run newest first.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, List

import torch

from ..errors import ODEditError
from ..models.adapter import MultimodalLMAdapter

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
    _load(model, originals)
    _forget_restored(model, originals)


def _load(model: torch.nn.Module, values: Dict[str, torch.Tensor]) -> None:
    """Copies ``values`` into the model's parameters of those names."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


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
    model = unwrap(model)  # a native transformers model's history is kept under its view
    _PAST.pop(model, None)
    _run_undo(model, _UNDO.pop(model, []))
    history = _HISTORY.pop(model, {})
    _copy_back(model, history)
    return len(history)


HF_NATIVE_CLASSES = ("Qwen2VLForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")


def unwrap(model) -> MultimodalLMAdapter:
    if isinstance(model, MultimodalLMAdapter):
        return model
    if type(model).__name__ in HF_NATIVE_CLASSES:  # GitHub main builds these itself, with a processor as tok
        from ..models.hf_native import view_for

        return view_for(model)
    raise ODEditError("model", type(model).__name__,
                      "ODEdit drives models through the plugin's adapter: set `name` (with model_name: blip2) "
                      "to a plugin checkpoint or a transformers LLaVA / BLIP-2 directory")


def past_edits(model: torch.nn.Module) -> List[dict]:
    """The earlier edits still applied to ``model``: none once every tensor changed since the first
    un-restored edit equals its original again."""
    past = _PAST.get(model)
    if not past:
        return []
    if _forget_restored(model):
        del _PAST[model]
        return []
    return list(past)


def remember(adapter: MultimodalLMAdapter, originals: Dict[str, torch.Tensor], undo: List, past: List[dict]) -> None:
    """After an edit that stays: the originals of what it changed (the oldest kept), its undo
    actions, and the edits a later edit of the sequence keeps as rows."""
    _PAST[adapter] = past
    history = _HISTORY.setdefault(adapter, {})
    for name, value in originals.items():
        history.setdefault(name, value)
    _UNDO.setdefault(adapter, []).extend(undo)


def start_recoverable(adapter: MultimodalLMAdapter, undo: List) -> bool:
    """Whether copying tensors gives back the model before the sequence: not where a host inserted
    modules (WISE, GRACE, EasyEdit's LoRA)."""
    return not undo and not _UNDO.get(adapter)


@contextlib.contextmanager
def at_sequence_start(adapter: MultimodalLMAdapter, originals: Dict[str, torch.Tensor]):
    """Within the block the model holds its weights from before the sequence's first un-restored
    edit (``start_recoverable``), put back afterwards."""
    start = {**originals, **_HISTORY.get(adapter, {})}  # the history's tensors are the older ones
    params = dict(adapter.named_parameters())
    now = {name: params[name].detach().clone() for name in start}
    _load(adapter, start)
    adapter.forget_image_encodings()
    try:
        yield
    finally:
        _load(adapter, now)
        adapter.forget_image_encodings()


@contextlib.contextmanager
def restored_on_failure(adapter: MultimodalLMAdapter, originals: Dict[str, torch.Tensor], undo: List):
    """Any exception - NaN, a bad host, KeyboardInterrupt - leaves the model as it was."""
    try:
        yield
    except BaseException:
        _run_undo(adapter, undo)
        _copy_back(adapter, originals)
        raise
