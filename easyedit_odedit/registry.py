"""Host registry (peft's shape): a host's name maps to its hparams class and its host class.

``host_spec("FT-L")`` -> ``HostSpec``; ``build_host(hparams)`` -> a host object ODEdit drives.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from .errors import ODEditError
from .hosts.builtin import FineTuneHost, FTHyperParams, LoRAHost, LoRAHyperParams
from .hosts.easyedit_adapters import ADAPTER_HOSTS, build_adapter_host
from .hosts.easyedit_native import EASYEDIT_HOSTS, EasyEditRefineHost, build_easyedit_hparams


@dataclass(frozen=True)
class HostSpec:
    name: str
    hparams_class: Optional[type]
    make: Optional[Callable[[Any], Any]]
    family: str
    note: str = ""


HOSTS: Dict[str, HostSpec] = {
    "FT-L": HostSpec("FT-L", FTHyperParams, lambda hp: FineTuneHost(hp, vision=False), "optimise",
                     "fine-tunes language-model layers"),
    "FT-V": HostSpec("FT-V", FTHyperParams, lambda hp: FineTuneHost(hp, vision=True), "optimise",
                     "fine-tunes the vision-language projector"),
    "LoRA": HostSpec("LoRA", LoRAHyperParams, LoRAHost, "optimise", "LoRA adapters through peft, merged after the edit"),
    "MEND": HostSpec("MEND", None, None, "train", "EasyEdit's MEND; ODEdit extends its meta-training objective"),
    "SERAC": HostSpec("SERAC", None, None, "train", "EasyEdit's SERAC_MULTI; ODEdit extends its meta-training objective"),
    # GitHub main only: EasyEdit's own multimodal methods edit first, ODEdit refines what they added
    "WISE": HostSpec("WISE", None, None, "refine", "EasyEdit's WISE; ODEdit refines its side memory"),
    "GRACE": HostSpec("GRACE", None, None, "refine", "EasyEdit's GRACE; ODEdit refines its codebook values"),
    "EasyEdit-LoRA": HostSpec("EasyEdit-LoRA", None, None, "refine", "EasyEdit's LoRA; ODEdit refines its adapters"),
}
ALIASES = {"FT": "FT-L", "FT_L": "FT-L", "FT_V": "FT-V", "LORA": "LoRA", "SERAC_MULTI": "SERAC",
           "EASYEDIT-LORA": "EasyEdit-LoRA", "EASYEDIT_LORA": "EasyEdit-LoRA"}
NOT_DECORATABLE = {"IKE": "IKE edits in context (it only prepends demonstrations) and changes no weight, so "
                          "there is nothing for ODEdit to optimise; use `alg_name: IKE` with EasyEdit's own "
                          "IKEMultimodalHyperParams instead"}


def host_spec(name: str, where: str = "hparams") -> HostSpec:
    key = ALIASES.get(name, ALIASES.get(name.upper(), name))
    if key.upper() in NOT_DECORATABLE:
        raise ODEditError(f"{where}: host", name, NOT_DECORATABLE[key.upper()], problem="cannot be decorated")
    if key not in HOSTS:
        raise ODEditError(f"{where}: host", name, f"use one of: {', '.join(HOSTS)}", problem="is not a known host")
    return HOSTS[key]


def build_host_hparams(spec: HostSpec, mapping: Dict[str, Any], inherited: Dict[str, Any], where: str):
    from .odedit.odedit_hparams import _typed

    if spec.name in EASYEDIT_HOSTS:
        return build_easyedit_hparams(spec.name, mapping, inherited, where)
    cls = spec.hparams_class
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in mapping.items():
        if key in names:
            values[key] = _typed(f"{where}: host_hparams.{key}", value, hints[key])
        elif key not in inherited and key not in ("alg_name", "alg", "model_name", "name", "device"):
            raise ODEditError(f"{where}: host_hparams.{key}", value,
                              f"{spec.name} takes: {', '.join(sorted(names))}", problem="is not a known key")
    hparams = cls(**values)
    _check_builtin(hparams, where)
    return hparams


def _check_builtin(hp, where: str) -> None:
    import math

    import torch

    if not isinstance(getattr(torch.optim, hp.optimizer, None), type):
        raise ODEditError(f"{where}: host_hparams.optimizer", hp.optimizer, "name a torch.optim class, e.g. Adam or SGD")
    if not (math.isfinite(hp.lr) and hp.lr > 0):
        raise ODEditError(f"{where}: host_hparams.lr", hp.lr, "use a positive learning rate")
    if hp.num_steps < 0:
        raise ODEditError(f"{where}: host_hparams.num_steps", hp.num_steps, "use 0 or more steps")
    if isinstance(hp, LoRAHyperParams) and (hp.rank < 1 or not hp.lora_alpha > 0):
        raise ODEditError(f"{where}: host_hparams.rank/lora_alpha", (hp.rank, hp.lora_alpha),
                          "use rank >= 1 and lora_alpha > 0")


def build_host(hparams):
    spec = host_spec(hparams.host)
    if spec.name in ADAPTER_HOSTS:
        return build_adapter_host(spec.name, hparams.host_params, hparams.optimiser)
    if spec.name == "MEND" and getattr(hparams.host_params, "archive", None):
        return EasyEditRefineHost(spec.name, hparams.host_params, hparams.optimiser)
    if spec.make is None:
        raise ODEditError("host", hparams.host,
                          f"{spec.name} with ODEdit is trained with EasyEdit's MultimodalTrainer (alg: ODEdit); "
                          "to edit, give host_hparams an `archive` (MEND), or use a SERAC archive with "
                          "EasyEdit's own SERAC hparams", problem="cannot edit per request")
    return spec.make(hparams.host_params)
