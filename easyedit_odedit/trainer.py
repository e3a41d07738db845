"""ODEdit in EasyEdit's meta-training (MEND, SERAC): ``alg: ODEdit`` in a training YAML.

EasyEdit's ``BaseTrainer`` builds ``ALG_TRAIN_DICT[config.alg.upper()](model, config, ctor)``:
``ODEditTrainable`` builds the host's own trainable (``MEND``, ``SERAC_MULTI``) there, unchanged.
``ODEditMultimodalTrainer`` subclasses EasyEdit's ``MultimodalTrainer`` and *extends* its
objective: EasyEdit's host losses (cedit * l_edit + iedit * l_image_edit + cloc * (l_loc +
l_image_loc)) stay exactly as EasyEdit computes them, and ODEdit adds, in the same backward pass,
the reliability NLL on the edit prompt, the generality MMD between the edited model's hidden states
of edit and rephrase prompts, and the learned-multiplier TV penalty over the five environments
(edit_inner, edit_outer, edit_outer_image, loc, loc_image). Training-time use of the train split's
rephrases is legitimate: this is meta-training, not the edit of an evaluated record.

With ``environments.meta_training_rows`` (MEND, probes named), MEND also meets each training edit's
content environments (``ContentRows``): the near misses the edit must not reach and the same-content images
it must carry to, mined from the train-split pool as at edit time, in two more environments.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Dict, List, Optional

import torch

from . import compat
from . import penalty as tv
from . import risks
from .environments import VQA_TEMPLATE, Row, pool_image
from .odedit.odedit_main import edit_seed
from .odedit.rows import build_rows, image_processor
from .pool_index_store import tensor_digest

ENVS = ("edit_inner", "edit_outer", "edit_outer_image", "loc", "loc_image")
CONTENT_ENVS = {"OUT_near": "near_miss", "SE_content": "same_content"}  # edit-time group -> environment
VIEWS = "odedit_views"  # the batch key the train loader adds: each training edit's prompt, target and image


class ODEditTrainable:
    """``ALG_TRAIN_DICT['ODEDIT']``: the host's trainable, built with the ODEdit config (which
    delegates every attribute the host reads to the host's hparams)."""

    def __new__(cls, model, config, model_constructor):
        host_alg = config.host_params_alg
        host_cls = compat.alg_train_dict()[host_alg]
        return host_cls(model, config, model_constructor)


class _RecordingModel:
    """Wraps the edited model EasyEdit's ``edit_step`` evaluates, keeping each output by the
    sub-batch it was computed on, so ODEdit's terms reuse EasyEdit's forward passes."""

    def __init__(self, edited):
        self._edited, self.outputs = edited, {}

    def __call__(self, batch, *args, **kwargs):
        out = self._edited(batch, *args, **kwargs)
        self.outputs[id(batch)] = out
        return out

    def __getattr__(self, name):
        return getattr(self._edited, name)


