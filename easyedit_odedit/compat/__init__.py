"""Host compatibility: the one package that knows which EasyEdit is installed and what it needs.

Every change the plugin makes to EasyEdit, torch, transformers or sentence-transformers is one
entry of ``patches.PATCHES`` (what, which EasyEdit versions, why, when it can go, whether it is a
fix of an EasyEdit defect a user may switch off), applied by ``patches.install`` and
``patches.host_scope``. Nothing else in the package patches EasyEdit.

* ``imports``: the shims EasyEdit's import needs (leaf module);
* ``easyedit``: which EasyEdit is installed, its registries and modules (changes nothing);
* ``scopes``: patches that hold for a block (CPU redirect, unpickling, ...; leaf module);
* ``executors``: fixes of EasyEdit's MEND/SERAC executors and editor logs; ``fixes``: their switch;
* ``entry_points``: what the installer puts at EasyEdit's editor, trainer and constructors;
* ``patches``: the table and the installer.
"""
from .imports import ensure_torchvision_importable

ensure_torchvision_importable()  # before anything below imports transformers

from .easyedit import (MAIN, PYPI, alg_multimodal_dict, alg_train_dict, complete_host_hparams,  # noqa: E402
                       counts_special_tokens, easyedit_class, flavour, has_multimodal_alg, import_easyeditor,
                       module, multimodal_dataset_classes, multimodal_evaluation, process_image_file)
from .entry_points import Plugin  # noqa: E402
from .executors import editor_executor, executor_apply, ready_mend_executor  # noqa: E402
from .fixes import disable_fixes, enable_fixes, fix_enabled  # noqa: E402
from .patches import PATCHES, Patch, fixes, host_scope, install, prepare_host  # noqa: E402
from .scopes import cpu_redirect, plugin_sentence_modules, serac_projection_width  # noqa: E402

__all__ = ["MAIN", "PYPI", "PATCHES", "Patch", "Plugin", "alg_multimodal_dict", "alg_train_dict",
           "complete_host_hparams", "counts_special_tokens", "cpu_redirect", "disable_fixes", "easyedit_class",
           "editor_executor", "enable_fixes", "ensure_torchvision_importable", "executor_apply", "fix_enabled",
           "fixes", "flavour", "has_multimodal_alg", "host_scope", "import_easyeditor", "install", "module",
           "multimodal_dataset_classes", "multimodal_evaluation", "plugin_sentence_modules", "prepare_host",
           "process_image_file", "ready_mend_executor", "serac_projection_width"]
