"""EasyEdit's own multimodal WISE, GRACE and LoRA (GitHub main only) as ODEdit *refine* hosts.

The host edits first, with the function EasyEdit registers for it (``ALG_MULTIMODAL_DICT['WISE']``
is ``apply_wise_to_multimodal_model``; likewise GRACE and LoRA), on the raw transformers model and
its processor, called as EasyEdit's own editor calls it. ODEdit then optimises, under its objective
and for ``optimiser.steps`` steps from the host's solution, exactly what the host added:

* ``WISE``: the side memory ``new_weight`` of the ``WISEAdapter`` at ``inner_params[0]`` (only the
  entries WISE's own random mask lets it train);
* ``GRACE``: the codebook ``values`` of the ``GRACEAdapter`` at ``inner_params[0]`` (keys stay);
* ``EasyEdit-LoRA``: the LoRA matrices peft injected (what the returned peft model leaves trainable).

Each is read from what the host declares (the adapter at ``inner_params``, the returned model),
else from a before/after comparison: parameters that are new, or whose in-place version counter
moved, and that the host left trainable. The host's structure stays after the edit (EasyEdit
evaluates through it). Restoring puts the *original* module objects back where the host swapped
them, then the host's requires_grad flags and model-level settings - no copy of the model is kept.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable, ClassVar, Dict, List, Optional

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from .. import compat
from ..errors import ODEditError
from ..models.hf_native import _to_pil_list
from .base import register_host
from .easyedit_native import EasyEditHost


class Snapshot:
    """What the model looked like before the host ran: module objects by path, parameter versions,
    requires_grad flags and instance attributes (all cheap: no tensor is copied)."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self.flags = [(p, p.requires_grad) for p in model.parameters()]  # also keeps the ids below unique
        self.versions = {id(p): p._version for p, _ in self.flags}
        self.attributes = set(vars(model))

    def new_trainable(self, model: nn.Module) -> List[nn.Parameter]:
        """The generic fallback: parameters the host added or changed in place and left trainable."""
        return [p for p in model.parameters() if p.requires_grad and self.versions.get(id(p)) != p._version]

    def undo(self, model: nn.Module) -> None:
        for name, original in self.modules.items():  # parents come before their children
            if not name:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self.modules[parent_name]
            if parent._modules.get(child) is not original:
                setattr(parent, child, original)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for key in set(vars(model)) - self.attributes:  # e.g. peft's `peft_config`
            delattr(model, key)


def resolve_param_path(model: nn.Module, name: str, where: str) -> str:
    """EasyEdit's ``model.layers[23].mlp.down_proj.weight`` in periods, with negative layer indices
    counted from the end (so one YAML also fits a smaller model of the family)."""
    parts = str(name).replace("[", ".").replace("]", "").split(".")
    try:
        for i, part in enumerate(parts):
            if part.startswith("-") and part[1:].isdigit():
                parts[i] = str(len(model.get_submodule(".".join(parts[:i]))) + int(part))
    except (AttributeError, TypeError):
        parts = []
    resolved = ".".join(parts)
    names = [n for n, _ in model.named_parameters()]
    if resolved not in names:
        example = next((n for n in reversed(names) if n.endswith("mlp.down_proj.weight")), names[-1])
        raise ODEditError(where, name, f"name a weight of the model, e.g. {example} (transformers 5 names)",
                          problem="names no parameter of the model")
    return resolved


def _with_brackets(path: str) -> str:
    """``layers.3.mlp`` -> ``layers[3].mlp``, the form EasyEdit's WISE and GRACE evaluate."""
    return "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in path.split(".")).lstrip(".")


def _native_model(adapter, host: str):
    if not hasattr(adapter, "hf_model"):
        raise ODEditError("model_name", type(adapter).__name__,
                          f"{host} runs on GitHub main's HF models: point model_name at a Qwen2-VL or "
                          "LLaVA-OneVision folder (its name containing qwen2-vl / llava-onevision)",
                          problem="is not a model EasyEdit's multimodal " + host + " edits")
    return adapter.hf_model, adapter.processor


