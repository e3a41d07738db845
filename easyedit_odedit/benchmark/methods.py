"""The bench's methods: a host alone or with ODEdit (``Method``), and the meta-trained hosts MEND and
SERAC, whose archives edit through EasyEdit's own executors."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Dict, Optional, Tuple

import yaml

from .. import compat, restore_all
from ..hosts.easyedit_native import build_easyedit_hparams
from ..hosts.serac import scope_classifier_for
from ..odedit.odedit_hparams import ODEditHyperParams
from ..odedit.odedit_main import apply_odedit_to_multimodal_model
from .config import META_TRAINED_HOSTS, PARAPHRASES, BenchConfigError, _merge


class Method:
    """One row of the table: a host alone, with ODEdit, or an ODEdit variant."""

    edit_kind: Optional[str] = None  # what an edit leaves, where it is not only weights (no-leakage check)

    def __init__(self, host: str, yaml_path: str, odedit: bool, variant: Optional[str] = None,
                 overrides: Optional[dict] = None, lr: Optional[float] = None, common: Optional[dict] = None):
        self.host, self.yaml_path, self.odedit = host, yaml_path, odedit
        self.variant, self.overrides, self.lr, self.common = variant, overrides or {}, lr, common or {}

    @property
    def name(self) -> str:
        base = f"{self.host}+ODEdit" if self.odedit else self.host
        return f"{base}[{self.variant}]" if self.variant else base

    def hparams(self, data: Dict[str, str], model_dir: str, seed: int):
        with open(self.yaml_path) as f:
            config = yaml.safe_load(f)
        config = _merge(_merge(config, self.common), self.overrides)
        if self.lr is not None:
            config.setdefault("host_hparams", {})
            if not isinstance(config["host_hparams"], dict):
                raise BenchConfigError(f"{self.yaml_path}: the lr curve needs inline host_hparams")
            config["host_hparams"]["lr"] = float(self.lr)
        _point_at_world(config, data, model_dir, seed, enabled=self.odedit)
        return ODEditHyperParams.from_dict(config, source_path=self.yaml_path)

    def host_lr(self, hp) -> Optional[float]:
        return float(getattr(hp.host_params, "lr", float("nan"))) if hasattr(hp.host_params, "lr") else None

    @staticmethod
    def edited_state(editor, hp, requests) -> dict:
        """What an edit of ``requests`` leaves in the model: every tensor, after which it is undone."""
        _, restore = apply_odedit_to_multimodal_model(editor.model, editor.tok, requests, hp, keep_original_weight=True)
        state = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
        restore()
        return state

    @staticmethod
    def edit_in_sequence(editor, hp, request):
        """One edit of a sequence, kept; returns the model to evaluate."""
        apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp, keep_original_weight=False)
        return editor.model

    @staticmethod
    def end_sequence(editor) -> None:
        restore_all(editor.model)


def _point_at_world(config: dict, data: Dict[str, str], model_dir: str, seed: int, enabled: bool) -> None:
    """The model, image roots, seed and train-split pool of one bench world, into an ODEdit config."""
    image_root = os.path.abspath(data["image_root"])
    config.update(enabled=enabled, name=model_dir, tokenizer_name=model_dir, model_name="blip2",
                  coco_image=image_root, rephrase_image=image_root, seed=int(seed))
    env = dict(config.get("environments") or {})
    env.update(locality_pool=os.path.abspath(data["locality_pool"]), locality_image_root=image_root,
               paraphrases=env.get("paraphrases") or PARAPHRASES)
    config["environments"] = env


class MetaTrainedMethod(Method):
    """A host meta-trained per seed on the train split with EasyEdit's own ``MultimodalTrainer``
    (``train_meta``): the host alone with EasyEdit's objective (``alg`` = the host's key), the host
    with ODEdit with ``alg: ODEdit`` (EasyEdit's losses plus ODEdit's terms). ``trained(seed, alg)``
    gives the training's record (``archive``, ...), training on first use."""

    section_key: str = ""   # the bench config's section
    host_name: str = ""     # the plugin's host name (registry)
    host_alg: str = ""      # EasyEdit's training key

    def __init__(self, section: dict, odedit: bool, trained=None, variant: Optional[str] = None,
                 overrides: Optional[dict] = None):
        super().__init__(self.host_name, section["yaml"], odedit, variant=variant, overrides=overrides)
        self.section, self.trained = section, trained

    @staticmethod
    def training_fields(model_dir: str, results_dir: str, seed: int) -> dict:
        """Host fields the seed's training needs beyond the section's (kept in the training record)."""
        return {}

    @property
    def training_alg(self) -> str:
        return "ODEdit" if self.odedit else self.host_alg

    def host_fields(self, editing_class) -> Tuple[dict, dict]:
        """The section's host fields that EasyEdit's editing hparams class takes."""
        with open(self.yaml_path) as f:
            config = yaml.safe_load(f)
        names = {f.name for f in dataclasses.fields(editing_class)}
        host = _merge(config["host_hparams"], self.section.get("train") or {})
        return config, {k: v for k, v in host.items() if k in names}


