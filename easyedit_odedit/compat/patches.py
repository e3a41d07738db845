"""Every change the plugin makes to EasyEdit, torch, transformers or sentence-transformers, one
entry each (``PATCHES``), and the installer that applies them (``install``, ``host_scope``).

Kinds:

* ``NEEDED``: without it EasyEdit does not import or run on today's torch / transformers, or not
  on a machine without a GPU. It does not change what EasyEdit computes.
* ``FIX``: repairs a defect of EasyEdit. On by default; a user switches it off with
  ``ODEDIT_EASYEDIT_FIXES=0`` or ``disable_fixes()`` (all, or by ``name``) to reproduce EasyEdit as
  released.
* ``PLUGIN``: acts only on the plugin's own configs (``alg_name: ODEdit``), models or checkpoints;
  EasyEdit's own methods, models and configs pass through unchanged.

Scopes: ``import`` (before EasyEdit is imported), ``install`` (from ``import easyedit_odedit`` on),
``host`` (while one of EasyEdit's entry points runs: ``host_scope``), ``call`` (for one call, at the
site named in ``applied_by``).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import List, Optional

from . import entry_points, executors, scopes
from .easyedit import MAIN, alg_multimodal_dict, alg_train_dict, flavour, import_easyeditor, module
from .entry_points import PLUGIN, Plugin

NEEDED, FIX, PLUGIN_ONLY = "needed", "fix", "plugin"
IMPORT, INSTALL, HOST, CALL = "import", "install", "host", "call"
BOTH = ("pypi", "main")


@dataclass(frozen=True)
class Patch:
    target: str          # dotted path of what changes; ``[key]`` for an entry of a dict or set
    kind: str            # NEEDED, FIX or PLUGIN_ONLY
    scope: str           # IMPORT, INSTALL, HOST or CALL
    why: str
    until: str           # when it can go
    applied_by: str      # the function (module-qualified inside easyedit_odedit) that applies it
    versions: tuple = BOTH   # the EasyEdit versions it applies to
    adds: bool = False   # the target is a name the patch adds (only its owner exists before)
    name: str = ""       # a FIX's switch name (``disable_fixes(name)``)


_MME = "easyeditor.editors.multimodal_editor.MultimodalEditor"
_TRAINER = "easyeditor.trainer.BaseTrainer.BaseTrainer"
_CPU = ("EasyEdit moves tensors and modules to f'cuda:{device}' unconditionally; on a machine without a GPU "
        "they stay on the CPU (a no-op where CUDA exists)")
_CPU_UNTIL = "EasyEdit honours device: cpu"
_SERAC_SITE = ("EasyEdit constructs SERAC_MULTI by this name; on a plugin model the plugin's SERAC class "
               "(hosts/serac.py) is built instead")

PATCHES: List[Patch] = [
    # -- import ------------------------------------------------------------------------------------
    Patch("torch.library.Library", NEEDED, IMPORT,
          "PyPI's CUDA torchvision next to CPU torch fails to import (torchvision::nms); the two op schemas "
          "(nms, qnms) are declared in a 'torchvision' library fragment, only when that import fails",
          "torchvision and torch come from the same build", "compat.imports.ensure_torchvision_importable"),
    *[Patch(f"transformers.modeling_utils.{name}", NEEDED, IMPORT,
            "EasyEdit's Q-Former imports it from transformers.modeling_utils, which no longer re-exports it; "
            "put back only where missing", "EasyEdit imports it from transformers.pytorch_utils",
            "compat.imports.restore_transformers_reexports", adds=True)
      for name in ("apply_chunking_to_forward", "prune_linear_layer", "find_pruneable_heads_and_indices")],
    # -- install: EasyEdit's entry points ----------------------------------------------------------
    *[Patch(f"{_MME}.{name}", NEEDED, INSTALL,
            "runs inside host_scope; for alg_name ODEdit also the plugin's checks before EasyEdit reads its "
            "arguments (validation.py)", "the host-scope patches are gone", "compat.entry_points.wrap_entry_points")
      for name in entry_points.EDITOR_METHODS],
    *[Patch(f"{_TRAINER}.{name}", NEEDED, INSTALL,
            "runs inside host_scope; for alg ODEdit also the model check and the plugin's trainer hook (trainer.py)",
            "the host-scope patches are gone", "compat.entry_points.wrap_entry_points")
      for name in entry_points.TRAINER_METHODS],
    Patch(f"{_MME}.__init__", FIX, CALL,
          "ALG_MULTIMODAL_DICT holds one MEND/SERAC executor for the whole process, and it keeps the first "
          "model and archive it loads: a second editor silently edited with the first one; each editor gets "
          "its own executor", "EasyEdit builds an executor per editor", "compat.executors.own_executor",
          name=executors.OWN_EXECUTOR),
    Patch("easyeditor.editors.multimodal_editor.make_logs", FIX, CALL,
          "adds a file and a stream handler on every editor construction; duplicates are closed and dropped",
          "make_logs adds its handlers once", "compat.executors.dedupe_handlers", name=executors.LOG_HANDLERS),
    Patch("easyeditor.models.serac.serac_main.SeracMultimodalRewriteExecutor.apply_to_model", FIX, CALL,
          "main's editor passes [request] to every executor, but its multimodal SERAC executor reads one "
          "request: every single edit failed", "main's multimodal executors take a list",
          "compat.executors.executor_apply", versions=("main",), name=executors.ONE_REQUEST),
    Patch("easyeditor.models.mend.mend_main.MendMultimodalRewriteExecutor.apply_to_model", FIX, CALL,
          "as for SERAC: main's multimodal MEND executor reads one request", "main's multimodal executors take a list",
          "compat.executors.executor_apply", versions=("main",), name=executors.ONE_REQUEST),
    # -- install: models and SERAC built for plugin checkpoints -------------------------------------
    *[Patch(f"easyeditor.{mod}.{cls}", PLUGIN_ONLY, INSTALL,
            f"EasyEdit constructs {cls}({kwarg}=name); a plugin checkpoint folder is loaded by the plugin's "
            "loader instead, anything else goes to EasyEdit's class", "EasyEdit offers a model-class registry",
            "compat.entry_points.install_model_factories")
      for cls, (mods, kwarg) in entry_points.FACTORY_SITES.items() for mod in mods],
    *[Patch(f"easyeditor.{site}.SERAC_MULTI", PLUGIN_ONLY, INSTALL, _SERAC_SITE,
            "EasyEdit's SERAC_MULTI builds its counterfactual model for any language model",
            "compat.entry_points.install_serac_factory") for site in entry_points.SERAC_SITES],
    Patch("easyeditor.util.alg_train_dict.ALG_TRAIN_DICT[SERAC_MULTI]", PLUGIN_ONLY, INSTALL, _SERAC_SITE,
          "EasyEdit's SERAC_MULTI builds its counterfactual model for any language model",
          "compat.entry_points.install_serac_factory"),
    Patch("easyeditor.util.alg_dict.ALG_MULTIMODAL_DICT[ODEdit]", PLUGIN_ONLY, INSTALL,
          "registers ODEdit's apply function: EasyEdit's editor dispatches by alg_name",
          "(the plugin's entry point; stays)", "compat.patches.install", adds=True),
    Patch("easyeditor.util.alg_train_dict.ALG_TRAIN_DICT[ODEDIT]", PLUGIN_ONLY, INSTALL,
          "registers ODEdit's trainable: EasyEdit's trainer dispatches by alg", "(the plugin's entry point; stays)",
          "compat.patches.install", adds=True),
    Patch("easyeditor.editors.utils.CALLABLE_RESTORE_ALGS[ODEdit]", PLUGIN_ONLY, INSTALL,
          "main restores the result of these algorithms by calling it; ODEdit returns a callable RestorePoint",
          "(the plugin's entry point; stays)", "compat.patches.install", versions=("main",), adds=True),
    # -- host: while EasyEdit's entry points run ----------------------------------------------------
    *[Patch(target, NEEDED, HOST, _CPU + (" (map_location)" if target == "torch.load" else ""), _CPU_UNTIL,
            "compat.scopes.cpu_redirect")
      for target in ("torch.Tensor.to", "torch.nn.Module.to", "torch.Tensor.cuda", "torch.nn.Module.cuda", "torch.load")],
    Patch(f"os.environ[{scopes.FULL_UNPICKLING}]", NEEDED, HOST,
          "MEND/SERAC archives hold a config object, which torch>=2.6 refuses to unpickle by default; EasyEdit's "
          "torch.load calls do not pass weights_only=False", "EasyEdit passes weights_only=False",
          "compat.scopes.full_unpickling_for_easyedit_archives", adds=True),
    Patch("torch.nn.ModuleList.__getitem__", NEEDED, HOST,
          "transformers 5 slices self.layers[:n]; MEND's monkey-patched ModuleList copies cannot be rebuilt "
          "by their class, so a slice of one is a plain ModuleList of the same layers",
          "EasyEdit's patched modules support slicing", "compat.scopes.sliceable_patched_module_lists"),
    # -- call: one call at one site -----------------------------------------------------------------
    Patch("easyeditor.models.mend.mend_main.MendMultimodalRewriteExecutor", FIX, CALL,
          "the PyPI release never puts MEND's hypernetwork in eval mode (main does before each edit): its input "
          "normaliser re-estimated its statistics from each edit's own rows, so edits depended on the edits "
          "before them", "the PyPI release is retired", "compat.executors.ready_mend_executor",
          name=executors.MEND_EVAL),
    Patch("easyeditor.models.mend.mend_main.MendMultimodalRewriteExecutor", FIX, CALL,
          "the PyPI executor pairs edit_lrs[i] with the i-th inner parameter in model order, training in config "
          "order; the executor's own copy of inner_params and edit_lrs is put in model order",
          "the PyPI release is retired", "compat.executors.ready_mend_executor", versions=("pypi",),
          name=executors.MEND_EDIT_LRS),
    Patch("easyeditor.MENDMultimodalHparams", NEEDED, CALL,
          "the PyPI release reads hparams.model_parallel, which its multimodal hparams classes do not define; "
          "set to False on the hparams objects the plugin builds", "the PyPI release is retired",
          "compat.easyedit.complete_host_hparams", versions=("pypi",)),
    Patch("easyeditor.trainer.algs.SERAC.SERAC_MULTI.__init__", PLUGIN_ONLY, CALL,
          "sizes a projection by model.Qformer, which a plugin model lacks: a stand-in while it runs",
          "EasyEdit's SERAC_MULTI builds its counterfactual model for any language model",
          "compat.scopes.serac_projection_width"),
    Patch("sentence_transformers.base.model.BaseModel._module_classes", PLUGIN_ONLY, CALL,
          "sentence-transformers >= 6 refuses a saved module class outside its namespace unless "
          "trust_remote_code=True, which EasyEdit's IKE does not pass; exactly the plugin's sentence module "
          "resolves, while the bench's IKE loads it", "EasyEdit passes trust_remote_code",
          "compat.scopes.plugin_sentence_modules", adds=True),
    Patch("easyeditor.trainer.MultimodalTrainer.safe_backward", PLUGIN_ONLY, CALL,
          "for alg ODEdit, one edit_step's backward adds ODEdit's terms to EasyEdit's loss",
          "EasyEdit's trainer offers a loss hook", "trainer.ODEditMultimodalTrainer.edit_step"),
    Patch("easyeditor.trainer.algs.MEND.MEND.edit", PLUGIN_ONLY, CALL,
          "for alg ODEdit, one edit_step records the edited model's outputs (the trainable's edit, on the "
          "instance)", "EasyEdit's trainer offers a loss hook", "trainer.ODEditMultimodalTrainer.edit_step"),
    Patch("easyeditor.trainer.algs.SERAC.SERAC_MULTI.edit", PLUGIN_ONLY, CALL,
          "as for MEND.edit", "EasyEdit's trainer offers a loss hook", "trainer.ODEditMultimodalTrainer.edit_step"),
    Patch("easyeditor.trainer.MultimodalTrainer.MultimodalTrainer", PLUGIN_ONLY, CALL,
          "a trainer built for alg ODEdit gets a subclass with ODEdit's edit_step (its __class__)",
          "EasyEdit's trainer offers a loss hook", "trainer.adopt"),
]


def fixes() -> List[Patch]:
    """The fixes of EasyEdit defects a user can switch off."""
    return [p for p in PATCHES if p.kind == FIX]


# ---------------------------------------------------------------------------------------------
# The installer
# ---------------------------------------------------------------------------------------------
_HOST_SCOPE = (scopes.cpu_redirect, scopes.full_unpickling_for_easyedit_archives, scopes.sliceable_patched_module_lists)


@contextlib.contextmanager
def host_scope():
    """Everything EasyEdit's own entry points need on today's stack (the ``host`` entries), for one call."""
    with contextlib.ExitStack() as stack:
        for scope in _HOST_SCOPE:
            stack.enter_context(scope())
        yield


@functools.lru_cache(maxsize=None)
def prepare_host() -> str:
    """Import EasyEdit and install the ``install`` entries that need nothing of the plugin. Idempotent."""
    import_easyeditor()
    entry_points.wrap_entry_points(host_scope)
    entry_points.install_model_factories()
    entry_points.install_serac_factory()
    return flavour()


def install(plugin: Optional[Plugin] = None) -> None:
    """Apply the ``install`` entries; with ``plugin``, also put the plugin's parts where EasyEdit
    finds them. Idempotent."""
    prepare_host()
    if plugin is None:
        return
    for field_name in ("check_edit", "check_model", "serac_class", "alg_name"):
        setattr(PLUGIN, field_name, getattr(plugin, field_name))
    alg_multimodal_dict().update(plugin.multimodal_algs)
    alg_train_dict().update(plugin.train_algs)
    if flavour() == MAIN:
        module("editors.utils").CALLABLE_RESTORE_ALGS.update(plugin.callable_restore_algs)
    for hook in plugin.trainer_init:
        if hook not in PLUGIN.trainer_init:
            PLUGIN.trainer_init.append(hook)