def _request(view: dict, host: str) -> dict:
    """The request as main's editor builds it for HF models (PIL images), from the edit's own
    fields only."""
    images = _to_pil_list(view.get("image"))
    if not images:
        raise ODEditError("request image", None, f"give every edit an image: {host} edits image questions")
    return {"prompt": view["prompt"], "target": view["target"], "file_type": "image" if len(images) == 1 else "multi-image",
            "image": images[0] if len(images) == 1 else images}


class EasyEditAdapterHost(EasyEditHost):
    """Shared by the three: run EasyEdit's apply, find what it added, undo it on restore."""

    family = "refine"
    needs_out_rows = False  # True: the host also reads an unrelated prompt from ODEdit's OUT rows
    lr_field: ClassVar[str] = "edit_lr"  # the host hparams' learning rate, ODEdit's default refinement step

    def __init__(self, name: str, alg: str, host_hparams, optimiser, host_lr: float):
        self.name, self.alg, self.hparams = name, alg, host_hparams
        self.num_steps = optimiser.steps
        self.lr = optimiser.lr if optimiser.lr is not None else float(host_lr)
        self.optimizer = "Adam"
        self.returned = self.snapshot = None
        self.request: dict = {}

    @classmethod
    def create(cls, hparams) -> "EasyEditAdapterHost":
        host_hparams = hparams.host_params
        return cls(cls.name, cls.easyedit_alg, host_hparams, hparams.optimiser, getattr(host_hparams, cls.lr_field))

    # -- before the host -------------------------------------------------------------------
    def touched(self, adapter) -> List[str]:
        """Existing weights the host wraps (their layer bounds ODEdit's prefix cache); [] if unknown."""
        return []

    def host_hparams_for(self, model: nn.Module):
        return copy.copy(self.hparams)

    def build_request(self, view: dict, rows) -> dict:
        return _request(view, self.name)

    # -- the host ----------------------------------------------------------------------------
    def run_host(self, adapter, tok, view: dict, rows=(), undo: Optional[list] = None) -> None:
        model, processor = _native_model(adapter, self.name)
        self.tokenizer = processor.tokenizer
        self.request = self.build_request(view, rows)
        hparams = self.applied = self.host_hparams_for(model)
        snapshot = self.snapshot = Snapshot(model)
        if undo is not None:  # registered before EasyEdit runs: a failure half-way is undone too
            undo.append(self.undo_action(model, snapshot))
        apply = compat.alg_multimodal_dict()[self.alg]
        with compat.host_scope():
            self.returned = apply(model, processor, [self.request], hparams, copy=False,
                                  return_orig_weights=True, keep_original_weight=False)

    def undo_action(self, model: nn.Module, snapshot: Snapshot) -> Callable[[], None]:
        return lambda: snapshot.undo(model)

    # -- ODEdit's refinement -----------------------------------------------------------------
    def declared(self, model: nn.Module) -> List[nn.Parameter]:
        return []

    def prepare(self, adapter) -> Dict[str, nn.Parameter]:
        model = adapter.hf_model
        chosen = self.declared(model) or self.snapshot.new_trainable(model)
        if not chosen:
            raise ODEditError("host", self.name, "check host_hparams (EasyEdit's own YAML for it edits?)",
                              problem="added no trainable parameter for ODEdit to refine")
        names = {id(p): n for n, p in adapter.named_parameters()}
        self.enter_refinement(model)
        return {names[id(p)]: p for p in chosen}

    def enter_refinement(self, model: nn.Module) -> None:
        """Put the host's modules in the mode ODEdit's batched forward needs."""

    def finalize(self, adapter) -> None:
        """Back to the host's inference mode (also after a failure)."""


