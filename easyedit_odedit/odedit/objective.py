"""The ODEdit objective as one short ``update`` per step (DomainBed's shape).

Every environment row of the step goes through the model in one forward and one backward pass (the
rows with an image and the text rows as two padded batches); the logits are sliced per environment;
risk + annealed, learned-multiplier TV penalty; the optimiser is reset when the penalty switches on;
a dict of floats comes back.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, NamedTuple, Optional, Union

import torch

from .. import penalty as tv
from .. import risks
from ..environments import Row
from ..errors import ODEditError, ODEditNumericalError
from ..models.adapter import EmbeddedBatch, MultimodalLMAdapter
from ..prefix_cache import (LastModuleCache, PrefixCache, decoder_layers, edited_submodule, final_norm_of,
                            lowest_edited_layer)
from .selection import BestIterate

Cache = Union[PrefixCache, LastModuleCache]

SE_ENVS = ("SE_text", "SE_image", "SE_joint", "SE_content")
KEEP_ENVS = SE_ENVS + ("IN_past",)  # must give their targets: the SE rows, and a sequence's earlier edits
OUT_ENVS = ("OUT_text", "OUT_near", "OUT_far", "OUT_past", "OUT_protect", "OUT_spill")


class EditRows:
    """The per-edit pool of rows, embedded once, with the unedited model's OUT distributions.

    Rows are left-padded, so every position any risk reads lies in the last ``tail`` columns; the
    decoder's output is cut to those, and the LM head runs on the positions read only. The one full
    pass over the unedited model also fills the prefix cache, when there is one."""

    def __init__(self, adapter: MultimodalLMAdapter, rows: List[Row], kl_positions: str,
                 cache: Optional[Cache] = None, reference=None):
        """``reference``: a context in which the model holds the weights OUT rows must keep (a
        sequence's start, ``restore.at_sequence_start``); default the weights as they are."""
        self.adapter, self.rows = adapter, rows
        self.texts = [f"{r.prompt} {r.target}" for r in rows]
        self.prompts_len = [len(adapter.tokenizer(r.prompt)["input_ids"]) for r in rows]
        self.images = [r.image for r in rows]
        self.envs = [r.env for r in rows]
        with torch.no_grad():
            self.embedded = self.embed(range(len(rows)))
            self.compare_mask = self._compare_mask(self.embedded, kl_positions)
            read = self.compare_mask | risks.answer_positions(self.embedded.labels)
            width = read.shape[1]
            self.tail = width - int(read.any(0).float().argmax())
            self.cache = cache
            self.with_image = torch.tensor([image is not None for image in self.images], device=self.embedded.labels.device)
            hidden = self._capture()
            if reference is not None:
                with reference():
                    hidden = self.unedited_pass(self.embed(range(len(rows))))
            # the unedited log-probs at every compared position of an OUT row, flat, and where each lies
            self.is_out = torch.tensor([e in OUT_ENVS for e in self.envs], device=hidden.device)
            self.compare_tail = self.compare_mask[:, -self.tail:] & self.is_out[:, None]
            self.pre_log_probs = torch.log_softmax(adapter.lm_head()(hidden[self.compare_tail]).float(), -1)
        self.pre_index = torch.full(self.compare_tail.shape, -1, dtype=torch.long, device=hidden.device)
        self.pre_index[self.compare_tail] = torch.arange(len(self.pre_log_probs), device=hidden.device)

    def _capture(self) -> torch.Tensor:
        """The one full pass over the unedited model (its last hidden states: the OUT references);
        it also fills the cache. A ``LastModuleCache`` whose structural check fails gives way to its
        layer-level fallback."""
        cache = self.cache
        hidden = self.unedited_pass(self.embedded, cache)
        if isinstance(cache, LastModuleCache):
            def run_full(rows):
                return self.adapter.decode_hidden(_select(self.embedded, rows), self.tail)

            if not cache.verify(run_full, self.tail):
                self.cache = cache.fallback
                if self.cache is not None:
                    self.unedited_pass(self.embedded, self.cache)
        return hidden

    def unedited_pass(self, batch: EmbeddedBatch, cache: Optional[Cache] = None) -> torch.Tensor:
        """The last ``tail`` hidden states of every row of ``batch`` (and ``cache`` filled), run as
        one batch of the rows with an image and one of the rows without: in a single left-padded
        batch a text row of a few tokens would run at an image row's width (576 image positions on
        LLaVA), and most OUT rows are text rows. Padding never changes a row's result beyond float
        rounding, and each edit pools its rows the same way, so repeats stay bit-identical."""
        buckets = [rows for rows in (self.with_image, ~self.with_image) if rows.any()]
        if len(buckets) == 1:
            with cache.capturing(self.tail) if cache is not None else contextlib.nullcontext():
                return self.adapter.decode_hidden(batch, self.tail)
        hidden, captured = [], []
        for rows in buckets:
            with cache.capturing(self.tail) if cache is not None else contextlib.nullcontext():
                hidden.append(self.adapter.decode_hidden(_rows_of(batch, rows, self.tail), self.tail))
            if cache is not None:
                captured.append(cache.captured())
        order = torch.argsort(torch.cat([rows.nonzero()[:, 0] for rows in buckets]))  # back to the rows' order
        if cache is not None:
            cache.load_captured(tuple(_merged(parts, order) for parts in zip(*captured)))
        return _merged(hidden, order)

    def unedited_at(self, rows: torch.Tensor, width: int):
        """Where the chosen rows' OUT positions lie in their last ``width`` columns, and the unedited
        model's log-probs there (one row per position, in mask order)."""
        at = self.compare_tail[rows][:, -width:]
        return at, self.pre_log_probs[self.pre_index[rows][:, -width:][at]]

    def embed(self, idx) -> EmbeddedBatch:
        idx = list(idx)
        return self.adapter.embed([self.texts[i] for i in idx], [self.images[i] for i in idx],
                                  [self.prompts_len[i] for i in idx])

    @staticmethod
    def _compare_mask(batch: EmbeddedBatch, kl_positions: str) -> torch.Tensor:
        if kl_positions == "all":
            return batch.attention_mask.bool()
        return risks.answer_positions(batch.labels)


def make_prefix_cache(adapter: MultimodalLMAdapter, edited: List[str], hp) -> Optional[Cache]:
    """A cache of what the edit cannot change, when every edited parameter lies in the decoder's
    layer stack (and caching is on): the activations below the lowest edited layer, or - when the
    edit is confined to one module of the last layer, like FT-L's and LoRA's top MLP - that
    module's input and the residual around it at the positions the risks read."""
    if not hp.optimiser.cache_prefix or needs_reembedding(adapter, edited):
        return None
    try:
        path, layers = decoder_layers(adapter.language_model)
    except LookupError:
        return None
    k = lowest_edited_layer(edited, path)
    layer_cache = PrefixCache(layers, k) if k else None
    child = edited_submodule(edited, path, len(layers))
    norm = final_norm_of(adapter.text_decoder())
    if child is not None and norm is not None:
        return LastModuleCache(layers[-1].get_submodule(child), layers[-1], norm, fallback=layer_cache)
    return layer_cache


def needs_reembedding(adapter: MultimodalLMAdapter, edited) -> bool:
    """True when an edited parameter acts before the decoder's first layer (image encoder,
    projector, token embeddings): then the decoder's inputs change during the edit. Decided by
    where the parameter lives, not by its name (LLaVA's projector sits under ``language_model``)."""
    lm = adapter.language_model
    if not _has_parts(lm):
        # a view whose names already say where a parameter acts (models/hf_native.py)
        return any(not k.startswith("language_model.") or "embed_tokens" in k for k in edited)
    decoder = lm.get_decoder()
    after = {id(p) for p in decoder.parameters()} | {id(p) for p in lm.get_output_embeddings().parameters()}
    after -= {id(p) for p in lm.get_input_embeddings().parameters()}
    named = dict(adapter.named_parameters())
    return any(id(named[k]) not in after for k in edited if k in named)


def acts_on_images_only(adapter: MultimodalLMAdapter, edited) -> bool:
    """True when every edited parameter lies on the image path (image encoder, projector): a row
    without an image then reads none of them (token embeddings, decoder, LM head), and gives the
    same hidden states at every step of the edit (FT-V)."""
    lm = adapter.language_model
    if not _has_parts(lm):
        return all(not k.startswith("language_model.") for k in edited)
    text_path = {id(p) for part in (lm.get_input_embeddings(), lm.get_decoder(), lm.get_output_embeddings())
                 for p in part.parameters()}
    named = dict(adapter.named_parameters())
    return all(k in named and id(named[k]) not in text_path for k in edited)


def _has_parts(lm) -> bool:
    return all(hasattr(lm, m) for m in ("get_decoder", "get_input_embeddings", "get_output_embeddings"))


def _select(batch: EmbeddedBatch, idx: torch.Tensor) -> EmbeddedBatch:
    return EmbeddedBatch(batch.inputs_embeds[idx], batch.attention_mask[idx], batch.position_ids[idx], batch.labels[idx])


def _rows_of(batch: EmbeddedBatch, rows: torch.Tensor, tail: int) -> EmbeddedBatch:
    """The chosen rows of ``batch`` without the leading columns that are padding in every one of
    them (left padding: the position ids of the rest stay as they were), keeping at least the last
    ``tail``."""
    chosen = _select(batch, rows)
    keep = max(int(chosen.attention_mask.sum(1).max()), tail)
    return EmbeddedBatch(chosen.inputs_embeds[:, -keep:], chosen.attention_mask[:, -keep:],
                         chosen.position_ids[..., -keep:], chosen.labels[:, -keep:])  # [B, L] or [B, 3, L]


def _merged(parts, order: torch.Tensor, width: Optional[int] = None) -> Optional[torch.Tensor]:
    """One tensor from the parts of several passes over rows run apart, each part right-aligned to
    ``width`` (default the widest: the batch's width, or the tail) and the rows put back in
    ``order``; None where a pass kept nothing (a ``LastModuleCache`` on a module that returns no
    tensor, which its check then rejects)."""
    if any(t is None for t in parts):
        return None
    width = width or max(t.shape[1] for t in parts)
    return torch.cat([_left_padded(t, width) for t in parts])[order]


def _left_padded(t: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, w, ...] right-aligned in [rows, width, ...] (zeros where a row is padding)."""
    if t.shape[1] == width:
        return t
    out = t.new_zeros((t.shape[0], width, *t.shape[2:]))
    out[:, width - t.shape[1]:] = t
    return out


class ODEditObjective:
    """Primal-dual optimisation of G = R_rel + R_se + R_loc + R_gen + w * lambda * TV (Eq. 11-13)."""

    def __init__(self, adapter: MultimodalLMAdapter, edit_rows: EditRows, params: Dict[str, torch.nn.Parameter],
                 hp, lr: float, optimizer: str = "Adam", use_odedit: bool = True, seed: int = 0):
        self.adapter, self.rows, self.params, self.hp = adapter, edit_rows, params, hp
        self.use_odedit, self.lr, self.optimizer_name = use_odedit, lr, optimizer
        self.originals = {k: p.detach().clone() for k, p in params.items()}
        self.optimizer = self._new_optimizer()
        self.multiplier = tv.LagrangeMultiplier(hp.penalty.lambda_hidden, hp.penalty.lambda_init,
                                                hp.penalty.lambda_max, seed)
        self.reembed = needs_reembedding(adapter, params)
        self.cache = edit_rows.cache
        # rows the edit cannot reach run once, not at every step (FT-V: every text row)
        reaches_text = not (self.reembed and acts_on_images_only(adapter, params))
        self.kind = ["image" if image is not None else "text" if reaches_text else "fixed"
                     for image in edit_rows.images]
        self.fixed_hidden = self._fixed_hidden() if "fixed" in self.kind else None
        self.step = 0
        self.best = BestIterate(params, by_checks=use_odedit and hp.constraints.enabled)
        self.group_weight = {"SE": 1.0, "OUT": 1.0}  # raised while a group's constraint is violated

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return getattr(torch.optim, self.optimizer_name)(list(self.params.values()), lr=self.lr)

    # -- one forward pass over every environment row of the step ------------------------------
    def forward(self, idx: List[int]):
        """The chosen rows' labels and the decoder's hidden states, both at the last ``tail``
        positions."""
        rows = torch.tensor(idx, device=self.rows.embedded.inputs_embeds.device)
        tail = self.rows.tail
        if isinstance(self.cache, LastModuleCache):  # the last positions only: a row's width costs nothing
            hidden = self.cache.hidden_states(self.adapter, batch=None, rows=rows, tail=tail)
        else:
            hidden = self._by_kind(idx, rows, tail)
        return self.rows.embedded.labels[rows][:, -tail:], hidden

    def _by_kind(self, idx: List[int], rows: torch.Tensor, tail: int) -> torch.Tensor:
        """The chosen rows as one batch of the rows with an image and one of the text rows, each
        only as wide as its widest row (as the unedited pass runs them: a text row padded to an
        image row's width costs as much as one); fixed rows from ``_fixed_hidden``."""
        at: Dict[str, List[int]] = {}
        for j, i in enumerate(idx):
            at.setdefault(self.kind[i], []).append(j)
        parts = [self.fixed_hidden[rows[js]] if kind == "fixed" else self._run([idx[j] for j in js], rows[js], tail)
                 for kind, js in at.items()]
        if len(parts) == 1:
            return _left_padded(parts[0], tail)
        order = torch.argsort(torch.tensor([j for js in at.values() for j in js], device=rows.device))
        return _merged(parts, order, tail)  # back to the rows' order, as the unedited pass merges its two

    def _run(self, idx: List[int], rows: torch.Tensor, tail: int) -> torch.Tensor:
        """[rows, at most tail, hidden] of rows of one kind, through the edited part of the model;
        embedded again when the edit changes the decoder's inputs."""
        batch = self.rows.embed(idx) if self.reembed else _rows_of(self.rows.embedded, rows, tail)
        if self.cache is not None:
            return self.cache.hidden_states(self.adapter, batch, rows, tail)
        return self.adapter.decode_hidden(batch, tail)

    @torch.no_grad()
    def _fixed_hidden(self) -> torch.Tensor:
        """[rows, tail, hidden]: the fixed rows' last hidden states (zeros elsewhere), run once as
        the unedited pass runs its text rows, but at the weights the steps start from (a refine
        host may have moved weights since that pass)."""
        fixed = torch.tensor([k == "fixed" for k in self.kind], device=self.rows.embedded.inputs_embeds.device)
        tail = self.rows.tail
        hidden = self.adapter.decode_hidden(_rows_of(self.rows.embedded, fixed, tail), tail)
        out = hidden.new_zeros((len(self.kind), tail, hidden.shape[-1]))
        out[fixed] = _left_padded(hidden, tail)
        return out

    def read(self, rows: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor) -> "Read":
        """The LM head at the positions a risk reads, and nowhere else (with a 32k vocabulary it is
        most of a step): on IN/SE rows each position that predicts a target token, on OUT rows each
        compared position, with the unedited model's log-probs there."""
        width = hidden.shape[1]  # the last ``tail`` columns: rows are left-padded, so they align right
        nll_at = risks.answer_positions(labels) & ~self.rows.is_out[rows][:, None]
        kl_at, pre = self.rows.unedited_at(rows, width)
        logits = self.adapter.lm_head()(torch.cat([hidden[nll_at], hidden[kl_at]]))
        targets = labels[:, 1:][nll_at[:, :-1]]  # answer_positions never marks the last column
        return Read(logits, targets, pre, nll_at, kl_at)

    def risks(self, group: torch.Tensor, n_groups: int, read: "Read"):
        """Each environment's risk - the NLL of the target on IN/SE rows, the KL to the unedited
        model on OUT rows - and its gradient in the classifier scale omega (the TV penalty's g_e),
        from every compared position at once; ``group`` is each row's environment. Two [n_groups]."""
        position_group = torch.cat([group[:, None].expand_as(read.nll_at)[read.nll_at],
                                    group[:, None].expand_as(read.kl_at)[read.kl_at]])
        if not self.use_odedit:  # the host alone: its own rows' NLL (no OUT rows)
            values = torch.nn.functional.cross_entropy(read.nll_logits.float(), read.targets, reduction="none")
            return risks.segment_mean(values, position_group, n_groups), None
        values, omega_grads = tv.risks_and_omega_gradients(read.logits, read.targets, read.pre,
                                                          self.hp.risks.kl_direction)
        env_risk, env_omega_grad = risks.segment_mean(torch.stack([values, omega_grads], 1), position_group,
                                                      n_groups).unbind(1)
        return env_risk, env_omega_grad

    def mmd_features(self, labels: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        answer = risks.answer_positions(labels)
        if self.hp.risks.mmd_feature == "answer_mean":
            weights = answer.float() / answer.float().sum(-1, keepdim=True).clamp(min=1)
            return (hidden.float() * weights.unsqueeze(-1)).sum(1)
        first = answer.float().argmax(-1)  # the last prompt token predicts the first answer token
        return hidden[torch.arange(hidden.shape[0]), first].float()

    def evaluate(self, idx: List[int]) -> "Evaluated":
        """G at the current parameters over the chosen rows (Eq. 11-12), with its terms."""
        hp = self.hp
        envs = [self.rows.envs[i] for i in idx]
        groups = list(dict.fromkeys(envs))  # the environments present in this step
        device = self.rows.embedded.inputs_embeds.device
        group = torch.tensor([groups.index(e) for e in envs], device=device)
        labels, hidden = self.forward(idx)
        read = self.read(torch.tensor(idx, device=device), labels, hidden)
        env_risk, env_omega_grad = self.risks(group, len(groups), read)
        r_rel = env_risk[groups.index("IN")]
        terms = {"rel_nll": r_rel}
        if not self.use_odedit:
            return Evaluated(r_rel, terms, None, None, 0.0, read, envs)
        r_se = _mean(env_risk, [i for i, g in enumerate(groups) if g in KEEP_ENVS])
        r_loc = _mean(env_risk, [i for i, g in enumerate(groups) if g in OUT_ENVS])
        feats = self.mmd_features(labels, hidden)
        z_e = feats[[j for j, e in enumerate(envs) if e == "IN"]]
        z_r = feats[[j for j, e in enumerate(envs) if e in SE_ENVS]]
        r_gen = risks.generality_mmd(z_e.detach() if hp.risks.mmd_detach_edit else z_e, z_r, hp.risks.mmd_bandwidths)
        w = self.group_weight
        r_edit = (r_rel + w["SE"] * hp.risks.se_nll_weight * r_se + w["OUT"] * hp.risks.loc_weight * r_loc
                  + hp.risks.gen_weight * r_gen)
        weight = hp.penalty.weight if self.step >= hp.penalty.warmup_steps else 0.0
        penalty = tv.tv_from_gradients(env_omega_grad) if weight > 0 else env_risk.new_zeros(())
        lam = self.multiplier(self._lambda_features(hidden, envs))
        objective = r_edit + weight * lam.detach() * penalty
        if hp.penalty.normalise:
            # the penalty's weight jumps from 0 to w * lambda: keep the gradient scale of the edit
            objective = objective / (1.0 + weight * lam.detach())
        terms.update(se_nll=r_se, loc_kl=r_loc, gen_mmd=r_gen, tv=penalty, lam=lam)
        return Evaluated(objective, terms, lam, penalty, weight, read, envs)

    def update(self, idx: List[int]) -> Dict[str, float]:
        hp = self.hp
        if self.use_odedit and self.step == hp.penalty.warmup_steps and hp.penalty.weight > 0:
            self.optimizer = self._new_optimizer()  # the loss scale jumps: stale Adam moments mislead
        g = self.evaluate(idx)
        terms = dict(g.terms, objective=g.objective)
        with torch.no_grad():  # one read-back a step (on a GPU each one waits for the device)
            values = torch.stack([*terms.values(), self._makes_edit(g)]).float().tolist()
        logs, makes_edit = dict(zip(terms, values[:-1])), bool(values[-1])
        if not math.isfinite(logs["objective"]):
            raise ODEditNumericalError(f"ODEdit objective is {logs['objective']} at step {self.step}; "
                                       "lower the learning rate or penalty.weight")
        self.best.offer_step(logs["objective"], makes_edit)
        dual = 0.0
        if g.weight > 0:  # the dual step rides on the same backward pass (see LagrangeMultiplier.dual_loss)
            dual = self.multiplier.dual_loss(g.lam, g.weight * (logs["tv"] - hp.penalty.tv_tolerance))
        self._descend(g.objective, dual)
        if g.weight > 0:
            self.multiplier.dual_step(hp.penalty.dual_lr)
        self.step += 1
        return logs

    @torch.no_grad()
    def constraints_hold(self) -> bool:
        """Over every row of the edit's pool (``constraints``): the IN row gives the target, the SE
        rows carry it, the OUT rows keep the unedited model's answers (and their mean KL is small).
        Each check is offered to the iterate selection; while a group is violated, its weight grows."""
        c = self.hp.constraints
        every_row = list(range(len(self.rows.rows)))
        rows = torch.tensor(every_row, device=self.rows.embedded.inputs_embeds.device)
        read = self.read(rows, *self.forward(every_row))
        gives_target, kept = read.gives_target(), read.keeps_answers()
        kl = risks.kl_per_position(read.kl_logits, read.pre, self.hp.risks.kl_direction)
        envs = self.rows.envs
        se = gives_target[[i for i, e in enumerate(envs) if e in KEEP_ENVS]].float()
        out = kept[[i for i, e in enumerate(envs) if e in OUT_ENVS]].float()
        se_share, out_share = (se.mean().item() if len(se) else 1.0), (out.mean().item() if len(out) else 1.0)
        holds = {"IN": bool(gives_target[envs.index("IN")]), "SE": se_share >= c.se_share,
                 "OUT": out_share >= c.out_share and (not len(kl) or kl.mean().item() <= c.out_kl)}
        self.best.offer_check(holds, se_share, out_share)
        if all(holds.values()):
            return True
        # SE pulls the same way as the edit; OUT only grows once the edit is made, or it would stop the edit
        for group in ("SE", "OUT") if holds["IN"] else ("SE",):
            if not holds[group]:
                self.group_weight[group] = min(self.group_weight[group] * c.growth, c.max_weight)
        return False

    @torch.no_grad()
    def start_from_better(self, before_host: Dict[str, torch.Tensor]) -> bool:
        """Refine family: start from the host's solution or from the weights before the host ran,
        whichever has the lower objective over every row of the edit's pool. A host's proposal that
        makes the edit's own objective worse than no edit at all (a meta-trained MEND can, on inputs
        unlike its training edits: the target barely moves while every OUT row does) is a worse
        starting point than none. Training rows only; True when the earlier weights were taken."""
        every_row = list(range(len(self.rows.rows)))
        at_host = self.evaluate(every_row).objective.item()
        host_solution = {k: p.detach().clone() for k, p in self.params.items()}
        self._load(before_host)
        if self.evaluate(every_row).objective.item() < at_host:
            self.originals = dict(before_host)  # lambda's delta-norm features count from here
            return True
        self._load(host_solution)
        return False

    @staticmethod
    @torch.no_grad()
    def _makes_edit(g: "Evaluated") -> torch.Tensor:
        """Whether every target token of the IN row is the argmax (a 0-dim tensor, read with the logs)."""
        return g.read.gives_target()[g.envs.index("IN")]

    def finish(self) -> None:
        """End with the chosen iterate (``selection.BestIterate``)."""
        self.best.load()

    @torch.no_grad()
    def _load(self, values: Dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.params[name].copy_(value)

    def _lambda_features(self, hidden, envs) -> torch.Tensor:
        kind = self.hp.penalty.lambda_input
        if kind == "delta_norms":
            return tv.delta_norm_features(self.params, self.originals)
        if kind == "edit_hidden":
            return hidden[envs.index("IN")].mean(0)
        return hidden.new_ones(1)

    def _descend(self, objective: torch.Tensor, dual=0.0) -> None:
        """One backward pass and step (the objective's value was checked where it was read)."""
        if not objective.requires_grad:
            raise ODEditError("host_hparams", sorted(self.params)[:3], "edit parameters the request goes through "
                              "(FT-V and the projector need a request with an image; FT-L/LoRA edit the language "
                              "model)", problem="selects parameters that do not affect this request")
        self.optimizer.zero_grad(set_to_none=True)
        (objective + dual).backward()
        # the total norm says whether any gradient is non-finite (and clips, when asked)
        clip = self.hp.optimiser.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip if clip > 0 else float("inf"))
        if not torch.isfinite(norm):
            raise ODEditNumericalError(f"non-finite gradient at step {self.step}; lower the learning rate")
        self.optimizer.step()


class Read(NamedTuple):
    """The logits of the positions a step reads: first every NLL position (IN/SE rows, in row-major
    order of ``nll_at``, predicting ``targets``), then every KL position (OUT rows, ``kl_at``,
    unedited log-probs ``pre``). The masks cover the step's rows and their last columns."""
    logits: torch.Tensor
    targets: torch.Tensor
    pre: torch.Tensor
    nll_at: torch.Tensor
    kl_at: torch.Tensor

    @property
    def nll_logits(self) -> torch.Tensor:
        return self.logits[:len(self.targets)]

    @property
    def kl_logits(self) -> torch.Tensor:
        return self.logits[len(self.targets):]

    def gives_target(self) -> torch.Tensor:
        """[rows] bool: every target token of the row is the argmax (rows without one: True)."""
        return _every(self.nll_at, self.nll_logits.argmax(-1) == self.targets)

    def keeps_answers(self) -> torch.Tensor:
        """[rows] bool: at every compared position the argmax is the unedited model's (no such
        position: True)."""
        return _every(self.kl_at, self.kl_logits.argmax(-1) == self.pre.argmax(-1))


def _every(at: torch.Tensor, holds: torch.Tensor) -> torch.Tensor:
    """[rows] bool: ``holds`` (one flag a position marked in ``at``, in its order) at every marked
    position of the row."""
    failed = torch.zeros(at.shape, dtype=torch.bool, device=at.device)
    failed[at] = ~holds
    return ~failed.any(1)


class Evaluated(NamedTuple):
    """G and what a step needs besides it (lambda, the penalty and its weight for the dual step;
    the read logits for the best-iterate check)."""
    objective: torch.Tensor
    terms: Dict[str, torch.Tensor]
    lam: Optional[torch.Tensor]
    penalty: Optional[torch.Tensor]
    weight: float
    read: Read
    envs: List[str]


def _mean(values: torch.Tensor, at: List[int]) -> torch.Tensor:
    return values[at].mean() if at else values.new_zeros(())
