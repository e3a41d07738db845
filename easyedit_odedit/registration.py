"""Putting ODEdit into EasyEdit (idempotent): its apply function and trainable into EasyEdit's
registries, and its checks, trainer hook and SERAC class where ``compat``'s installer calls them
(EasyEdit's editor and trainer hold references to the same dict objects, so they are updated in
place)."""
from __future__ import annotations

from . import compat
from .hosts.serac import PluginSERAC
from .odedit.odedit_main import apply_odedit_to_multimodal_model
from .trainer import ODEditTrainable, adopt
from .validation import check_model_fields, validate_edit_call

ALG_NAME, TRAIN_KEY = "ODEdit", "ODEDIT"


def register() -> None:
    compat.install(compat.Plugin(
        multimodal_algs={ALG_NAME: apply_odedit_to_multimodal_model}, train_algs={TRAIN_KEY: ODEditTrainable},
        callable_restore_algs=(ALG_NAME,),  # main restores callables; ODEdit returns a callable RestorePoint
        check_edit=validate_edit_call, check_model=check_model_fields, trainer_init=[adopt],
        serac_class=PluginSERAC, alg_name=ALG_NAME))