class _InnerParamsHost(EasyEditAdapterHost):
    """WISE and GRACE: an adapter module replaces the layer of ``inner_params[0]``."""

    ATTRIBUTE = ""  # the adapter's trainable tensor ODEdit refines

    def host_hparams_for(self, model: nn.Module):
        hparams = super().host_hparams_for(model)
        resolved = [resolve_param_path(model, n, "host_hparams.inner_params") for n in hparams.inner_params]
        hparams.inner_params = [_with_brackets(n) for n in resolved]  # EasyEdit eval()s "self.model.<path>"
        if getattr(hparams, "dtype", False) is None:  # EasyEdit moves its inputs to this dtype
            hparams.dtype = next(model.parameters()).dtype
        self.weight_path = resolved[0]
        self.layer_path = resolved[0].rsplit(".", 1)[0]
        return hparams

    def touched(self, adapter) -> List[str]:
        model, _ = _native_model(adapter, self.name)
        self.host_hparams_for(model)
        weight = model.get_parameter(self.weight_path)
        return [n for n, p in adapter.named_parameters() if p is weight]

    def module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.layer_path)

    def declared(self, model: nn.Module) -> List[nn.Parameter]:
        value = getattr(self.module(model), self.ATTRIBUTE, None)
        return [value] if isinstance(value, nn.Parameter) else []


@register_host
class WISEHost(_InnerParamsHost):
    """WISE reads an unrelated text prompt with every edit (its activation margin keeps the side
    memory quiet there); it gets the first of ODEdit's own OUT text rows, never a request field."""

    name, note = "WISE", "EasyEdit's WISE; ODEdit refines its side memory"
    easyedit_alg, editing_hparams = "WISE", "WISEMultimodalHyperParams"
    ATTRIBUTE = "new_weight"
    needs_out_rows = True

    def build_request(self, view: dict, rows) -> dict:
        request = super().build_request(view, rows)
        unrelated = next((r for r in rows if r.env == "OUT_text"), None)
        if unrelated is None:
            raise ODEditError("environments.locality_pool", None,
                              "give a locality pool with text-only prompts and environments.out_text >= 1: "
                              "WISE needs one unrelated prompt per edit", problem="gives WISE no unrelated text prompt")
        request.update(locality_prompt=unrelated.prompt, locality_ground_truth=unrelated.target)
        return request

    def run_host(self, adapter, tok, view: dict, rows=(), undo: Optional[list] = None) -> None:
        model, _ = _native_model(adapter, self.name)
        self.host_hparams_for(model)
        before = self.module(model)
        # the activation record as it was before this edit (WISE reuses it with sequential_edit)
        self._before = before, copy.deepcopy(getattr(before, "editing_mean_act", None))
        super().run_host(adapter, tok, view, rows, undo)

    def enter_refinement(self, model: nn.Module) -> None:
        """In WISE's editing mode every row goes through the side memory. (Its inference mode routes
        the whole batch one way by the batch's mean activation distance.) The gradient is masked as
        WISE masks its own, so ODEdit moves only this edit's share of the memory."""
        wise = self.module(model)
        freqs = (wise.config.save_freq, wise.config.merge_freq)
        if any(f and wise.editing_total_cnt % f == 0 for f in freqs):  # new_weight is now a blank copy
            raise ODEditError("host_hparams.save_freq/merge_freq", freqs, "set both above the number of edits one "
                              "WISE adapter takes", problem="made WISE move this edit's side memory into its "
                              "memory bank before ODEdit could refine it")
        wise.editing = wise.training = True
        mask = wise.weight_mask.to(wise.new_weight.dtype).view_as(wise.new_weight)
        self._mask_hook = wise.new_weight.register_hook(lambda grad: grad * mask)
        self._version = wise.new_weight._version  # unmoved (steps: 0): WISE's own record stays, bit for bit

    def finalize(self, adapter) -> None:
        hook, self._mask_hook = getattr(self, "_mask_hook", None), None
        if hook is not None:
            hook.remove()
            wise = self.module(adapter.hf_model)
            # after a failure (raised through edit_once's finally) the edit is undone: nothing to record
            if wise.new_weight._version != self._version and sys.exc_info()[0] is None:
                self._record_activation(adapter, wise)
            wise.editing = wise.training = False

    def _record_activation(self, adapter, wise) -> None:
        """WISE's inference routes by ``act_ratio`` x the smallest in-scope distance it recorded, and
        it recorded this edit's at its own last step, before ODEdit moved ``new_weight``. The record
        is redone with WISE's own code on the edit's own rows at the refined weights, *replacing*
        this edit's entry (not added: min() would keep the stale one whenever it is smaller, a
        threshold for weights that no longer exist); earlier edits' entries stay as WISE left them."""
        from easyeditor.models.wise.utils import multimodal_tokenize  # GitHub main only (not in the PyPI release)

        before, prior = self._before
        wise.editing_mean_act = prior if wise is before else type(wise.editing_mean_act)()
        inputs = multimodal_tokenize([self.request], processor=adapter.processor, device=wise.new_weight.device,
                                     hparams=self.applied)[0]
        with torch.no_grad():
            adapter.hf_model(**inputs)
        wise.save_editing_activation()


