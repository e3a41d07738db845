"""``odedit train``: MEND/SERAC meta-training with EasyEdit's own ``MultimodalTrainer`` (the ODEdit
objective with ``alg_name: ODEdit``), in one process or in each process torchrun starts.

Every process runs EasyEdit's training loop with the YAML as it is (``batch_size``,
``accumulate_bs``, ``max_iters``, ``val_interval`` count per process). What this module adds:

* **one order of micro-batches** for all processes: a fresh seeded permutation of the training set
  each pass, cut into micro-batches of ``batch_size`` that are dealt round-robin to the processes
  (``SharedOrder``); EasyEdit's loop then runs exactly ``max_iters - 1`` iterations (its own epoch
  rounding can stop long before, or never start);
* **MEND's normalisation statistics as one process keeps them**: MEND normalises its inputs with a
  running mean and variance that every training forward updates; each process gathers the other
  processes' rows of the same step and adds those of the micro-batches before its own first, the
  rest after (``SharedStatistics``), so every micro-batch is normalised, and every archive holds,
  the statistics of one process walking the same micro-batches in order;
* **averaged gradients**: before each optimiser step, the gradients of every parameter EasyEdit's
  optimisers hold are replaced by their mean over the processes (one all-reduce), so the processes
  take the same step and stay identical; validation runs in every process (same weights, same
  result, so early stopping agrees) and only rank 0 writes the archive and ``results.json``.

So W processes with ``accumulate_bs: a`` take the optimiser steps that one process takes with
``accumulate_bs: W*a`` over the same micro-batches (``max_iters`` and ``val_interval`` scaled by W:
``max_iters = W * (M - 1) + 1``): a global batch of ``W * batch_size * a``. What differs: ODEdit's
dual step on its multiplier and its warm-up counter see one process's micro-batches (each process
keeps its own multiplier; the weights stay identical because the gradients are averaged).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import yaml

from ..errors import ODEditError, ODEditFileNotFoundError
from .distributed import Workers


@dataclasses.dataclass
class TrainOptions:
    hparams: str
    train: str
    val: str
    kind: str = "vqa"
    image_root: Optional[str] = None
    results_dir: Optional[str] = None

    def check(self) -> None:
        from .edit_runner import KINDS

        if self.kind not in KINDS:
            raise ODEditError("--kind", self.kind, f"use one of {sorted(KINDS)}")
        for option, path in (("--hparams", self.hparams), ("--train", self.train), ("--val", self.val)):
            if not os.path.isfile(path):
                raise ODEditFileNotFoundError(option, path, "give the path of an existing file")


class SharedOrder(torch.utils.data.Sampler):
    """This process's micro-batches of one endless order shared by all processes: pass ``p`` is a
    permutation seeded with ``seed + p``, cut into micro-batches of ``batch_size`` (a short last one
    is dropped), micro-batch ``k`` going to process ``k % world``. Iterating again continues where
    the last iteration stopped, so EasyEdit's per-epoch loops walk one stream."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int):
        if n < batch_size * world:
            raise ODEditError("--train", n, f"give at least batch_size x processes = {batch_size * world} records",
                              problem="has too few records for one micro-batch per process")
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self._stream = self._indices()

    def _indices(self):
        micro, epoch = 0, 0
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for start in range(0, self.n - self.batch_size + 1, self.batch_size):
                if micro % self.world == self.rank:
                    yield from order[start:start + self.batch_size]
                micro += 1
            epoch += 1

    def __len__(self) -> int:
        return self.batch_size * max(self.n // (self.batch_size * self.world), 1)

    def __iter__(self):
        for _ in range(len(self)):
            yield next(self._stream)


class _OneBatchLong:
    """The training set as EasyEdit's loop sizes its epochs: one batch long, so it runs one
    "epoch" per iteration and stops at ``max_iters`` (the data comes from ``SharedOrder``)."""

    def __init__(self, dataset, batch_size: int):
        self._dataset, self._batch_size = dataset, batch_size

    def __len__(self) -> int:
        return self._batch_size

    def __getattr__(self, name):
        return getattr(self._dataset, name)


class AveragedGradients:
    """Mixed into EasyEdit's trainer under torchrun: gradients averaged before each step; only
    rank 0 saves."""

    workers: Workers

    def edit_step(self, batch, training: bool):
        out = super().edit_step(batch, training)
        if training and self.global_iter > 0 and self.global_iter % self.config.accumulate_bs == 0:
            params = _stepped_parameters(self)
            for p in params:
                if p.grad is None:  # a step EasyEdit skipped (non-finite gradient) still joins the mean
                    p.grad = torch.zeros_like(p)
            self.workers.average([p.grad for p in params])
        return out

    def save_state(self, stats):
        if self.workers.rank == 0:
            super().save_state(stats)


class SharedStatistics:
    """Wraps one of MEND's ``GradientTransform`` modules under torchrun (see the module docstring):
    the running statistics advance by every process's rows of a step, in micro-batch order. The
    arithmetic is EasyEdit's own ``update_counter``."""

    def __init__(self, transform, workers: Workers):
        from .. import compat

        self.transform, self.workers = transform, workers
        self.forward = transform.forward
        self.update_counter = compat.module("trainer.algs.MEND").update_counter
        transform.forward = self

    def __call__(self, u, v, param_idx=None):
        t = self.transform
        if not t.training:
            return self.forward(u, v, param_idx)
        u_rows, v_rows = (x.to(torch.float32).reshape(-1, x.shape[-1]) for x in (u, v))
        keep = (u_rows != 0).any(-1) * (v_rows != 0).any(-1)  # the rows MEND itself counts
        rows = [None] * self.workers.world
        torch.distributed.all_gather_object(rows, (u_rows[keep].cpu(), v_rows[keep].cpu()))
        for earlier in rows[:self.workers.rank]:
            self._add(*earlier)
        out = self.forward(u, v, param_idx)
        for later in rows[self.workers.rank + 1:]:
            self._add(*later)
        return out

    def _add(self, u_rows: torch.Tensor, v_rows: torch.Tensor) -> None:
        t = self.transform
        with torch.no_grad():
            for u, v in zip(u_rows.to(t.u_s.device), v_rows.to(t.v_s.device)):
                if not t.norm_init:
                    t.u_mean, t.v_mean = u.clone(), v.clone()
                    t.u_s.zero_()
                    t.v_s.zero_()
                    t.k[:] = 1
                    t.norm_init = True
                else:
                    t.k += 1
                    t.u_mean, t.u_s = self.update_counter(u, t.u_mean, t.u_s, t.k)
                    t.v_mean, t.v_s = self.update_counter(v, t.v_mean, t.v_s, t.k)
            if t.k >= 2:
                t.u_std = (t.u_s / (t.k - 1)) ** 0.5
                t.v_std = (t.v_s / (t.k - 1)) ** 0.5


def _stepped_parameters(trainer) -> list:
    seen, params = set(), []
    for opt in (trainer.opt, getattr(trainer, "lr_opt", None)):
        for group in (opt.param_groups if opt is not None else []):
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def load_training_hparams(options: TrainOptions, workers: Workers):
    """ODEdit's training YAML (``alg_name: ODEdit``), or EasyEdit's own MEND / SERAC training YAML."""
    from .. import compat
    from ..hosts.easyedit_native import easyedit_hosts
    from ..odedit.odedit_hparams import ODEditHyperParams

    with open(options.hparams) as f:
        config = yaml.safe_load(f) or {}
    fields = {} if workers.device is None else {"device": workers.device}
    if options.image_root:
        fields.update(coco_image=os.path.abspath(options.image_root), rephrase_image=os.path.abspath(options.image_root))
    if options.results_dir:
        fields["results_dir"] = os.path.abspath(options.results_dir)
    if config.get("alg_name") == "ODEdit":
        return ODEditHyperParams.from_dict({**config, **fields}, source_path=options.hparams)
    alg = config.get("alg") or config.get("alg_name")
    classes = {h.easyedit_alg: h.training_hparams for h in easyedit_hosts().values() if h.training_hparams}
    classes["SERAC"] = classes["SERAC_MULTI"]
    if alg not in classes:
        raise ODEditError(f"--hparams {options.hparams}: alg", alg, f"use ODEdit (alg_name), or EasyEdit's "
                          f"{', '.join(sorted(classes))} training YAML")
    hparams = getattr(compat.import_easyeditor(), classes[alg]).from_hparams(options.hparams)
    for key, value in fields.items():
        setattr(hparams, key, value)
    compat.complete_host_hparams(hparams)
    return hparams


def train(options: TrainOptions, workers: Optional[Workers] = None) -> Optional[str]:
    """Meta-train; returns the archive's path on rank 0 (None on the other ranks)."""
    from easyeditor import MultimodalTrainer

    import easyedit_odedit  # noqa: F401  (registers ODEdit in EasyEdit's trainer registry)

    from .. import compat
    from ..odedit.odedit_main import seeded

    workers = workers or Workers()
    options.check()
    hp = load_training_hparams(options, workers)
    dataset_cls = compat.multimodal_dataset_classes()[options.kind]
    train_set, val_set = dataset_cls(options.train, config=hp), dataset_cls(options.val, config=hp)
    os.makedirs(os.path.join(hp.results_dir, "models", hp.alg), exist_ok=True)  # before EasyEdit's racy check
    if workers.rank != 0:
        hp.final_eval = False  # rank 0 reloads the best archive and writes results.json
    seed = int(hp.seed)
    with seeded(seed):
        trainer = MultimodalTrainer(config=hp, train_set=train_set, val_set=val_set)
        _share_order(trainer, workers, seed)
        if workers.distributed:
            trainer.workers = workers
            for module in trainer.model.modules():
                if type(module).__name__ == "GradientTransform":
                    SharedStatistics(module, workers)
            trainer.__class__ = type(f"Averaged{type(trainer).__name__}", (AveragedGradients, type(trainer)), {})
        trainer.run()
    workers.barrier()
    return trainer.save_path if workers.rank == 0 else None


def _share_order(trainer, workers: Workers, seed: int) -> None:
    """EasyEdit's shuffled loader replaced by this process's part of the shared order."""
    config = trainer.config
    if getattr(config, "max_epochs", None) is not None:  # EasyEdit's own conversion, on the real set
        iters = config.max_epochs * len(trainer.train_set)
        config.max_iters = min(config.max_iters, iters) if config.max_iters is not None else iters
        config.max_epochs = None
    loader = trainer.train_loader
    sampler = SharedOrder(len(trainer.train_set), int(config.batch_size), workers.rank, workers.world, seed)
    trainer.train_loader = torch.utils.data.DataLoader(trainer.train_set, batch_size=int(config.batch_size),
                                                       sampler=sampler, collate_fn=loader.collate_fn)
    trainer.train_set = _OneBatchLong(trainer.train_set, int(config.batch_size))
