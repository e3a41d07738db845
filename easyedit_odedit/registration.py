"""Putting ODEdit into EasyEdit's registries (idempotent; mutates EasyEdit's dicts in place,
because its editor and trainer hold references to the same dict objects)."""
from __future__ import annotations

from . import compat

ALG_NAME, TRAIN_KEY = "ODEdit", "ODEDIT"


def register() -> None:
    from .odedit.odedit_main import apply_odedit_to_multimodal_model
    from .trainer import ODEditTrainable, adopt

    compat.prepare_host()
    compat.alg_multimodal_dict()[ALG_NAME] = apply_odedit_to_multimodal_model
    if compat.flavour() == compat.MAIN:
        # main restores callables for these algorithms; ODEdit returns a callable RestorePoint.
        compat.module("editors.utils").CALLABLE_RESTORE_ALGS.add(ALG_NAME)
    compat.alg_train_dict()[TRAIN_KEY] = ODEditTrainable
    if adopt not in compat.TRAINER_INIT_HOOKS:
        compat.TRAINER_INIT_HOOKS.append(adopt)
