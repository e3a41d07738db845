"""Patches that hold for a block only: EasyEdit's hard-coded CUDA code on a machine without a GPU,
full unpickling of EasyEdit's archives, sliceable patched module lists (``host_scope`` in
``patches.py`` composes them around EasyEdit's entry points), and two narrower ones.

A leaf module (no import from the plugin), like ``imports.py``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from types import SimpleNamespace

import torch


# ---------------------------------------------------------------------------------------------
# Running EasyEdit's hard-coded CUDA code on CPU
# ---------------------------------------------------------------------------------------------
def _is_cuda_like(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    return isinstance(device, str) and (device.startswith("cuda") or device.isdigit())


def _redirect_args(args, kwargs):
    if args and _is_cuda_like(args[0]):
        args = ("cpu",) + tuple(args[1:])
    if "device" in kwargs and _is_cuda_like(kwargs["device"]):
        kwargs = dict(kwargs, device="cpu")
    return args, kwargs


_REDIRECT_LOCK = threading.RLock()
_redirect_depth = 0
_originals: dict = {}
# the torch globals the redirect replaces, by the key ``_originals`` keeps each under
REDIRECTED = {"tensor_to": (torch.Tensor, "to"), "module_to": (torch.nn.Module, "to"),
              "tensor_cuda": (torch.Tensor, "cuda"), "module_cuda": (torch.nn.Module, "cuda"),
              "load": (torch, "load")}


def _install_redirect() -> None:
    _originals.update({key: getattr(owner, name) for key, (owner, name) in REDIRECTED.items()})

    def load(*args, **kwargs):  # main's MEND executor loads its archive with map_location=cuda:N
        if _is_cuda_like(kwargs.get("map_location")):
            kwargs["map_location"] = "cpu"
        return _originals["load"](*args, **kwargs)

    def tensor_to(self, *args, **kwargs):
        args, kwargs = _redirect_args(args, kwargs)
        return _originals["tensor_to"](self, *args, **kwargs)

    def module_to(self, *args, **kwargs):
        args, kwargs = _redirect_args(args, kwargs)
        return _originals["module_to"](self, *args, **kwargs)

    torch.Tensor.to = tensor_to
    torch.nn.Module.to = module_to
    torch.load = load
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self


def _remove_redirect() -> None:
    for key, (owner, name) in REDIRECTED.items():
        setattr(owner, name, _originals[key])


@contextlib.contextmanager
def cpu_redirect():
    """While active, ``.to(<cuda device>)``, ``.cuda()`` and ``torch.load(map_location=<cuda>)``
    keep tensors and modules on the CPU.
    A no-op on machines with CUDA: there EasyEdit's code runs unchanged."""
    global _redirect_depth
    if torch.cuda.is_available():
        yield
        return
    with _REDIRECT_LOCK:
        if _redirect_depth == 0:
            _install_redirect()
        _redirect_depth += 1
    try:
        yield
    finally:
        with _REDIRECT_LOCK:
            _redirect_depth -= 1
            if _redirect_depth == 0:
                _remove_redirect()


# ---------------------------------------------------------------------------------------------
# The rest of what EasyEdit's entry points need on today's torch / transformers
# ---------------------------------------------------------------------------------------------
FULL_UNPICKLING = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def full_unpickling_for_easyedit_archives():
    """MEND/SERAC archives hold a model config object; torch>=2.6 refuses those with its default
    ``weights_only=True``. EasyEdit's own ``torch.load`` calls need the old behaviour, so it is
    switched on for the duration of an EasyEdit call only."""
    previous = os.environ.get(FULL_UNPICKLING)
    os.environ[FULL_UNPICKLING] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(FULL_UNPICKLING, None)
        else:
            os.environ[FULL_UNPICKLING] = previous


def _is_monkey_patched(module) -> bool:
    return any(cls.__name__ == "_MonkeyPatchBase" for cls in type(module).__mro__)


@contextlib.contextmanager
def sliceable_patched_module_lists():
    """MEND runs the model through ``higher``-style monkey-patched module copies (EasyEdit's
    ``trainer/algs/patch.py``). transformers 5's Llama iterates ``self.layers[:n]``, and slicing a
    ModuleList rebuilds it with ``self.__class__(modules)``, which the patched class cannot do.
    While EasyEdit runs, a slice of a patched ModuleList is a plain ModuleList of the same
    (patched) layers."""
    original = torch.nn.ModuleList.__getitem__

    def getitem(self, idx):
        if isinstance(idx, slice) and _is_monkey_patched(self):
            return torch.nn.ModuleList(list(self._modules.values())[idx])
        return original(self, idx)

    torch.nn.ModuleList.__getitem__ = getitem
    try:
        yield
    finally:
        torch.nn.ModuleList.__getitem__ = original


@contextlib.contextmanager
def serac_projection_width(model, width: int):
    """``SERAC_MULTI.__init__`` sizes a BLIP-2 projection from ``model.Qformer.config.hidden_size``,
    which a plugin model does not have: a stand-in of the given width, for that call only."""
    had = "Qformer" in vars(model)
    if not had:
        object.__setattr__(model, "Qformer", SimpleNamespace(config=SimpleNamespace(hidden_size=width)))
    try:
        yield
    finally:
        if not had:
            object.__delattr__(model, "Qformer")


@contextlib.contextmanager
def plugin_sentence_modules(classes: dict):
    """EasyEdit's IKE loads its sentence model with ``SentenceTransformer(path)``. From version 6,
    sentence-transformers refuses a saved model whose ``modules.json`` names a class outside its
    own namespace unless ``trust_remote_code=True``, which EasyEdit does not pass. For the block,
    exactly the classes given (``{"module.path.Class": Class}``, the plugin's own, already
    imported) resolve to themselves, through sentence-transformers' own per-model class mapping;
    every other class keeps the trust gate. Older sentence-transformers (no such mapping, no gate):
    a no-op."""
    try:
        from sentence_transformers.base.model import BaseModel  # optional: IKE's bench only
    except ImportError:
        yield
        return
    if not hasattr(BaseModel, "_module_classes"):
        yield
        return
    original = BaseModel.__dict__.get("_module_classes", None)
    BaseModel._module_classes = {**(getattr(BaseModel, "_module_classes") or {}), **classes}
    try:
        yield
    finally:
        if original is None:
            del BaseModel._module_classes
        else:
            BaseModel._module_classes = original
