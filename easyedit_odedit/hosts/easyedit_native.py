"""Hosts that are EasyEdit's own methods (MEND, SERAC; on GitHub main also WISE, GRACE, LoRA).

Their hyper-parameters are EasyEdit's own classes, built from the ``host_hparams`` mapping (or the
host's YAML file). Without an ``archive`` MEND/SERAC are being meta-trained (``alg: ODEdit`` in
``MultimodalTrainer``: see ``trainer.py``); with one, MEND edits with EasyEdit's executor and
ODEdit then refines exactly the parameters MEND changed (``refine`` family). WISE, GRACE and
EasyEdit's LoRA are refine hosts too (``easyedit_adapters.py``).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, ClassVar, Dict, Optional

import torch

from .. import compat
from ..errors import ODEditError, ODEditFileNotFoundError
from ..settings import EASYEDIT_FIELDS
from .base import Host, host_spec, register_host


class EasyEditHost(Host):
    """A host that is one of EasyEdit's own methods: its hparams are EasyEdit's own classes."""

    easyedit_alg: ClassVar[str] = ""                      # EasyEdit's algorithm key
    editing_hparams: ClassVar[str] = ""                   # EasyEdit's editing hparams class
    training_hparams: ClassVar[Optional[str]] = None      # its training hparams class, if it trains

    @classmethod
    def build_hparams(cls, mapping: Dict[str, Any], inherited: Dict[str, Any], where: str):
        return build_easyedit_hparams(cls.name, mapping, inherited, where)

    @classmethod
    def create(cls, hparams) -> Host:
        raise ODEditError("host", hparams.host,
                          f"{cls.name} with ODEdit is trained with EasyEdit's MultimodalTrainer (alg: ODEdit); "
                          "to edit, give host_hparams an `archive` (MEND), or use a SERAC archive with "
                          "EasyEdit's own SERAC hparams", problem="cannot edit per request")


def build_easyedit_hparams(host: str, mapping: Dict[str, Any], inherited: Dict[str, Any], where: str):
    spec = host_spec(host, where)
    alg, editing, training = spec.easyedit_alg, spec.editing_hparams, spec.training_hparams
    _require_installed(host, alg, where)
    mapping = _as_easyedit_reads_its_yaml(mapping, where)
    cls = getattr(compat.import_easyeditor(), editing if mapping.get("archive") or not training else training)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    # EasyEdit's defaults < the host's own YAML < model fields given at the ODEdit YAML's top level
    values = {k: v for k, v in {**EASYEDIT_FIELDS, **mapping, **inherited}.items() if k in fields}
    unknown = sorted(set(mapping) - set(fields) - {"alg", "alg_name"})
    if unknown:
        raise ODEditError(f"{where}: host_hparams.{unknown[0]}", mapping[unknown[0]],
                          f"{cls.__name__} takes: {', '.join(sorted(fields))}", problem="is not a known key")
    for key in ("alg", "alg_name"):
        if key in fields:
            values[key] = alg
    for key, value in list(values.items()):
        if hints.get(key) is float and isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                values[key] = float(value)
            except ValueError:
                raise ODEditError(f"{where}: host_hparams.{key}", value, "give a number") from None
    missing = sorted(k for k, f in fields.items() if k not in values
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ODEditError(f"{where}: host_hparams", missing, f"{cls.__name__} needs these keys too "
                          "(EasyEdit's hparams/TRAINING or hparams/<method> YAMLs show typical values)",
                          problem="lacks required keys")
    hparams = cls(**values)
    compat.complete_host_hparams(hparams)
    return hparams


def easyedit_hosts() -> Dict[str, type]:
    """The registered hosts that are EasyEdit's own methods, by name (MEND, SERAC, WISE, ...)."""
    from .base import HOSTS

    return {name: cls for name, cls in HOSTS.items() if issubclass(cls, EasyEditHost)}


def _require_installed(host: str, alg: str, where: str) -> None:
    if not compat.has_multimodal_alg(alg):
        raise ODEditError(f"{where}: host", host,
                          "install EasyEdit from GitHub main (https://github.com/zjunlp/EasyEdit; its `easyeditor` "
                          "folder on the Python path), or use the plugin's built-in hosts `LoRA` (peft), `FT-L` or `FT-V`",
                          problem=f"needs EasyEdit's multimodal {alg}, which the installed EasyEdit "
                                  "(the PyPI release 0.0.1.dev0) does not have")


