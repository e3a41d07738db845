"""EasyEdit's multimodal evaluation of MiniMMEdit records, plus the protocol's extra evaluation."""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import compat
from . import world
from .pixels import to_model_size

VQA = "Question: {} Short answer:"

# extra evaluation: record field -> (metric name, kind). "edit": accuracy of the edit's new answer
# (``alt``); "keep": post-vs-pre argmax agreement on the answer positions (EasyEdit's locality rule).
EXTRA = (("eval_gen", "gen", "edit"), ("eval_near_shape", "near_shape", "keep"),
         ("eval_near_colour", "near_colour", "keep"), ("eval_far", "far", "keep"),
         ("eval_other_family", "other_family", "keep"))
NEAR_LISTS = ("near_shape", "near_colour")  # pooled as ``near``
# the keep-type metrics, each also scored on the items no edit of the sequence changes (``<metric>_kept``)
KEEP_METRICS = tuple(metric for _, metric, kind in EXTRA if kind == "keep") + ("near",)
# what an editor must never read (the protocol's evaluation fields of an E-VQA record)
EVALUATION_FIELDS = ("rephrase", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")
EASYEDIT_METRICS = (("rewrite_acc", "rel"), ("rephrase_acc", "t_gen"), ("image_rephrase_acc", "i_gen"),
                    ("locality_acc", "t_loc"), ("multimodal_locality_acc", "i_loc"))


def image_path(image_root: str, rel: str) -> str:
    return os.path.abspath(os.path.join(image_root, rel))


def edit_arguments(records: Sequence[dict], image_root: str) -> dict:
    """``MultimodalEditor.edit`` / ``_prepare_requests`` arguments for MiniMMEdit records (absolute
    image paths: the PyPI release joins them to ``coco_image``, a no-op for absolute paths)."""
    path = functools.partial(image_path, image_root)
    return dict(prompts=[VQA.format(r["src"]) for r in records], targets=[r["alt"] for r in records],
                image=[path(r["image"]) for r in records],
                rephrase_prompts=[VQA.format(r["rephrase"]) for r in records],
                rephrase_image=[path(r["image_rephrase"]) for r in records],
                locality_inputs={"text": {"prompt": [r["loc"] for r in records],
                                          "ground_truth": [r["loc_ans"] for r in records]},
                                 "vision": {"image": [path(r["m_loc"]) for r in records],
                                            "prompt": [VQA.format(r["m_loc_q"]) for r in records],
                                            "ground_truth": [r["m_loc_a"] for r in records]}})


class Evaluation:
    """EasyEdit's multimodal evaluation functions for one editor, plus the protocol's extras."""

    def __init__(self, editor, image_root: str, image_cache: Optional[Dict[str, Any]] = None):
        self.editor = editor
        self.image_root = image_root
        self.image_size = getattr(editor.model, "image_size", None)
        evaluate = compat.multimodal_evaluation()
        self._results = evaluate.compute_multimodal_edit_results
        self._prepare = evaluate.prepare_multimodal_edit
        self._quality = evaluate.compute_multimodal_edit_quality
        self._images: Dict[str, Any] = {} if image_cache is None else image_cache

    def path(self, rel: str) -> str:
        return image_path(self.image_root, rel)

    def image(self, rel: str):
        """A record image as EasyEdit's request preparation processes it (its BLIP processor), then
        the adapter's own resize to the model's resolution, which the adapter would apply anyway
        (``pixels.to_model_size``): cached at 64 px instead of 364 px (1.6 MB a tensor)."""
        if rel not in self._images:
            pixels = compat.process_image_file(self.editor.vis_tok, self.path(rel))
            if self.image_size:
                pixels = to_model_size(pixels[None], self.image_size)[0]
            self._images[rel] = pixels
        return self._images[rel]

    def edit_arguments(self, records: Sequence[dict]) -> dict:
        return edit_arguments(records, self.image_root)

    def requests(self, records: Sequence[dict]) -> List[dict]:
        with compat.host_scope():
            return self.editor._prepare_requests(**self.edit_arguments(records))

    def five(self, request: dict, model=None) -> dict:
        """EasyEdit's ``compute_multimodal_edit_results`` on ``model`` (the editor's model as it is
        now by default)."""
        e = self.editor
        with compat.host_scope():
            return e_results(self._results(e.model if model is None else model, e.model_name, e.hparams, e.tok,
                                           request, e.hparams.device))

    @staticmethod
    def extra_items(record: dict) -> List[Tuple[str, str, str, str, str]]:
        """(metric, kind, image, prompt, target) for every extra evaluation item of a record."""
        return [(metric, kind, item["image"], VQA.format(item["question"]), item["answer"])
                for metric, kind, item in extra_entries(record)]

    def argmax(self, items: Sequence[Tuple[str, str, str, str, str]], model=None) -> List[Tuple[tuple, tuple]]:
        """(predicted ids, target ids) on the answer positions of each item, through EasyEdit's
        ``prepare_multimodal_edit`` + ``compute_multimodal_edit_quality``; batched per target length.
        ``model``: the edited model EasyEdit's algorithm returned (SERAC's is not the editor's own
        model); the editor's model by default."""
        e = self.editor
        out: List[Optional[Tuple[tuple, tuple]]] = [None] * len(items)
        groups: Dict[int, List[int]] = {}
        for i, (_, _, _, _, target) in enumerate(items):
            groups.setdefault(len(e.tok(target, add_special_tokens=False)["input_ids"]), []).append(i)
        with compat.host_scope():
            for idx in groups.values():
                images = torch.stack([self.image(items[i][2]) for i in idx]).to(f"cuda:{e.hparams.device}")
                batch = self._prepare(e.hparams, e.tok, [items[i][4] for i in idx], [items[i][3] for i in idx], images)
                _, pred_ids = self._quality(e.model if model is None else model, batch)
                labels = batch["labels"].cpu().numpy()
                for row, i in enumerate(idx):
                    target = tuple(int(x) for x in labels[row])
                    out[i] = (answer_ids(pred_ids[row], len(target)), target)
        return out  # type: ignore[return-value]


def answer_ids(predicted, n_answer: int) -> tuple:
    """The predictions at a row's ``n_answer`` answer positions, from what EasyEdit's evaluator
    returns: the PyPI release returns those positions only, main the whole row (0 outside the
    answer, which ends every left-padded row) - the last ``n_answer`` either way."""
    return tuple(int(x) for x in predicted.reshape(-1)[-n_answer:])


def e_results(result: dict) -> dict:
    """Accuracies as floats; locality outputs as flat integer lists."""
    out = {}
    for key, value in result.items():
        if key.endswith("_output"):
            out[key] = np.asarray(value).reshape(-1).astype(int).tolist()
        elif key.endswith("_acc"):
            out[key] = float(value)
    return out


def agreement(post: Sequence[int], pre: Sequence[int]) -> float:
    """EasyEdit's (PyPI) locality: mean(post == pre) over the answer positions."""
    assert len(post) == len(pre), (len(post), len(pre))
    return float(sum(a == b for a, b in zip(post, pre)) / max(len(post), 1))


def extra_entries(record: dict) -> Iterator[Tuple[str, str, dict]]:
    """(metric, kind, item) for every extra evaluation item of a record, in ``EXTRA`` order (the
    order of ``Evaluation.extra_items`` and of ``changed_by_sequence``)."""
    for field, metric, kind in EXTRA:
        for item in record.get(field, []):
            yield metric, kind, item


# -- which locality items the edits evaluated together change -------------------------------------
# In sequential editing every record of a chunk is evaluated on the model that carries all T edits.
# A near-miss (or far, or other-family) item of one record can show the very concept another edit
# of the chunk changes, asked in that edit's question family: a perfect editor must change its
# answer, and post-vs-pre agreement would count that as a locality failure.

@functools.lru_cache(maxsize=None)
def _image_concept(rel: str) -> Tuple[str, str]:
    """(shape, colour) of a record image path (``test/123.png``), from the easy-vqa world."""
    split, name = rel.split("/")
    image = _image_index(split)[int(name[: -len(".png")])]
    return image.shape, image.colour


@functools.lru_cache(maxsize=None)
def _image_index(split: str) -> Dict[int, "world.Image"]:
    return world.image_index(split)


def item_concept(item: dict) -> Tuple[str, str, str]:
    """(shape, colour, question family) of an evaluation item ``{"image", "question", "answer"}``."""
    template, _ = world.parse_question(item["question"])
    return (*_image_concept(item["image"]), template.family)


def edit_scope(record: dict) -> Tuple[str, str, str]:
    """(shape, colour, question family) a record edits."""
    edit = record["edit"]
    return edit["shape"], edit["colour"], edit["family"]


def new_answers(chunk: Sequence[dict]) -> Dict[Tuple[str, str, str], set]:
    """(shape, colour, family) -> the new answers the edits of ``chunk`` give it."""
    out: Dict[Tuple[str, str, str], set] = {}
    for record in chunk:
        out.setdefault(edit_scope(record), set()).add(record["alt"])
    return out


def changed_by_sequence(record: dict, chunk: Sequence[dict]) -> List[bool]:
    """Per extra item of ``record`` (``extra_entries`` order): True for a keep-type item whose
    concept and question family some edit of ``chunk`` (the records edited before the evaluation)
    edits to an answer other than the item's own. The records' answers are the true answers; the
    unedited model's answer is checked against them in ``extra_metrics``."""
    edited = new_answers(chunk)
    flags = []
    for _, kind, item in extra_entries(record):
        targets = edited.get(item_concept(item), set()) if kind == "keep" else set()
        flags.append(bool(targets - {item["answer"]}))
    return flags


# -- per-edit metrics ---------------------------------------------------------------------------
def extra_metrics(items, post, pre, changed: Optional[Sequence[bool]] = None) -> Dict[str, Any]:
    """Per-edit extra metrics: ``gen`` (accuracy of the new answer), ``near_shape``, ``near_colour``,
    ``far``, ``other_family`` (post-vs-pre agreement), ``near`` (both near-miss lists pooled).

    Each keep-type metric also as ``<metric>_kept``: over the items the evaluated edits leave alone,
    leaving out an item when ``changed`` flags it (``changed_by_sequence``) *and* the unedited model
    gave its true answer there, so its answer must move for the edit to hold. Where the unedited
    model was already wrong, it may have given the new answer; the item is kept (conservative:
    nothing is left out that a perfect editor could keep). ``excluded`` / ``items``: per keep-type
    metric, the items left out and the items there were."""
    changed = list(changed) if changed is not None else [False] * len(items)
    sums: Dict[str, List[float]] = {}
    kept: Dict[str, List[float]] = {m: [] for m in KEEP_METRICS}
    excluded = {m: 0 for m in KEEP_METRICS}
    for (metric, kind, *_), (post_ids, labels), (pre_ids, _), moved in zip(items, post, pre, changed):
        if kind == "edit":
            accuracy = sum(p == t for p, t in zip(post_ids, labels)) / max(len(labels), 1)
            sums.setdefault(metric, []).append(float(accuracy))
            continue
        value = agreement(post_ids, pre_ids)
        must_move = moved and tuple(pre_ids) == tuple(labels)
        for name in (metric, "near") if metric in NEAR_LISTS else (metric,):
            sums.setdefault(name, []).append(value)
            if must_move:
                excluded[name] += 1
            else:
                kept[name].append(value)
    out: Dict[str, Any] = {m: _mean_or_none(v) for m, v in sums.items()}
    present = [m for m in KEEP_METRICS if m in sums]
    out.update({f"{m}_kept": _mean_or_none(kept[m]) for m in present})
    out["excluded"] = {m: excluded[m] for m in present}
    out["items"] = {m: len(sums[m]) for m in present}
    return out


def _mean_or_none(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def harmonic(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)
