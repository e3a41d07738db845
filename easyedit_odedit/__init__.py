"""ODEdit for EasyEdit: importing this package registers ``ODEdit`` in EasyEdit's multimodal
registry, so ``MultimodalEditor.from_hparams(ODEditHyperParams.from_hparams(yaml))`` just works."""
from . import compat

compat.ensure_torchvision_importable()  # before transformers is imported anywhere below

from .errors import ODEditError, ODEditFileNotFoundError, ODEditNumericalError  # noqa: E402
from .odedit import ODEditHyperParams, apply_odedit_to_multimodal_model, restore_all  # noqa: E402
from .registration import register  # noqa: E402

register()

__all__ = ["ODEditHyperParams", "ODEditError", "ODEditFileNotFoundError", "ODEditNumericalError",
           "apply_odedit_to_multimodal_model", "restore_all", "register"]
__version__ = "0.1.0"
