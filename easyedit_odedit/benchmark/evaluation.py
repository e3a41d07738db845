"""EasyEdit's multimodal evaluation of MiniMMEdit records, plus the protocol's extra evaluation."""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import compat
from .pixels import to_model_size

VQA = "Question: {} Short answer:"

# extra evaluation: record field -> (metric name, kind). "edit": accuracy of the edit's new answer
# (``alt``); "keep": post-vs-pre argmax agreement on the answer positions (EasyEdit's locality rule).
EXTRA = (("eval_gen", "gen", "edit"), ("eval_near_shape", "near_shape", "keep"),
         ("eval_near_colour", "near_colour", "keep"), ("eval_far", "far", "keep"),
         ("eval_other_family", "other_family", "keep"))
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

    def extra_items(self, record: dict) -> List[Tuple[str, str, str, str, str]]:
        """(metric, kind, image, prompt, target) for every extra evaluation item of a record."""
        items = []
        for field, metric, kind in EXTRA:
            for item in record.get(field, []):
                items.append((metric, kind, item["image"], VQA.format(item["question"]), item["answer"]))
        return items

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


def extra_metrics(items, post, pre) -> Dict[str, Optional[float]]:
    """Per-edit extra metrics: ``gen`` (accuracy of the new answer), ``near_shape``, ``near_colour``,
    ``far``, ``other_family`` (post-vs-pre agreement), ``near`` (both near-miss lists pooled)."""
    sums: Dict[str, List[float]] = {}
    for (metric, kind, *_), (post_ids, labels), (pre_ids, _) in zip(items, post, pre):
        if kind == "edit":
            value = float(sum(p == t for p, t in zip(post_ids, labels)) / max(len(labels), 1))
        else:
            value = agreement(post_ids, pre_ids)
        sums.setdefault(metric, []).append(value)
        if metric in ("near_shape", "near_colour"):
            sums.setdefault("near", []).append(value)
    return {m: (sum(v) / len(v) if v else None) for m, v in sums.items()}


def harmonic(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)
