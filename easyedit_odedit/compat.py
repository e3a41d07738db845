"""Host compatibility: the one module that knows which EasyEdit is installed and what it needs.

Two EasyEdit versions are in users' hands: the PyPI release ``easyeditor==0.0.1.dev0`` (a 2023
snapshot, called ``pypi`` here) and GitHub main (``main``). This module

* finds EasyEdit's registries without tripping over its attribute shadowing
  (``easyeditor.util`` is not the ``util`` package after ``import easyeditor``);
* applies the import shims the PyPI release needs on today's torch/transformers, each only when
  the thing it repairs is actually broken;
* runs EasyEdit's hard-coded ``cuda:`` code on CPU, but only when no GPU exists and only while
  EasyEdit's own entry points run (``host_scope``);
* routes EasyEdit's ``Blip2OPT``/``MiniGPT4`` constructors to the plugin's loader when, and only
  when, the configured checkpoint is one the plugin understands.

Nothing else in the package patches EasyEdit.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import threading
import warnings

import torch

LOG = logging.getLogger(__name__)

PYPI, MAIN = "pypi", "main"


# ---------------------------------------------------------------------------------------------
# Import shims (applied before the first import of transformers / easyeditor)
# ---------------------------------------------------------------------------------------------
def ensure_torchvision_importable() -> None:
    """PyPI's torchvision is a CUDA build; next to CPU torch its C extension cannot load and the
    import dies with ``operator torchvision::nms does not exist`` (which also breaks
    ``transformers.modeling_utils``). Only in that case, declare the two op schemas its Python
    side registers fake kernels for, and import again. The pure-Python transforms then work."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: nothing to repair
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")  # kept alive by the dispatcher
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP_ALIVE.append(lib)
    import torchvision  # noqa: F401,F811


_KEEP_ALIVE: list = []


