"""Hosts the plugin provides: FT-L, FT-V and LoRA (through peft).

EasyEdit has no multimodal fine-tuning method in either version, and the PyPI release has no
multimodal LoRA. These hosts optimise their own parameters for ``num_steps`` steps; ODEdit runs
*inside* that loop (same parameters, same optimiser, same steps), so a host alone and the host
with ODEdit differ only in the objective.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ..errors import ODEditError
from ..prefix_cache import decoder_layers
from ..settings import typed
from .base import Host, register_host


@dataclass
class FTHyperParams:
    """FT-L: ``layers`` of the language model (negative counts from the top), restricted to
    sub-modules whose name contains one of ``modules``. FT-V: parameters whose name contains one
    of ``modules`` (default: the vision-language projector). ``param_names`` overrides both."""

    layers: List[int] = field(default_factory=lambda: [-1])
    modules: List[str] = field(default_factory=lambda: ["mlp"])
    param_names: Optional[List[str]] = None
    num_steps: int = 20
    lr: float = 1e-3
    optimizer: str = "Adam"


@dataclass
class LoRAHyperParams:
    """LoRA adapters (peft) on the language-model modules named by ``target_modules`` (suffixes,
    e.g. ``down_proj``) inside ``layers``; merged into the weights when the edit is done."""

    layers: List[int] = field(default_factory=lambda: [-1])
    target_modules: List[str] = field(default_factory=lambda: ["down_proj", "up_proj"])
    rank: int = 4
    lora_alpha: float = 8.0
    num_steps: int = 20
    lr: float = 5e-3
    optimizer: str = "Adam"


def _layer_prefixes(model: nn.Module, layers: List[int]) -> List[str]:
    path, stack = decoder_layers(model.language_model)
    prefixes = []
    for layer in layers:
        index = layer if layer >= 0 else len(stack) + layer
        if not 0 <= index < len(stack):
            raise ODEditError("host_hparams.layers", layer,
                              f"the language model has {len(stack)} layers: use 0..{len(stack) - 1} or -1..-{len(stack)}")
        prefixes.append(f"language_model.{path}.{index}.")
    return prefixes


class OptimisingHost(Host):
    """A host that edits by optimising named parameters of the model for a number of steps; its
    hparams are the plugin's own dataclass (``hparams_class``)."""

    family = "optimise"
    hparams_class: type = FTHyperParams

    def __init__(self, hparams):
        self.hparams = hparams
        self.num_steps, self.lr, self.optimizer = hparams.num_steps, hparams.lr, hparams.optimizer

    @classmethod
    def create(cls, hparams) -> "OptimisingHost":
        return cls(hparams.host_params)

    @classmethod
    def build_hparams(cls, mapping: Dict[str, Any], inherited: Dict[str, Any], where: str):
        names = {f.name for f in dataclasses.fields(cls.hparams_class)}
        hints = typing.get_type_hints(cls.hparams_class)
        values = {}
        for key, value in mapping.items():
            if key in names:
                values[key] = typed(f"{where}: host_hparams.{key}", value, hints[key])
            elif key not in inherited and key not in ("alg_name", "alg", "model_name", "name", "device"):
                raise ODEditError(f"{where}: host_hparams.{key}", value,
                                  f"{cls.name} takes: {', '.join(sorted(names))}", problem="is not a known key")
        hparams = cls.hparams_class(**values)
        cls.check_hparams(hparams, where)
        return hparams

    @classmethod
    def check_hparams(cls, hp, where: str) -> None:
        if not isinstance(getattr(torch.optim, hp.optimizer, None), type):
            raise ODEditError(f"{where}: host_hparams.optimizer", hp.optimizer,
                              "name a torch.optim class, e.g. Adam or SGD")
        if not (math.isfinite(hp.lr) and hp.lr > 0):
            raise ODEditError(f"{where}: host_hparams.lr", hp.lr, "use a positive learning rate")
        if hp.num_steps < 0:
            raise ODEditError(f"{where}: host_hparams.num_steps", hp.num_steps, "use 0 or more steps")


