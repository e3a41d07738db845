"""What the installer (``patches.install``) puts at EasyEdit's entry points: wrappers of the editor's
and the trainer's methods, the model constructors extended to plugin checkpoints, and the
``SERAC_MULTI`` constructor extended to plugin models. The plugin's own parts (its checks, its
trainer, its SERAC class) come in through ``Plugin`` from ``registration``, so this package never
imports the layers above it."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from ..models.adapter import MultimodalLMAdapter
from ..models.loading import is_plugin_checkpoint, load_adapter
from .easyedit import MAIN, alg_train_dict, counts_special_tokens, easyedit_class, flavour, module
from .executors import dedupe_handlers, own_executor


@dataclass
class Plugin:
    """The plugin's own parts, handed to the installer by ``registration.register``."""

    multimodal_algs: Dict[str, Callable] = field(default_factory=dict)   # into ALG_MULTIMODAL_DICT
    train_algs: Dict[str, Callable] = field(default_factory=dict)        # into ALG_TRAIN_DICT
    callable_restore_algs: tuple = ()         # main restores these algorithms by calling their result
    check_edit: Optional[Callable] = None     # (editor, args, kwargs, method) -> (args, kwargs)
    check_model: Optional[Callable] = None    # (hparams, on_main) -> None
    trainer_init: List[Callable] = field(default_factory=list)   # called with each trainer EasyEdit builds
    serac_class: Optional[type] = None        # SERAC_MULTI's class for plugin models
    alg_name: str = "ODEdit"                  # the configs the checks apply to


PLUGIN = Plugin()  # what the installer last installed (empty until registration)


# ---------------------------------------------------------------------------------------------
# MultimodalEditor.__init__/edit/edit_dataset, BaseTrainer.__init__/run
# ---------------------------------------------------------------------------------------------
EDITOR_METHODS = ("__init__", "edit", "edit_dataset")
TRAINER_METHODS = ("__init__", "run")


def _scoped(method, scope: Callable, check=None):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if check is not None:
            args, kwargs = check(method, args, kwargs)
        with scope():
            return method(*args, **kwargs)

    wrapper.__odedit_scoped__ = True
    return wrapper


def _check_plugin_edit(method, args, kwargs):
    """Before EasyEdit's ``MultimodalEditor.edit`` touches its arguments: for the plugin's editors
    only, the plugin's checks, so bad input fails with ``ODEditError`` instead of EasyEdit's bare
    AssertionError / KeyError / PIL error."""
    editor = args[0] if args else None
    if getattr(editor, "alg_name", None) != PLUGIN.alg_name or PLUGIN.check_edit is None:
        return args, kwargs
    rest, kwargs = PLUGIN.check_edit(editor, args[1:], kwargs, method=method)
    return (editor, *rest), kwargs


def _check_plugin_model(method, args, kwargs):
    """Before EasyEdit's editor or trainer builds the model of a plugin config: a wrong ``name``
    fails at once, naming the field."""
    hparams = args[1] if len(args) > 1 else kwargs.get("hparams", kwargs.get("config"))
    if getattr(hparams, "alg_name", None) == PLUGIN.alg_name and PLUGIN.check_model is not None:
        PLUGIN.check_model(hparams, flavour() == MAIN)
    return args, kwargs


def _editor_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        try:
            original(self, *args, **kwargs)
            own_executor(self)
        finally:
            dedupe_handlers(logging.getLogger(module("editors.multimodal_editor").__name__))

    return __init__


def _trainer_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for hook in PLUGIN.trainer_init:
            hook(self)

    return __init__


def wrap_entry_points(scope: Callable) -> None:
    """EasyEdit's editor and trainer methods run inside ``scope`` (``patches.host_scope``)."""
    editor_cls = module("editors.multimodal_editor").MultimodalEditor
    trainer_cls = module("trainer.BaseTrainer").BaseTrainer
    targets = [(editor_cls, name) for name in EDITOR_METHODS] + [(trainer_cls, name) for name in TRAINER_METHODS]
    for owner, name in targets:
        method = owner.__dict__.get(name)
        if method is None or getattr(method, "__odedit_scoped__", False):
            continue
        if owner is editor_cls and name == "__init__":
            method = _editor_init(method)
        if owner is trainer_cls and name == "__init__":
            method = _trainer_init(method)
        check = {"edit": _check_plugin_edit, "__init__": _check_plugin_model}.get(name)
        setattr(owner, name, _scoped(method, scope, check))


# ---------------------------------------------------------------------------------------------
# Model construction: EasyEdit's Blip2OPT/MiniGPT4 constructors, extended to plugin checkpoints
# ---------------------------------------------------------------------------------------------
# class name -> (the modules that hold it: the package's star-export and its own), checkpoint kwarg
FACTORY_SITES = {
    "Blip2OPT": (("trainer.blip2_models", "trainer.blip2_models.blip2_opt"), "opt_model"),
    "MiniGPT4": (("trainer.blip2_models", "trainer.blip2_models.mini_gpt4"), "llama_model"),
}


def _plugin_aware(original, path_kwarg: str):
    def construct(*args, **kwargs):
        path = kwargs.get(path_kwarg)
        if is_plugin_checkpoint(path):
            adapter = load_adapter(path)
            adapter.prompts_len_counts_special_tokens = counts_special_tokens(original.__name__)
            return adapter
        return original(*args, **kwargs)

    construct.__odedit_original__ = original
    construct.__name__ = original.__name__
    return construct


def install_model_factories() -> None:
    for cls_name, (module_names, path_kwarg) in FACTORY_SITES.items():
        for name in module_names:
            mod = module(name)
            current = getattr(mod, cls_name)
            if getattr(current, "__odedit_original__", None) is None:
                setattr(mod, cls_name, _plugin_aware(current, path_kwarg))


# ---------------------------------------------------------------------------------------------
# SERAC: EasyEdit's SERAC_MULTI(...) calls, extended to plugin models (hosts/serac.py)
# ---------------------------------------------------------------------------------------------
# Where EasyEdit names SERAC_MULTI: its own module (SERAC_MULTI.edit builds the edited model by
# that global name), the package's star-export, the SERAC executor's import.
SERAC_SITES = ("trainer.algs.SERAC", "trainer", "models.serac.serac_main")


def serac_multi(model, config, *args, **kwargs):
    """What EasyEdit's ``SERAC_MULTI(...)`` builds: the plugin's class on a plugin model, EasyEdit's
    own class on EasyEdit's models."""
    original = easyedit_class("trainer.algs.SERAC", "SERAC_MULTI")
    use_plugin = isinstance(model, MultimodalLMAdapter) and PLUGIN.serac_class is not None
    return (PLUGIN.serac_class if use_plugin else original)(model, config, *args, **kwargs)


def install_serac_factory() -> None:
    serac_multi.__odedit_original__ = easyedit_class("trainer.algs.SERAC", "SERAC_MULTI")
    for name in SERAC_SITES:
        setattr(module(name), "SERAC_MULTI", serac_multi)
    alg_train_dict()["SERAC_MULTI"] = serac_multi