def _restore_transformers_reexports() -> None:
    """EasyEdit's Q-Former imports three helpers from ``transformers.modeling_utils`` that recent
    transformers no longer re-export there. Put back only the missing ones."""
    import transformers.modeling_utils as modeling_utils
    from transformers import pytorch_utils

    for name in ("apply_chunking_to_forward", "prune_linear_layer", "find_pruneable_heads_and_indices"):
        if hasattr(modeling_utils, name):
            continue
        if hasattr(pytorch_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
        elif name == "find_pruneable_heads_and_indices":
            setattr(modeling_utils, name, _find_pruneable_heads_and_indices)


def _find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
    """Removed from transformers v5; only imported (never called) on EasyEdit's multimodal path."""
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
        mask[head] = 0
    mask = mask.view(-1).contiguous().eq(1)
    index = torch.arange(len(mask))[mask].long()
    return heads, index


@functools.lru_cache(maxsize=None)
def import_easyeditor():
    """Import EasyEdit once, after the shims it needs. Returns the ``easyeditor`` module."""
    ensure_torchvision_importable()
    _restore_transformers_reexports()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\..*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*timm\.models.*")
        easyeditor = importlib.import_module("easyeditor")
    return easyeditor


def module(name: str):
    """An EasyEdit submodule by dotted name. Package attributes are shadowed by star-exports
    (``easyeditor.util``, ``easyeditor.trainer.BaseTrainer``...), so never walk attributes."""
    import_easyeditor()
    return importlib.import_module(f"easyeditor.{name}")


@functools.lru_cache(maxsize=None)
def flavour() -> str:
    """``main`` when the installed EasyEdit is GitHub main, ``pypi`` for the 2023 release."""
    try:
        module("editors.utils")
        return MAIN
    except ImportError:
        return PYPI


def alg_multimodal_dict() -> dict:
    return module("util.alg_dict").ALG_MULTIMODAL_DICT


def alg_train_dict() -> dict:
    return module("util.alg_train_dict").ALG_TRAIN_DICT


def has_multimodal_alg(name: str) -> bool:
    """GitHub main registers LoRA, WISE and GRACE for multimodal editing; the PyPI release does not."""
    return name in alg_multimodal_dict()


def multimodal_dataset_classes() -> dict:
    """``{"vqa": VQADataset, "caption": CaptionDataset}`` in both versions."""
    alg_dict = module("util.alg_dict")
    return dict(getattr(alg_dict, "MULTIMODAL_DS_DICT", None) or
                {k: v for k, v in alg_dict.DS_DICT.items() if k in ("vqa", "caption")})


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


def _install_redirect() -> None:
    _originals.update(tensor_to=torch.Tensor.to, module_to=torch.nn.Module.to,
                      tensor_cuda=torch.Tensor.cuda, module_cuda=torch.nn.Module.cuda, load=torch.load)

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
    torch.load = _originals["load"]
    torch.Tensor.to = _originals["tensor_to"]
    torch.nn.Module.to = _originals["module_to"]
    torch.Tensor.cuda = _originals["tensor_cuda"]
    torch.nn.Module.cuda = _originals["module_cuda"]


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


@contextlib.contextmanager
def _full_unpickling_for_easyedit_archives():
    """MEND/SERAC archives hold a model config object; torch>=2.6 refuses those with its default
    ``weights_only=True``. EasyEdit's own ``torch.load`` calls need the old behaviour, so it is
    switched on for the duration of an EasyEdit call only."""
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def _is_monkey_patched(module) -> bool:
    return any(cls.__name__ == "_MonkeyPatchBase" for cls in type(module).__mro__)


@contextlib.contextmanager
def _sliceable_patched_module_lists():
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
def host_scope():
    """Everything EasyEdit's own entry points need on today's stack, for one call."""
    with cpu_redirect(), _full_unpickling_for_easyedit_archives(), _sliceable_patched_module_lists():
        yield


def ready_mend_executor(executor, model, tok, hparams):
    """EasyEdit's MEND executor, initialised, with its hypernetwork in evaluation mode. The PyPI
    release never calls ``.eval()`` (GitHub main does, before each edit): in training mode MEND's
    input normaliser re-estimates its statistics from every edit's own rows instead of using the
    archive's, so each edit depended on the edits before it (and a one-token answer raised).
    On the PyPI release it also pairs the learned per-weight edit learning rates with the right
    weights (``_pair_mend_edit_lrs_with_weights``)."""
    if not getattr(executor, "is_init", False):
        executor.init_model(model, tok, hparams)
        if flavour() == PYPI:
            _pair_mend_edit_lrs_with_weights(executor.alg)
    executor.alg.eval()
    return executor


def _pair_mend_edit_lrs_with_weights(alg) -> None:
    """MEND learns one edit learning rate per inner parameter, ``edit_lrs[i]`` for
    ``inner_params[i]`` in the order the config lists them (``MEND.edit`` and the trainer pair
    them that way). The PyPI executor's ``apply_to_model`` instead walks
    ``model.named_parameters()`` and gives the i-th inner parameter *it meets* ``edit_lrs[i]``:
    when the config lists them in another order than the model holds them (EasyEdit's own YAMLs
    list ``down_proj`` before ``up_proj``), every weight got another weight's learning rate (on
    MiniMMEdit 45x too large on one, 45x too small on the other: Rel 15% instead of 100%).
    Here the executor's MEND (its own deep copy of the config) lists its inner parameters in the
    model's order, with ``edit_lrs`` permuted the same way, so both pairings agree with training.
    The hypernetworks are untouched (they are keyed by weight shape and name, not by position)."""
    listed = list(alg.config.inner_params)
    wanted = set(listed)
    in_model = [n for n, _ in alg.model.named_parameters() if n in wanted]
    if in_model == listed or sorted(in_model) != sorted(listed) or len(alg.edit_lrs) != len(listed):
        return  # already in order, or names MEND itself will reject
    order = [listed.index(n) for n in in_model]
    with torch.no_grad():
        alg.edit_lrs.data = alg.edit_lrs.data[order].clone()
    alg.config.inner_params = in_model


def _scoped(method, check=None):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if check is not None:
            args, kwargs = check(method, args, kwargs)
        with host_scope():
            return method(*args, **kwargs)

    wrapper.__odedit_scoped__ = True
    return wrapper


def _check_odedit_edit(method, args, kwargs):
    """Before EasyEdit's ``MultimodalEditor.edit`` touches its arguments: for ODEdit editors only,
    check them (``validation.validate_edit_call``), so bad input fails with ``ODEditError``
    instead of EasyEdit's bare AssertionError / KeyError / PIL error."""
    editor = args[0] if args else None
    if getattr(editor, "alg_name", None) != "ODEdit":
        return args, kwargs
    from .validation import validate_edit_call

    rest, kwargs = validate_edit_call(editor, args[1:], kwargs, method=method)
    return (editor, *rest), kwargs


def _check_odedit_model(method, args, kwargs):
    """Before EasyEdit's editor or trainer builds the model of an ODEdit config
    (``validation.check_model_fields``): a wrong ``name`` fails at once, naming the field."""
    hparams = args[1] if len(args) > 1 else kwargs.get("hparams", kwargs.get("config"))
    if getattr(hparams, "alg_name", None) == "ODEdit":
        from .validation import check_model_fields

        check_model_fields(hparams, flavour() == MAIN)
    return args, kwargs


def _dedupe_handlers(logger: logging.Logger) -> None:
    """EasyEdit's ``make_logs`` adds a file and a stream handler on every editor construction."""
    seen, kept = set(), []
    for handler in logger.handlers:
        target = getattr(handler, "baseFilename", None) or id(getattr(handler, "stream", None))
        key = (type(handler), target)
        if key in seen:
            handler.close()
            continue
        seen.add(key)
        kept.append(handler)
    logger.handlers[:] = kept


def _editor_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        try:
            original(self, *args, **kwargs)
            _own_executor(self)
        finally:
            _dedupe_handlers(logging.getLogger(module("editors.multimodal_editor").__name__))

    return __init__


def _own_executor(editor) -> None:
    """EasyEdit's ``ALG_MULTIMODAL_DICT`` holds one executor per method for the whole process, and
    the SERAC and MEND executors keep the first model and archive they load (``is_init``): a second
    editor in the same process (another archive, another model) silently edited with the first one.
    Each editor gets an executor of its own."""
    executor = getattr(getattr(editor, "apply_algo", None), "__self__", None)
    if executor is not None and hasattr(executor, "is_init"):
        executor = type(executor)()
        editor.apply_algo = executor_apply(executor)
        editor.odedit_executor = executor  # e.g. to continue SERAC's memory from an edited SERAC


def editor_executor(editor):
    """The executor behind ``editor.apply_algo`` (MEND, SERAC), or None."""
    return getattr(editor, "odedit_executor", None)


# GitHub main's MultimodalEditor.edit passes ``[request]`` to every executor, but its multimodal MEND
# and SERAC executors read one request (``request["prompt"]``): every single edit failed there.
_ONE_REQUEST_EXECUTORS = ("SeracMultimodalRewriteExecutor", "MendMultimodalRewriteExecutor")


def executor_apply(executor):
    """``executor.apply_to_model`` taking a list of requests on both EasyEdit versions."""
    apply = executor.apply_to_model
    if flavour() != MAIN or type(executor).__name__ not in _ONE_REQUEST_EXECUTORS:
        return apply

    @functools.wraps(apply)
    def call(model, tok, request, *args, **kwargs):
        if isinstance(request, (list, tuple)) and len(request) == 1:
            request = request[0]
        return apply(model, tok, request, *args, **kwargs)

    return call


TRAINER_INIT_HOOKS: list = []  # called with each trainer EasyEdit builds (registration adds ODEdit's)


def _trainer_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for hook in TRAINER_INIT_HOOKS:
            hook(self)

    return __init__


def _wrap_entry_points() -> None:
    editor_cls = module("editors.multimodal_editor").MultimodalEditor
    trainer_mod = module("trainer.BaseTrainer")
    targets = [(editor_cls, name) for name in ("__init__", "edit", "edit_dataset")]
    targets += [(trainer_mod.BaseTrainer, name) for name in ("__init__", "run")]
    for owner, name in targets:
        method = owner.__dict__.get(name)
        if method is None or getattr(method, "__odedit_scoped__", False):
            continue
        if owner is editor_cls and name == "__init__":
            method = _editor_init(method)
        if owner is trainer_mod.BaseTrainer and name == "__init__":
            method = _trainer_init(method)
        check = {"edit": _check_odedit_edit, "__init__": _check_odedit_model}.get(name)
        setattr(owner, name, _scoped(method, check))


# ---------------------------------------------------------------------------------------------
# Model construction: EasyEdit's Blip2OPT/MiniGPT4 constructors, extended to plugin checkpoints
# ---------------------------------------------------------------------------------------------
_FACTORY_SITES = {
    "Blip2OPT": ("trainer.blip2_models", "trainer.blip2_models.blip2_opt", "opt_model"),
    "MiniGPT4": ("trainer.blip2_models", "trainer.blip2_models.mini_gpt4", "llama_model"),
}


def counts_special_tokens(cls_name: str) -> bool:
    """Whether the installed EasyEdit counts a prompt's special tokens (BOS) in ``prompts_len`` for
    the model class it constructs: the PyPI release does for BLIP-2 and not for MiniGPT-4 (whose
    text has no BOS); main never does. A plugin model counts with them (``adapter.embed``)."""
    return flavour() == PYPI and cls_name == "Blip2OPT"


def _plugin_aware(original, path_kwarg: str):
    def construct(*args, **kwargs):
        from .models.loading import is_plugin_checkpoint, load_adapter

        path = kwargs.get(path_kwarg)
        if is_plugin_checkpoint(path):
            adapter = load_adapter(path)
            adapter.prompts_len_counts_special_tokens = counts_special_tokens(original.__name__)
            return adapter
        return original(*args, **kwargs)

    construct.__odedit_original__ = original
    construct.__name__ = original.__name__
    return construct


def _install_model_factories() -> None:
    for cls_name, (package, module_name, path_kwarg) in _FACTORY_SITES.items():
        for name in (package, module_name):
            mod = module(name)
            current = getattr(mod, cls_name)
            if getattr(current, "__odedit_original__", None) is None:
                setattr(mod, cls_name, _plugin_aware(current, path_kwarg))


# ---------------------------------------------------------------------------------------------
# SERAC: EasyEdit's SERAC_MULTI(...) calls, extended to plugin models (hosts/serac.py)
# ---------------------------------------------------------------------------------------------
# Where EasyEdit names SERAC_MULTI: its own module (SERAC_MULTI.edit builds the edited model by
# that global name), the package's star-export, the SERAC executor's import.
_SERAC_SITES = ("trainer.algs.SERAC", "trainer", "models.serac.serac_main")


def easyedit_class(module_name: str, name: str):
    """An EasyEdit class by module and name, as EasyEdit defined it (not a plugin factory)."""
    value = getattr(module(module_name), name)
    return getattr(value, "__odedit_original__", value)


def _install_serac_factory() -> None:
    from .hosts.serac import serac_multi

    original = easyedit_class("trainer.algs.SERAC", "SERAC_MULTI")
    serac_multi.__odedit_original__ = original
    for name in _SERAC_SITES:
        setattr(module(name), "SERAC_MULTI", serac_multi)
    alg_train_dict()["SERAC_MULTI"] = serac_multi


@contextlib.contextmanager
def serac_projection_width(model, width: int):
    """``SERAC_MULTI.__init__`` sizes a BLIP-2 projection from ``model.Qformer.config.hidden_size``,
    which a plugin model does not have: a stand-in of the given width, for that call only."""
    from types import SimpleNamespace

    had = "Qformer" in vars(model)
    if not had:
        object.__setattr__(model, "Qformer", SimpleNamespace(config=SimpleNamespace(hidden_size=width)))
    try:
        yield
    finally:
        if not had:
            object.__delattr__(model, "Qformer")


def multimodal_evaluation():
    """The module of EasyEdit's multimodal evaluation functions (``compute_multimodal_edit_results``,
    ``prepare_multimodal_edit``, ``compute_multimodal_edit_quality``): ``evaluate.evaluate`` in the
    PyPI release, ``evaluate.multimodal_evaluate`` on main."""
    return module("evaluate.multimodal_evaluate" if flavour() == MAIN else "evaluate.evaluate")


def process_image_file(processor, path: str):
    """EasyEdit's BLIP processors take a PIL image in the PyPI release and a path on main."""
    if flavour() == MAIN:
        return processor(path)
    from PIL import Image

    with Image.open(path) as image:
        return processor(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Hparams quirks of the PyPI release
# ---------------------------------------------------------------------------------------------
def complete_host_hparams(hparams) -> None:
    """The PyPI release reads ``model_parallel`` (MEND, SERAC, BaseTrainer, get_model) but none of
    its multimodal hparams classes defines it; main defines it with default False."""
    if not hasattr(hparams, "model_parallel"):
        hparams.model_parallel = False


@functools.lru_cache(maxsize=None)
def prepare_host() -> str:
    """Import EasyEdit and install the scoped integration points. Idempotent."""
    import_easyeditor()
    _wrap_entry_points()
    _install_model_factories()
    _install_serac_factory()
    return flavour()


# ---------------------------------------------------------------------------------------------
# sentence-transformers >= 6: loading the plugin's own sentence module (IKE on MiniMMEdit)
# ---------------------------------------------------------------------------------------------
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
        from sentence_transformers.base.model import BaseModel
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
