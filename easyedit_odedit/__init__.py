"""ODEdit for EasyEdit: importing this package registers ``ODEdit`` in EasyEdit's multimodal
registry, so ``MultimodalEditor.from_hparams(ODEditHyperParams.from_hparams(yaml))`` just works."""
from . import compat  # first: its import shims run before anything imports transformers
from .errors import ODEditError, ODEditFileNotFoundError, ODEditNumericalError
from .odedit import ODEditHyperParams, apply_odedit_to_multimodal_model, restore_all
from .registration import register

register()

__all__ = ["ODEditHyperParams", "ODEditError", "ODEditFileNotFoundError", "ODEditNumericalError",
           "apply_odedit_to_multimodal_model", "restore_all", "register"]
__version__ = "0.1.0"
