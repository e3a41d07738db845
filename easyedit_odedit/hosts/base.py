"""The host contract (``Host``) and the registry every host class enters where it is defined
(``@register_host``, peft's shape): ``host_spec("FT-L")`` is the class, ``build_host(hparams)`` the
host object ODEdit drives for one edit."""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Tuple, Type

from torch import nn

from ..errors import ODEditError

HOSTS: Dict[str, Type["Host"]] = {}   # name -> class, in registration order (the order errors list them)
ALIASES: Dict[str, str] = {}          # another spelling -> name
NOT_DECORATABLE = {"IKE": "IKE edits in context (it only prepends demonstrations) and changes no weight, so "
                          "there is nothing for ODEdit to optimise; use `alg_name: IKE` with EasyEdit's own "
                          "IKEMultimodalHyperParams instead"}


class Host:
    """A host editing method as ODEdit drives it. Per edit, ODEdit builds one with ``create``, then
    calls ``touched`` (the existing weights it changes), ``run_host`` (refine family only: the host's
    own edit first), ``prepare`` (the parameters to optimise), ``num_steps`` steps of ``optimizer``
    at ``lr``, and ``finalize`` (also after a failure)."""

    name: ClassVar[str] = ""
    aliases: ClassVar[Tuple[str, ...]] = ()
    family: ClassVar[str] = ""   # "optimise" (ODEdit runs inside its loop), "refine" (it edits, ODEdit
                                 # refines what it changed) or "train" (ODEdit extends its meta-training)
    note: ClassVar[str] = ""
    num_steps: int
    lr: float
    optimizer: str

    @classmethod
    def build_hparams(cls, mapping: Dict[str, Any], inherited: Dict[str, Any], where: str):
        """The host's hparams object from the ``host_hparams`` mapping (and the model fields given at
        the top of the ODEdit YAML); raises ODEditError naming the key."""
        raise NotImplementedError

    @classmethod
    def create(cls, hparams) -> "Host":
        """The host object for one edit with these ``ODEditHyperParams``."""
        raise NotImplementedError

    def touched(self, model: nn.Module) -> List[str]:
        """Names of the existing parameters this host changes (known before the edit)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> Dict[str, nn.Parameter]:
        """The parameters ODEdit optimises, by name."""
        raise NotImplementedError

    def finalize(self, model: nn.Module) -> None:
        """Called after the last step (and on failure): leave the model in its plain structure."""


def register_host(cls: Type[Host]) -> Type[Host]:
    """Class decorator: enter a host class under its ``name`` and ``aliases``."""
    HOSTS[cls.name] = cls
    ALIASES.update({alias: cls.name for alias in cls.aliases})
    return cls


def host_spec(name: str, where: str = "hparams") -> Type[Host]:
    key = ALIASES.get(name, ALIASES.get(name.upper(), name))
    if key.upper() in NOT_DECORATABLE:
        raise ODEditError(f"{where}: host", name, NOT_DECORATABLE[key.upper()], problem="cannot be decorated")
    if key not in HOSTS:
        raise ODEditError(f"{where}: host", name, f"use one of: {', '.join(HOSTS)}", problem="is not a known host")
    return HOSTS[key]


def build_host(hparams) -> Host:
    return host_spec(hparams.host).create(hparams)
