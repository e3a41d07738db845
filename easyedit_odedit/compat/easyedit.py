"""Which EasyEdit is installed, and where its registries, classes and functions are.

Two versions are in users' hands: the PyPI release ``easyeditor==0.0.1.dev0`` (a 2023 snapshot,
``PYPI``) and GitHub main (``MAIN``). EasyEdit's package attributes are shadowed by its star-exports
(``easyeditor.util`` is not the ``util`` package after ``import easyeditor``), so submodules are
always found by dotted name, never by walking attributes. Nothing here changes EasyEdit.
"""
from __future__ import annotations

import functools
import importlib
import warnings

from PIL import Image

from .imports import ensure_torchvision_importable, restore_transformers_reexports

PYPI, MAIN = "pypi", "main"


@functools.lru_cache(maxsize=None)
def import_easyeditor():
    """Import EasyEdit once, after the shims it needs. Returns the ``easyeditor`` module."""
    ensure_torchvision_importable()
    restore_transformers_reexports()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\..*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*timm\.models.*")
        easyeditor = importlib.import_module("easyeditor")
    return easyeditor


def module(name: str):
    """An EasyEdit submodule by dotted name (``module("editors.multimodal_editor")``)."""
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


def easyedit_class(module_name: str, name: str):
    """An EasyEdit class by module and name, as EasyEdit defined it (not a plugin factory)."""
    value = getattr(module(module_name), name)
    return getattr(value, "__odedit_original__", value)


def multimodal_evaluation():
    """The module of EasyEdit's multimodal evaluation functions (``compute_multimodal_edit_results``,
    ``prepare_multimodal_edit``, ``compute_multimodal_edit_quality``): ``evaluate.evaluate`` in the
    PyPI release, ``evaluate.multimodal_evaluate`` on main."""
    return module("evaluate.multimodal_evaluate" if flavour() == MAIN else "evaluate.evaluate")


def process_image_file(processor, path: str):
    """EasyEdit's BLIP processors take a PIL image in the PyPI release and a path on main."""
    if flavour() == MAIN:
        return processor(path)
    with Image.open(path) as image:
        return processor(image.convert("RGB"))


def counts_special_tokens(cls_name: str) -> bool:
    """Whether the installed EasyEdit counts a prompt's special tokens (BOS) in ``prompts_len`` for
    the model class it constructs: the PyPI release does for BLIP-2 and not for MiniGPT-4 (whose
    text has no BOS); main never does. A plugin model counts with them (``adapter.embed``)."""
    return flavour() == PYPI and cls_name == "Blip2OPT"


def complete_host_hparams(hparams) -> None:
    """The PyPI release reads ``model_parallel`` (MEND, SERAC, BaseTrainer, get_model) but none of
    its multimodal hparams classes defines it; main defines it with default False."""
    if not hasattr(hparams, "model_parallel"):
        hparams.model_parallel = False
