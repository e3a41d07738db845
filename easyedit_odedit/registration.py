"""Putting ODEdit into EasyEdit's registries (idempotent; mutates EasyEdit's dicts in place,
because its editor and trainer hold references to the same dict objects)."""
from __future__ import annotations

from . import compat

ALG_NAME = "ODEdit"


def register() -> None:
    from .odedit.odedit_main import apply_odedit_to_multimodal_model

    compat.prepare_host()
    compat.alg_multimodal_dict()[ALG_NAME] = apply_odedit_to_multimodal_model
    if compat.flavour() == compat.MAIN:
        # main restores callables for these algorithms; ODEdit returns a callable RestorePoint.
        compat.module("editors.utils").CALLABLE_RESTORE_ALGS.add(ALG_NAME)
