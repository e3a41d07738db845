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
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict

import torch

from . import compat
from . import penalty as tv
from . import risks

ENVS = ("edit_inner", "edit_outer", "edit_outer_image", "loc", "loc_image")


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
            loss = loss + self._odedit_terms(batch, recorder["model"].outputs)
            return host_backward(loss, params, accumulate, allow_unused=allow_unused)

        with _patched(self.model, "edit", edit), _patched(trainer_module, "safe_backward", safe_backward):
            l_total, l_edit, l_loc, l_base, info = super().edit_step(batch, training)
        if not training and "model" in recorder:
            with torch.no_grad():
                self._odedit_terms(batch, recorder["model"].outputs, dual=False)
        info.update(self._odedit_logs)
        self._odedit_step += int(training)
        return l_total, l_edit, l_loc, l_base, info

    def _odedit_terms(self, batch, outputs, dual: bool = True) -> torch.Tensor:
        hp = self.config
        out = {env: outputs[id(batch[env])] for env in ENVS if id(batch[env]) in outputs}
        scale = tv.omega().to(out["edit_inner"].logits.device)
        with torch.no_grad():
            base = {env: self.model(batch[env]) for env in ("loc", "loc_image")}
        env_risks = {env: risks.reliability_nll(scale * out[env].logits, out[env].labels)
                     for env in ("edit_inner", "edit_outer", "edit_outer_image") if env in out}
        for env in ("loc", "loc_image"):
            if env in out:
                mask = out[env].attention_mask.bool()
                pre = torch.log_softmax(base[env].logits.float(), -1)[mask]
                env_risks[env] = risks.locality_kl(scale * out[env].logits[mask], pre, hp.risks.kl_direction)
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
        if dual and weight > 0:
            self._multiplier.ascend(lam, weight * (penalty.item() - hp.penalty.tv_tolerance), hp.penalty.dual_lr)
        if dual and not self._warned_nonfinite and not torch.isfinite(extra).item():
            self._warned_nonfinite = True  # EasyEdit logs each skipped step at INFO level only
            warnings.warn(f"ODEdit's meta-training terms are not finite at step {self._odedit_step}: EasyEdit skips "
                          "every step whose gradient is not finite, so nothing trains while this lasts; lower the "
                          "learning rate or penalty.weight", RuntimeWarning, stacklevel=2)
        self._odedit_logs = {"odedit/rel_nll": env_risks["edit_inner"].item(), "odedit/gen_mmd": r_gen.item(),
                             "odedit/tv": penalty.item(), "odedit/lambda": lam.item()}
        return extra


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