@register_host
class GRACEHost(_InnerParamsHost):
    name, note = "GRACE", "EasyEdit's GRACE; ODEdit refines its codebook values"
    easyedit_alg, editing_hparams = "GRACE", "GraceHyperParams"  # main's multimodal GRACE reuses the text class
    ATTRIBUTE = "values"

    def enter_refinement(self, model: nn.Module) -> None:
        """GRACE reads its query at one position, ``key_id`` (the edit's last prompt token, counted
        from the start of the edit's own sequence). ODEdit's rows are left-padded into one batch, so
        during refinement the same token is addressed from the end, where it sits in every row with
        the edit's target."""
        grace = self.module(model)
        n_target = len(self.tokenizer(self.request["target"], add_special_tokens=False)["input_ids"])
        self._key_id, grace.key_id = grace.key_id, -(n_target + 1)

    def finalize(self, adapter) -> None:
        key_id, self._key_id = getattr(self, "_key_id", None), None
        if key_id is not None:
            self.module(adapter.hf_model).key_id = key_id


@register_host
class EasyEditLoRAHost(EasyEditAdapterHost):
    """EasyEdit's LoRA wraps the model with ``get_peft_model`` (its adapters stay in the model until
    restore, as with EasyEdit's own editor), switches on gradient checkpointing and input gradients,
    turns the KV cache off and casts the model to float32: restore undoes all of it."""

    name, aliases, note = "EasyEdit-LoRA", ("EASYEDIT-LORA", "EASYEDIT_LORA"), "EasyEdit's LoRA; ODEdit refines its adapters"
    easyedit_alg, editing_hparams, lr_field = "LoRA", "LoRAMultimodalHyperParams", "lr"

    def run_host(self, adapter, tok, view: dict, rows=(), undo: Optional[list] = None) -> None:
        model, _ = _native_model(adapter, self.name)
        self._check_targets(model)
        self.dtype = next(model.parameters()).dtype
        super().run_host(adapter, tok, view, rows, undo)
        if next(model.parameters()).dtype != self.dtype:
            model.to(self.dtype)  # ODEdit's rows (embedded before the host) and the user's model keep their dtype

    def _check_targets(self, model: nn.Module) -> None:
        config = LoraConfig(target_modules=self.hparams.target_modules)
        if not any(check_target_module_exists(config, n) for n, m in model.named_modules() if isinstance(m, nn.Linear)):
            raise ODEditError("host_hparams.target_modules", self.hparams.target_modules,
                              "give module-name suffixes (e.g. [q_proj, v_proj]) or one regular expression string; "
                              "peft reads `*` inside a list literally", problem="matches no linear layer of the model")

    def undo_action(self, model: nn.Module, snapshot: Snapshot) -> Callable[[], None]:
        use_cache = getattr(model.config, "use_cache", None)
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
        dtype = next(model.parameters()).dtype

        def undo():
            if hasattr(model, "_require_grads_hook") and "_require_grads_hook" not in snapshot.attributes:
                model.disable_input_require_grads()
            if not checkpointing and getattr(model, "is_gradient_checkpointing", False):
                model.gradient_checkpointing_disable()
            model.config.use_cache = use_cache
            snapshot.undo(model)
            model.to(dtype)

        return undo

    def declared(self, model: nn.Module) -> List[nn.Parameter]:
        peft_model = self.returned[0] if isinstance(self.returned, tuple) else None
        if peft_model is None:
            return []
        return [p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