class ODEditMultimodalTrainer:
    """Mixed into EasyEdit's ``MultimodalTrainer`` for ``alg: ODEdit`` (see ``make_trainer_class``)."""

    def _odedit_setup(self):
        hp = self.config
        self._odedit_step = 0
        self._multiplier = tv.LagrangeMultiplier(hp.penalty.lambda_hidden, hp.penalty.lambda_init,
                                                 hp.penalty.lambda_max, int(hp.seed))
        self._odedit_logs: Dict[str, float] = {}
        self._warned_nonfinite = False

    def edit_step(self, batch, training: bool):
        if not hasattr(self, "_odedit_step"):
            self._odedit_setup()
        recorder = {}
        host_edit = self.model.edit

        def edit(*args, **kwargs):
            edited, info = host_edit(*args, **kwargs)
            recorder["model"] = _RecordingModel(edited)
            return recorder["model"], info

        trainer_module = compat.module("trainer.MultimodalTrainer")
        host_backward = trainer_module.safe_backward

        def safe_backward(loss, params, accumulate=1, allow_unused=False):
            loss = loss + self._odedit_terms(batch, recorder["model"])
            return host_backward(loss, params, accumulate, allow_unused=allow_unused)

        with _patched(self.model, "edit", edit), _patched(trainer_module, "safe_backward", safe_backward):
            l_total, l_edit, l_loc, l_base, info = super().edit_step(batch, training)
        if not training and "model" in recorder:
            with torch.no_grad():
                self._odedit_terms(batch, recorder["model"], dual=False)
        info.update(self._odedit_logs)
        self._odedit_step += int(training)
        return l_total, l_edit, l_loc, l_base, info

    def _odedit_terms(self, batch, edited: "_RecordingModel", dual: bool = True) -> torch.Tensor:
        hp = self.config
        out = {env: edited.outputs[id(batch[env])] for env in ENVS if id(batch[env]) in edited.outputs}
        scale = tv.omega().to(out["edit_inner"].logits.device)
        with torch.no_grad():
            base = {env: self.model(batch[env]) for env in ("loc", "loc_image")}
        env_risks = {env: risks.reliability_nll(scale * out[env].logits, out[env].labels)
                     for env in ("edit_inner", "edit_outer", "edit_outer_image") if env in out}
        for env in ("loc", "loc_image"):
            if env in out:
                env_risks[env] = _kl_to_unedited(scale, out[env], base[env], hp.risks.kl_direction)
        env_risks.update(self._content_risks(batch, edited, scale) if dual else {})
        z_e = _prompt_features(out["edit_inner"])
        z_r = torch.cat([_prompt_features(out[e]) for e in ("edit_outer", "edit_outer_image") if e in out])
        # logged either way; in the loss (and its graph) only with a weight: 0 * NaN would be NaN
        with torch.set_grad_enabled(bool(hp.risks.gen_weight) and torch.is_grad_enabled()):
            r_gen = risks.generality_mmd(z_e.detach() if hp.risks.mmd_detach_edit else z_e, z_r, hp.risks.mmd_bandwidths)
        weight = hp.penalty.weight if self._odedit_step >= hp.penalty.warmup_steps else 0.0
        if self._odedit_step == hp.penalty.warmup_steps and weight > 0 and dual:
            self.opt.state.clear()  # the loss scale jumps: stale Adam moments mislead (DomainBed's IRM)
        penalty = tv.tv_penalty(list(env_risks.values()), scale) if weight > 0 else scale * 0.0
        lam = self._multiplier(out["edit_inner"].hidden_states.mean((0, 1)))
        gen_term = hp.risks.gen_weight * r_gen if hp.risks.gen_weight else 0.0
        extra = hp.host_params.cedit * env_risks["edit_inner"] + gen_term + weight * lam.detach() * penalty
        # the content environments weighted as EasyEdit weighs its own edit and locality losses
        if "near_miss" in env_risks:
            extra = extra + hp.host_params.cloc * env_risks["near_miss"]
        if "same_content" in env_risks:
            extra = extra + hp.host_params.cedit * env_risks["same_content"]
        if dual and weight > 0:
            self._multiplier.ascend(lam, weight * (penalty.item() - hp.penalty.tv_tolerance), hp.penalty.dual_lr)
        if dual and not self._warned_nonfinite and not torch.isfinite(extra).item():
            self._warned_nonfinite = True  # EasyEdit logs each skipped step at INFO level only
            warnings.warn(f"ODEdit's meta-training terms are not finite at step {self._odedit_step}: EasyEdit skips "
                          "every step whose gradient is not finite, so nothing trains while this lasts; lower the "
                          "learning rate or penalty.weight", RuntimeWarning, stacklevel=2)
        self._odedit_logs = {"odedit/rel_nll": env_risks["edit_inner"].item(), "odedit/gen_mmd": r_gen.item(),
                             "odedit/tv": penalty.item(), "odedit/lambda": lam.item(),
                             **{f"odedit/{env}": env_risks[env].item() for env in CONTENT_ENVS.values() if env in env_risks}}
        return extra

    def _content_risks(self, batch, edited: "_RecordingModel", scale: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The training edits' content rows in one forward pass of the edited model, sliced per
        environment: KL to the unedited model on the near misses, the target's NLL on the
        same-content images. Training batches only (the train loader adds the views)."""
        content: Optional[ContentRows] = getattr(self, "_content_rows", None)
        if content is None or VIEWS not in batch:
            return {}
        rows = content.rows(batch[VIEWS])
        if not rows:  # the probes told no image from another
            return {}
        samples = content.samples(rows)
        post = edited(samples)
        with torch.no_grad():
            pre = self.model(samples)
        env_risks = {}
        for group, env in CONTENT_ENVS.items():
            pick = torch.tensor([r.env == group for r in rows], device=post.logits.device)
            if not pick.any():
                continue
            if group == "OUT_near":
                env_risks[env] = _kl_to_unedited(scale, _rows_of(post, pick), _rows_of(pre, pick),
                                                 self.config.risks.kl_direction)
            else:
                env_risks[env] = risks.reliability_nll(scale * post.logits[pick], post.labels[pick])
        return env_risks


class ContentRows:
    """A training edit's content environments, as the edit-time miner builds them (``build_rows``):
    near misses (pool images showing part of what the edit image shows, asked a question alike the
    edit's; target: the unedited model's answer) and same-content images (target: the edit's).

    Mined once per train record: MEND trains its gradient network, never the base model
    (``train_base: false``), so a record's rows stay the same every time it is drawn. Kept as text
    and image paths (a dataset's worth of images would not fit); the images come back from the
    pool's bounded cache. MEND only: SERAC's scope classifier and counterfactual model read the
    text alone, and a near miss asks the edit's own question on another image."""

    def __init__(self, adapter, hparams):
        self.adapter, self.hparams = adapter, hparams
        self.processor = image_processor(hparams)
        self._mined: Dict[tuple, List[Row]] = {}

    def rows(self, views: List[dict]) -> List[Row]:
        return [dataclasses.replace(r, image=self._image(r, view)) for view in views for r in self._of(view)]

    def _image(self, row: Row, view: dict) -> torch.Tensor:
        if row.source is None:  # the edit image itself
            return view["image"]
        return pool_image(row.source, self.processor, self.adapter.image_size)

    def _of(self, view: dict) -> List[Row]:
        key = (view["prompt"], view["target"], tensor_digest(view["image"]))
        if key not in self._mined:
            self._mined[key] = [dataclasses.replace(r, image=None) for r in self._mine(view)]
        return self._mined[key]

    def _mine(self, view: dict) -> List[Row]:
        env, adapter = self.hparams.environments, self.adapter
        was_training = adapter.training
        adapter.eval()  # the unedited model's answers, as at edit time
        try:
            with torch.no_grad(), adapter.reusing_image_encodings():
                rows = build_rows(adapter, view, self.hparams, edit_seed(self.hparams, view))
        finally:
            adapter.train(was_training)
        return ([r for r in rows if r.env == "OUT_near"][:env.near_miss_rows]
                + [r for r in rows if r.env == "SE_content"][:env.same_content_rows])

    def samples(self, rows: List[Row]) -> dict:
        """The rows as EasyEdit's sample dict (its prompt counts as the adapter reads them)."""
        special = self.adapter.prompts_len_counts_special_tokens
        tokenizer = self.adapter.tokenizer
        return {"text_input": [f"{r.prompt} {r.target}" for r in rows], "image": [r.image for r in rows],
                "prompts_len": [len(tokenizer(r.prompt, add_special_tokens=special)["input_ids"]) for r in rows],
                "labels": None}


def _kl_to_unedited(scale: torch.Tensor, post, pre, direction: str) -> torch.Tensor:
    """KL between the edited and the unedited model at every attended position of the rows."""
    mask = post.attention_mask.bool()
    pre_log_probs = torch.log_softmax(pre.logits.float(), -1)[mask]
    return risks.locality_kl(scale * post.logits[mask], pre_log_probs, direction)


def _rows_of(output, pick: torch.Tensor):
    """The chosen rows of an adapter output (logits, labels and mask)."""
    return type(output)(logits=output.logits[pick], labels=output.labels[pick], attention_mask=output.attention_mask[pick])


def _prompt_features(output) -> torch.Tensor:
    """Last hidden state at the position that predicts the first answer token, per row."""
    first = risks.answer_positions(output.labels).float().argmax(-1)
    return output.hidden_states[torch.arange(first.shape[0]), first].float()


@contextlib.contextmanager
def _patched(owner, name, value):
    """Swap an attribute for the duration of one ``edit_step`` call (instance or module)."""
    had = name in vars(owner)
    previous = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, previous)
        else:
            delattr(owner, name)


def adopt(trainer) -> None:
    """Give a trainer EasyEdit built for ``alg: ODEdit`` ODEdit's ``edit_step`` (a subclass of the
    trainer's own class, so everything else stays EasyEdit's)."""
    if str(getattr(trainer.config, "alg", "")).upper() != "ODEDIT" or isinstance(trainer, ODEditMultimodalTrainer):
        return
    trainer.__class__ = type("ODEditMultimodalTrainer", (ODEditMultimodalTrainer, type(trainer)), {})
    config = trainer.config
    if config.environments.meta_training_rows:  # MEND with probes (checked when the YAML is read)
        trainer._content_rows = ContentRows(trainer.model.model, config)
        trainer.train_loader.collate_fn = _adding_views(trainer.train_loader.collate_fn, trainer.train_set)


def _adding_views(collate, dataset):
    """The train loader's collate, adding each edit's view under ``VIEWS``: the prompt as the dataset
    shows it to the model, the target, the image. EasyEdit's batches carry only tokenised text."""
    template = getattr(dataset, "prompt", VQA_TEMPLATE)

    def collate_with_views(items):
        batch = collate(items)
        batch[VIEWS] = [{"prompt": template.format(item["prompt"]).strip(), "target": item["target"],
                         "image": item["image"]} for item in items]
        return batch

    return collate_with_views
