"""The pool index: what the unedited model says about a locality pool's images, computed once.

Content-aware environments describe a few hundred pool images an edit by their image features and
the unedited model's answers to fixed probe questions. Neither depends on the edit, only on the
model's weights and the pool, so both are computed once per (model, pool) for every image of the
pool, in a fixed batch layout (pool order, fixed slices): an edit's rows never depend on which edits
ran before it in the process or which candidates it drew (answers computed in other batches can
differ in the last bits, which is why a per-edit cache was not enough).

An index answers only while the model holds the weights it was built on (a norm of every parameter,
compared exactly: the same model object before and after a restore, which is all a norm can tell):
inside an un-restored sequence of edits the probes are asked live, of the model as it is. With a
store (``pool_index_store``), what the index computes is also saved, and a later process loads it.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .environments import Row
from .pool_index_store import IndexStore, kept


def weights_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter's norm, in one pass: equal after a restore that copies the originals back."""
    params = [p.detach() for p in model.parameters()]
    return torch.stack([n.float().cpu() for n in torch._foreach_norm(params)])


class PoolIndex:
    """Image features and fixed probes' answers for every image of one pool, on one model's weights."""

    def __init__(self, adapter, paths: Sequence[str], load: Callable[[str], torch.Tensor], batch: int,
                 store: Optional[IndexStore] = None):
        self.adapter, self.paths, self.load, self.batch, self.store = adapter, list(paths), load, batch, store
        self.position = {path: i for i, path in enumerate(self.paths)}
        self.fingerprint = weights_fingerprint(adapter)
        self._features = None
        self._answers: Dict[Tuple[str, int], List[str]] = {}

    def holds(self) -> bool:
        return torch.equal(self.fingerprint, weights_fingerprint(self.adapter))

    def knows(self, path) -> bool:
        return path in self.position

    @torch.no_grad()
    def features(self, paths: Sequence[str]) -> torch.Tensor:
        if self._features is None:
            every = kept(self.store, ("features",), lambda: torch.cat(
                [self.adapter.image_features([self.load(p) for p in chunk]) for chunk in self._slices()]))
            self._features = every.to(getattr(self.adapter, "device", every.device))
        return self._features[[self.position[p] for p in paths]]

    def answers(self, prompt: str, paths: Sequence[str], n_tokens: int,
                ask: Callable[[List[Row], int], List[str]]) -> List[str]:
        """The unedited model's answers to ``prompt`` on each image (``ask(rows, n_tokens)`` decodes)."""
        key = (prompt, n_tokens)
        if key not in self._answers:
            self._answers[key] = kept(self.store, ("answers", prompt, n_tokens), lambda: [
                a for chunk in self._slices() for a in ask([Row("probe", prompt, None, self.load(p)) for p in chunk],
                                                           n_tokens)])
        every = self._answers[key]
        return [every[self.position[p]] for p in paths]

    def _slices(self):
        return (self.paths[i:i + self.batch] for i in range(0, len(self.paths), self.batch))


_INDEXES: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[tuple, PoolIndex]]" = weakref.WeakKeyDictionary()


def index_for(adapter, key: tuple, paths: Sequence[str], load, batch: int, unedited: bool,
              open_store: Optional[Callable[[], IndexStore]] = None):
    """The index of this pool on this model, built on first use (or loaded: ``open_store`` gives the
    store of these weights and this pool). None while the model is edited (``unedited`` False: an
    un-restored sequence): then nothing can be reused."""
    indexes = _INDEXES.setdefault(adapter, {})
    index = indexes.get(key)
    if index is not None and index.holds():
        return index
    if not unedited:
        return None
    # new, or the weights changed outside ODEdit: the store is keyed by the weights as they are now
    indexes[key] = PoolIndex(adapter, paths, load, batch, open_store() if open_store else None)
    return indexes[key]


class Probes:
    """What the unedited model says, for one edit: image features and answers to probe rows, from
    the pool's index where it knows the image (and, for answers, the prompt is one of the fixed
    ``probes``), asked live otherwise, in slices of ``batch`` rows."""

    def __init__(self, adapter, ask: Callable[[List[Row], int], List[str]], n_tokens: int, batch: int,
                 fixed_prompts: Sequence[str] = (), index: PoolIndex = None):
        self.adapter, self.ask, self.n_tokens, self.batch = adapter, ask, n_tokens, batch
        self.fixed, self.index = set(fixed_prompts), index

    def answers(self, probes: List[Row]) -> List[str]:
        said: List[str] = [None] * len(probes)
        if self.index is not None:
            by_prompt: Dict[str, List[int]] = {}
            for i, row in enumerate(probes):
                if row.prompt in self.fixed and self.index.knows(row.source):
                    by_prompt.setdefault(row.prompt, []).append(i)
            for prompt, rows in by_prompt.items():
                found = self.index.answers(prompt, [probes[i].source for i in rows], self.n_tokens, self.ask)
                for i, answer in zip(rows, found):
                    said[i] = answer
        live = [i for i, answer in enumerate(said) if answer is None]
        for start in range(0, len(live), self.batch):
            chunk = live[start:start + self.batch]
            for i, answer in zip(chunk, self.ask([probes[i] for i in chunk], self.n_tokens)):
                said[i] = answer
        return said

    def features(self, images: Sequence[torch.Tensor], sources: Sequence[str] = None) -> torch.Tensor:
        if self.index is not None and sources is not None and all(self.index.knows(s) for s in sources):
            return self.index.features(sources)
        return self.adapter.image_features(images)