class MendMethod(MetaTrainedMethod):
    """MEND edited by EasyEdit's MEND executor from its archive: both rows edit through the same path
    (``enabled: false``, ``optimiser.steps`` = ``edit_steps``, 0 by default: the executor's edit
    only). With ``edit_odedit: true`` and ``edit_steps`` > 0, MEND+ODEdit also refines each edit under
    the ODEdit objective (the refine family) while MEND alone refines under the edit's NLL, same steps."""

    section_key, host_alg = "mend", "MEND"
    host_name = META_TRAINED_HOSTS[section_key]

    def hparams(self, data: Dict[str, str], model_dir: str, seed: int):
        config, host = self.host_fields(compat.import_easyeditor().MENDMultimodalHparams)
        config = _merge(config, self.overrides)  # a variant's editing settings (the archive is the same)
        host.update(archive=self.trained(seed, self.training_alg)["archive"],
                    lr_scale=float(host.get("lr_scale", 1.0)), alg="MEND")
        config["host_hparams"] = host
        optimiser = dict(config.get("optimiser") or {}, steps=int(self.section.get("edit_steps", 0)))
        if self.section.get("edit_lr") is not None:  # the refinement's step, both rows (default: |edit_lr|)
            optimiser["lr"] = float(self.section["edit_lr"])
        config["optimiser"] = optimiser
        _point_at_world(config, data, model_dir, seed, enabled=self.odedit and bool(self.section.get("edit_odedit")))
        return ODEditHyperParams.from_dict(config, source_path=self.yaml_path)

    def host_lr(self, hp) -> Optional[float]:
        return float(hp.host_params.edit_lr)


class SeracMethod(MetaTrainedMethod):
    """SERAC edited by EasyEdit's own SERAC executor (``SERACMultimodalHparams`` with the archive):
    the edit goes into SERAC's memory, no weight changes; the edited model EasyEdit returns (the
    base model, the scope classifier and the counterfactual model with the edit in memory) is what
    is evaluated. ODEdit acts through meta-training only (SERAC has no weights an edit changes)."""

    section_key, host_alg = "serac", "SERAC_MULTI"
    host_name = META_TRAINED_HOSTS[section_key]
    edit_kind = "SERAC's memory (the edit texts it keeps) and every weight"

    @staticmethod
    def training_fields(model_dir: str, results_dir: str, seed: int) -> dict:
        """The scope classifier to start from: a small BERT over the model's vocabulary, the same for
        both objectives of a seed."""
        folder = os.path.join(os.path.dirname(results_dir), "scope-bert")
        return {"cls_name": scope_classifier_for(model_dir, folder, seed=seed)}

    def hparams(self, data: Dict[str, str], model_dir: str, seed: int):
        training = self.trained(seed, self.training_alg)
        _, host = self.host_fields(compat.import_easyeditor().SERACMultimodalHparams)
        host.update(archive=training["archive"], cls_name=training["cls_name"], alg_name="SERAC_MULTI")
        return build_easyedit_hparams("SERAC", host, _model_fields(self.yaml_path, data, model_dir), "bench serac")

    def host_lr(self, hp) -> Optional[float]:
        return None

    @staticmethod
    def edit_in_sequence(editor, hp, request):
        """EasyEdit's SERAC executor edits its own unedited SERAC each time (a memory of one edit):
        for a sequence it continues from the SERAC the last edit returned, so the memory grows."""
        with compat.host_scope():  # EasyEdit's executor outside its editor's own (scoped) entry points
            edited, _ = editor.apply_algo(editor.model, editor.tok, [request], hp, keep_original_weight=False)
        compat.editor_executor(editor).alg = edited
        return edited

    @staticmethod
    def end_sequence(editor) -> None:
        """Back to the memory-less SERAC the archive loaded (its memory is all a sequence changed)."""
        executor = compat.editor_executor(editor)
        if executor.is_init:
            executor.reset_model()  # EasyEdit's own reset: the next edit loads the archive again

    @staticmethod
    def edited_state(editor, hp, requests) -> dict:
        """SERAC's edit is its memory: the texts it keeps, and the weights (which must not change)."""
        with compat.host_scope():
            edited, _ = editor.apply_algo(editor.model, editor.tok, requests, hp, keep_original_weight=True)
        tensors = {**{f"base.{k}": v for k, v in editor.model.state_dict().items()},
                   **{k: v for k, v in edited.state_dict().items() if hasattr(v, "detach")}}
        return {"memory": (list(edited.cache_inputs), list(edited.cache_labels)),
                **{k: v.detach().clone() for k, v in tensors.items()}}


def _model_fields(yaml_path: str, data: Dict[str, str], model_dir: str, results_dir: Optional[str] = None) -> dict:
    """The model and image fields EasyEdit's own hparams classes take, for one bench world."""
    with open(yaml_path) as f:
        config = yaml.safe_load(f)
    image_root = os.path.abspath(data["image_root"])
    fields = dict(model_name="blip2", name=model_dir, tokenizer_name=model_dir,
                  tokenizer_class=config.get("tokenizer_class", "PreTrainedTokenizerFast"),
                  coco_image=image_root, rephrase_image=image_root, device=config.get("device", 0))
    if results_dir is not None:
        fields["results_dir"] = results_dir
    return fields


META_TRAINED = {"mend": MendMethod, "serac": SeracMethod}


def _quiet_easyedit() -> None:
    """EasyEdit logs every edit at INFO to the console and logs/run.log; the bench keeps its own."""
    for name in ("easyeditor.editors.multimodal_editor", "easyeditor.editors.editor", "easyeditor",
                 "easyeditor.trainer.BaseTrainer", "easyeditor.trainer.MultimodalTrainer", "easyeditor.trainer.algs.MEND",
                 "easyeditor.trainer.models", "easyeditor.trainer.algs.local_nn", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_editor(hp):
    editor = compat.import_easyeditor().MultimodalEditor.from_hparams(hp)
    _quiet_easyedit()
    return editor