def _check_selected(names: List[str], where: str, wanted) -> List[str]:
    if not names:
        raise ODEditError(where, wanted, "name parameters that exist in the model "
                          "(list them with [n for n, _ in model.named_parameters()])",
                          problem="selects no parameter")
    return names


class FineTuneHost(OptimisingHost):
    vision = False  # FT-V: the vision side's parameters instead of language-model layers

    def touched(self, model: nn.Module) -> List[str]:
        hp = self.hparams
        names = [n for n, _ in model.named_parameters()]
        if hp.param_names:
            missing = [n for n in hp.param_names if n not in names]
            if missing:
                raise ODEditError("host_hparams.param_names", missing, "use names from model.named_parameters()",
                                  problem="names parameters the model does not have")
            return list(hp.param_names)
        if self.vision:
            selected = [n for n in names if any(m in n for m in hp.modules) and "tower" not in n]
            return _check_selected(selected, "host_hparams.modules", hp.modules)
        prefixes = _layer_prefixes(model, hp.layers)
        selected = [n for n in names if any(n.startswith(p) for p in prefixes)
                    and any(f".{m}." in n or n[len(p):].startswith(m) for p in prefixes for m in hp.modules)]
        return _check_selected(selected, "host_hparams.modules", hp.modules)

    def prepare(self, model: nn.Module) -> Dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        return {n: params[n] for n in self.touched(model)}


@register_host
class FineTuneLanguageHost(FineTuneHost):
    name, aliases, note = "FT-L", ("FT", "FT_L"), "fine-tunes language-model layers"


@register_host
class FineTuneVisionHost(FineTuneHost):
    name, aliases, note = "FT-V", ("FT_V",), "fine-tunes the vision-language projector"
    vision = True


@register_host
class LoRAHost(OptimisingHost):
    name, aliases, note = "LoRA", ("LORA",), "LoRA adapters through peft, merged after the edit"
    hparams_class = LoRAHyperParams
    ADAPTER = "odedit_lora"

    @classmethod
    def check_hparams(cls, hp, where: str) -> None:
        super().check_hparams(hp, where)
        if hp.rank < 1 or not hp.lora_alpha > 0:
            raise ODEditError(f"{where}: host_hparams.rank/lora_alpha", (hp.rank, hp.lora_alpha),
                              "use rank >= 1 and lora_alpha > 0")

    def _targets(self, model: nn.Module) -> List[str]:
        prefixes = _layer_prefixes(model, self.hparams.layers)
        targets = [n for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and any(n.startswith(p) for p in prefixes)
                   and n.split(".")[-1] in self.hparams.target_modules]
        return _check_selected(targets, "host_hparams.target_modules", self.hparams.target_modules)

    def touched(self, model: nn.Module) -> List[str]:
        return [f"{t}.weight" for t in self._targets(model)]

    def prepare(self, model: nn.Module) -> Dict[str, nn.Parameter]:
        targets = self._targets(model)
        config = LoraConfig(r=self.hparams.rank, lora_alpha=self.hparams.lora_alpha, lora_dropout=0.0,
                            target_modules=targets)
        inject_adapter_in_model(config, model, adapter_name=self.ADAPTER)
        return {n: p for n, p in model.named_parameters() if "lora_" in n and self.ADAPTER in n}

    def finalize(self, model: nn.Module) -> None:
        """Merge the LoRA update into the base weights and put the plain ``nn.Linear`` back, so the
        edited model has the original structure and restoring is copying tensors."""
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                with torch.no_grad():
                    module.merge(adapter_names=[self.ADAPTER])
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
        if hasattr(model, "peft_config"):  # left by inject_adapter_in_model; the next edit would warn
            del model.peft_config
