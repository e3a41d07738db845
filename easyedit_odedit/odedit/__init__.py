from .odedit_hparams import ODEditHyperParams
from .odedit_main import apply_odedit_to_multimodal_model
from .restore import restore_all

__all__ = ["ODEditHyperParams", "apply_odedit_to_multimodal_model", "restore_all"]