def _as_easyedit_reads_its_yaml(mapping: Dict[str, Any], where: str) -> Dict[str, Any]:
    """EasyEdit's own ``from_hparams`` rewrites two YAML keys before building its class (WISE's
    ``act_margin: [alpha, beta, gamma]``, ``dtype: torch.bfloat16``); do the same, so a host's
    EasyEdit YAML can be pasted under ``host_hparams`` as it is."""
    mapping = dict(mapping)
    if "act_margin" in mapping:
        margin = mapping.pop("act_margin")
        if not (isinstance(margin, (list, tuple)) and len(margin) == 3):
            raise ODEditError(f"{where}: host_hparams.act_margin", margin,
                              "give three numbers [alpha, beta, gamma], e.g. [5.0, 20.0, 10.0]")
        mapping.update(zip(("alpha", "beta", "gamma"), margin))
    if isinstance(mapping.get("dtype"), str):
        dtype = getattr(torch, mapping["dtype"].replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ODEditError(f"{where}: host_hparams.dtype", mapping["dtype"], "use e.g. torch.float32 or torch.bfloat16")
        mapping["dtype"] = dtype
    return mapping


EXECUTORS_ATTRIBUTE = "_odedit_mend_executors"


@register_host
class EasyEditRefineHost(EasyEditHost):
    """MEND with a trained archive: EasyEdit's own executor makes the edit (its hypernetwork's
    delta on ``inner_params``), then ODEdit optimises exactly those parameters under its objective
    for ``optimiser.steps`` steps, starting from MEND's solution - or from the weights before it when
    that solution has the higher objective on the edit's rows (``optimiser.refine_start: better``)."""

    name, family = "MEND", "train"
    note = "EasyEdit's MEND; ODEdit extends its meta-training objective, and with an `archive` refines its edits"
    easyedit_alg, editing_hparams, training_hparams = "MEND", "MENDMultimodalHparams", "MENDMultimodalTrainingHparams"
    refines_touched = True  # ODEdit refines the very weights the host changed: it can start from before them

    def __init__(self, name: str, host_hparams, optimiser):
        self.name, self.hparams = name, host_hparams
        self.num_steps = optimiser.steps
        # MEND's edit_lr is the initial value of the learned per-weight step it adds (p + lr * grad),
        # negative as often as not after training; ODEdit's refinement descends, at its size
        self.lr = optimiser.lr if optimiser.lr is not None else abs(float(host_hparams.edit_lr))
        self.optimizer = "Adam"

    @classmethod
    def create(cls, hparams) -> Host:
        if not getattr(hparams.host_params, "archive", None):
            return super().create(hparams)  # without an archive MEND is being trained
        return cls(cls.name, hparams.host_params, hparams.optimiser)

    def touched(self, model) -> list:
        names = dict(model.named_parameters())
        missing = [n for n in self.hparams.inner_params if n not in names]
        if missing:
            raise ODEditError("host_hparams.inner_params", missing, "name parameters of the model "
                              "(e.g. language_model.model.layers.0.mlp.down_proj.weight)",
                              problem="names parameters the model does not have")
        return list(self.hparams.inner_params)

    def _executor(self, model):
        """One executor per (model, archive): EasyEdit's module-level executors cache the first
        model they saw, which would silently edit the wrong model in a second editor. Kept on the
        model itself (a plain attribute, not a submodule), so it goes when the model goes; a
        module-level table would keep every model alive."""
        executors = model.__dict__.setdefault(EXECUTORS_ATTRIBUTE, {})
        key = str(self.hparams.archive)
        if key not in executors:
            executors[key] = compat.module("models.mend.mend_main").MendMultimodalRewriteExecutor()
        return executors[key]

    def run_host(self, model, tok, view: dict, rows=(), undo=None) -> None:
        """``rows``/``undo`` are unused: MEND changes existing weights only, which ODEdit's originals cover."""
        if not os.path.isfile(str(self.hparams.archive)):
            raise ODEditFileNotFoundError("host_hparams.archive", self.hparams.archive,
                                          "train MEND first (MultimodalTrainer with alg: MEND or alg: ODEdit) "
                                          "and point archive at results_dir/models/<alg>/<model>")
        _check_archive_matches(str(self.hparams.archive), model, self.hparams.inner_params)
        request = dict(view)
        with compat.host_scope():
            executor = compat.ready_mend_executor(self._executor(model), model, tok, self.hparams)
            compat.executor_apply(executor)(model, tok, [request], self.hparams, copy=False,
                                            return_orig_weights=True, keep_original_weight=True)

    def prepare(self, model):
        named = dict(model.named_parameters())
        return {n: named[n] for n in self.touched(model)}

    def finalize(self, model) -> None:
        """MEND changed the weights in place; nothing to unload."""


def _check_archive_matches(path: str, model, inner_params) -> None:
    """A MEND archive holds the config of the model it was trained on and one hypernetwork per
    edited weight shape; loading one trained for another model fails deep inside MEND."""
    with compat.host_scope():
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)["model"]
        except Exception as err:  # noqa: BLE001 - any unreadable archive gets the same message
            raise ODEditError("host_hparams.archive", path, "point it at a MultimodalTrainer checkpoint "
                              f"(results_dir/models/<alg>/<model>); it could not be read ({type(err).__name__})") from None
    trained_on = state.get("model_config")
    if trained_on is not None and dict(trained_on) != dict(getattr(model, "config", {}) or {}):
        raise ODEditError("host_hparams.archive", path,
                          "this archive was trained for another model: retrain MEND for this model (same `name`)",
                          problem="does not match the model")
    wanted = {tuple(p.shape) for n, p in model.named_parameters() if n in set(inner_params)}
    trained = {key.split(".")[1] for key in state if key.startswith("mend.(")}  # "mend.(128, 64).u_mean"
    trained = {tuple(int(x) for x in k.strip("()").split(",")) for k in trained}
    trained |= {shape[::-1] for shape in trained}  # MEND keys some weights by their transposed shape
    if trained and wanted and not wanted <= trained:
        raise ODEditError("host_hparams.archive", path, "retrain MEND for these inner_params",
                          problem=f"has hypernetworks for weight shapes {sorted(trained)}, not {sorted(wanted)}")


@register_host
class SERACHost(EasyEditHost):
    name, aliases, family = "SERAC", ("SERAC_MULTI",), "train"
    note = "EasyEdit's SERAC_MULTI; ODEdit extends its meta-training objective"
    easyedit_alg, editing_hparams, training_hparams = ("SERAC_MULTI", "SERACMultimodalHparams",
                                                       "SERACMultimodalTrainingHparams")
