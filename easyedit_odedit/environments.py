"""Environments: how one edit request is seen.

* IN  - the request itself: (image, prompt, target).
* SE  - semantic shifts that must carry the edit: rephrased text (templates, word-level
        perturbations, a pluggable paraphrase source), other views of the same image (crop, shift,
        flip, noise, blur), and both at once. Target: the edit's target.
* OUT - factual shifts that must not change: text-only and image prompts from a locality pool
        (a train split or a user file). Near misses - the edit's question (and their own) on the
        pool images most similar to the edit image that do *not* show the same content, judged by
        the unedited model's answers - teach the model where the edit stops. Target: the unedited
        model.

Only ``prompt``, ``target`` and ``image`` of a request are ever read (``edit_view``): the other
fields (``rephrase_prompt``, ``image_rephrase``, ``locality_*``, ``multimodal_locality_*``) are how
an edit is judged.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torchvision.transforms.v2.functional as TF

from .errors import ODEditError, ODEditFileNotFoundError
from .shipped import MINIMMEDIT_POOL, RECORDS_COMMAND, resolve_locality_pool

EDIT_FIELDS = ("prompt", "target", "image")
VQA_TEMPLATE = "Question: {} Short answer:"


def edit_view(request: dict) -> dict:
    """The only part of a request an editor may see."""
    return {k: request[k] for k in EDIT_FIELDS if k in request}


def past_edit(view: dict, view_size: Optional[int]) -> dict:
    """What later edits of a sequence keep of this one (``EnvironmentBuilder.past``): its prompt,
    target and image at the model's own size, on the CPU (a sequence may be long), and what its
    set-up added to the view: what the unedited model says the image shows (``content``, when probes
    described it) and the rows it carries over (``carried``, see ``carried_rows``)."""
    image = view.get("image")
    if image is not None:
        image = _shrink(image, view_size).detach().cpu()
    carried = [dataclasses.replace(r, image=None if r.image is None else r.image.detach().cpu())
               for r in view.get("carried", ())]
    return {"prompt": view["prompt"], "target": view["target"], "image": image, "content": view.get("content"),
            "rows": carried}


def carried_rows(rows: Sequence["Row"], n: int) -> List["Row"]:
    """The ``n`` rows of an edit that later edits of a sequence keep training on: half that carry its
    target (same-content images), half that mark where it stops (near misses first, then the
    questions that protect its image's other attributes); either half fills the other's shortfall."""
    keep = [r for r in rows if r.env == "SE_content"]
    stop = [r for r in rows if r.env == "OUT_near"] + [r for r in rows if r.env == "OUT_protect"]
    return _half_and_half(keep, stop, n)


@dataclass
class Row:
    """One prompt of one environment. ``target=None``: the unedited model's greedy answer."""

    env: str
    prompt: str
    target: Optional[str]
    image: Optional[torch.Tensor] = None
    source: Optional[str] = None  # the pool image's path, for a row that shows one
    content: Optional[tuple] = None  # what the unedited model says its image shows (``ContentMiner``)


# --------------------------------------------------------------------------------------------
# SE: text
# --------------------------------------------------------------------------------------------
class TextAugmenter:
    def __init__(self, settings, rng: random.Random):
        self.settings, self.rng = settings, rng
        self.paraphrase = load_paraphrase_source(settings.paraphrases)

    def variants(self, prompt: str, n: int) -> List[str]:
        """Up to n distinct rephrasings: paraphrases first, then templates and perturbations."""
        found: List[str] = []
        candidates = list(self.paraphrase(prompt)) if self.paraphrase else []
        self.rng.shuffle(candidates)
        for attempt in range(8 * max(n, 1)):
            if len(found) >= n:
                break
            if candidates:
                text = candidates.pop()
            else:
                template = self.rng.choice(self.settings.templates)
                text = template.format(prompt=self._perturb(prompt))
            if text != prompt and text not in found:
                found.append(text)
        return found

    def named(self, prompt: str, described: Dict[str, str]) -> List[str]:
        """Rephrasings that name what the edit image shows, beyond the prompt's own: given by a
        paraphrase source that takes ``described`` (the unedited model's answers on the edit image,
        question -> answer), e.g. "what color is the rectangle?" for "what color is the shape?"."""
        if not _takes_description(self.paraphrase):
            return []
        plain = set(self.paraphrase(prompt))
        return [t for t in self.paraphrase(prompt, described=described) if t not in plain and t != prompt]

    def _perturb(self, prompt: str) -> str:
        """Word dropout that never drops the last word (it often carries the question's end)."""
        tokens = prompt.split()
        if len(tokens) < 3:
            return prompt
        kept = [t for t in tokens[:-1] if self.rng.random() >= self.settings.word_dropout] + tokens[-1:]
        return " ".join(kept)


def _takes_description(source: Optional[Callable]) -> bool:
    try:
        return source is not None and "described" in inspect.signature(source).parameters
    except (TypeError, ValueError):  # a callable without a signature Python can read
        return False


def load_paraphrase_source(spec) -> Optional[Callable[[str], Sequence[str]]]:
    """``pkg.module:function`` (a callable prompt -> variants, which may also take ``described``:
    see ``TextAugmenter.named``), a JSON file {prompt: [variants]}, a Python callable, or None."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str) and ":" in spec and not os.path.exists(spec):
        module_name, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ODEditError("environments.paraphrases", spec,
                              "give 'package.module:function' of an importable callable") from err
    if not os.path.isfile(spec):
        raise ODEditFileNotFoundError("environments.paraphrases", spec,
                                      "give a JSON file {prompt: [variants]} or 'package.module:function'")
    with open(spec) as f:
        table = json.load(f)
    return lambda prompt: table.get(prompt, [])


# --------------------------------------------------------------------------------------------
# SE: image views that keep the content
# --------------------------------------------------------------------------------------------
class ImageAugmenter:
    def __init__(self, settings, generator: torch.Generator):
        self.settings, self.gen = settings, generator

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.gen).item()

    def view(self, image: torch.Tensor) -> torch.Tensor:
        s = self.settings
        _, h, w = image.shape
        scale = self._uniform(*s.crop_scale)
        ch, cw = max(1, int(h * scale)), max(1, int(w * scale))
        top, left = int(self._uniform(0, h - ch)), int(self._uniform(0, w - cw))
        out = TF.resized_crop(image, top, left, ch, cw, [h, w], antialias=True)
        shift = [int(self._uniform(-s.max_shift, s.max_shift) * w), int(self._uniform(-s.max_shift, s.max_shift) * h)]
        out = TF.affine(out, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0])
        if s.hflip and torch.rand((), generator=self.gen).item() < 0.5:
            out = TF.horizontal_flip(out)
        if s.blur_sigma > 0:
            sigma = self._uniform(0.1, s.blur_sigma)
            out = TF.gaussian_blur(out, kernel_size=[5, 5], sigma=[sigma, sigma])
        if s.colour_jitter > 0:
            out = out * self._uniform(1 - s.colour_jitter, 1 + s.colour_jitter)
        if s.noise_std > 0:
            out = out + s.noise_std * torch.randn(out.shape, generator=self.gen).to(out.device, out.dtype)
        return out


# --------------------------------------------------------------------------------------------
# OUT: the locality pool
# --------------------------------------------------------------------------------------------
@dataclass
class PoolEntry:
    prompt: str
    answer: str
    image_path: Optional[str] = None


@functools.lru_cache(maxsize=8)
def load_locality_pool(path: str, image_root: str) -> tuple:
    """Entries from a train-split E-VQA/E-IC JSON (``image``/``src``/``pred``, ``m_loc``/``m_loc_q``/
    ``m_loc_a``, ``loc``/``loc_ans``) or a JSON list of {prompt, answer, image?}."""
    if not os.path.isfile(path):
        raise ODEditFileNotFoundError("environments.locality_pool", path,
                                      f"write MiniMMEdit's records and pool with `{RECORDS_COMMAND}`, use "
                                      f"`{MINIMMEDIT_POOL}` (built on first use), or give your own train-split "
                                      "JSON (E-VQA format) or JSON list of prompts")
    with open(path) as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ODEditError("environments.locality_pool", path, "the file must hold a JSON list")
    # E-IC (captions) prompts are the bare ``src``, as in EasyEdit's CaptionDataset; E-VQA's are questions
    edit_template = VQA_TEMPLATE if _holds_questions(records) else "{}"
    entries = []
    for rec in records:
        if "prompt" in rec:
            image = rec.get("image")
            entries.append(PoolEntry(rec["prompt"], str(rec.get("answer", "")),
                                     os.path.join(image_root, image) if image else None))
            continue
        if rec.get("loc") and rec.get("loc_ans"):
            entries.append(PoolEntry(rec["loc"], rec["loc_ans"]))
        if rec.get("m_loc") and rec.get("m_loc_q"):
            entries.append(PoolEntry(VQA_TEMPLATE.format(rec["m_loc_q"]), rec.get("m_loc_a", ""),
                                     os.path.join(image_root, rec["m_loc"])))
        if rec.get("image") and rec.get("src") and rec.get("pred"):
            entries.append(PoolEntry(edit_template.format(rec["src"]), rec["pred"],
                                     os.path.join(image_root, rec["image"])))
    return tuple(entries)


def _holds_questions(records: list) -> bool:
    """E-VQA's ``src`` fields are questions; E-IC's are caption prompts ("a photo of"), never."""
    sources = [r["src"] for r in records[:200] if isinstance(r, dict) and isinstance(r.get("src"), str)]
    return not sources or sum("?" in src for src in sources) * 2 >= len(sources)


# --------------------------------------------------------------------------------------------
# Putting one edit's environments together
# --------------------------------------------------------------------------------------------
class EnvironmentBuilder:
    """Builds the per-edit pool of environment rows (sampled in steps by ``EnvironmentSampler``)."""

    def __init__(self, settings, image_processor: Optional[Callable], coco_root: str, seed: int,
                 view_size: Optional[int] = None):
        """``view_size``: the model's own image resolution, which every image is resized to anyway.
        Views and pool images are kept at that size: augmenting a 364-pixel processor output costs
        ~30x more for the same result, and a cached pool image takes 1/30 of the memory."""
        self.settings, self.view_size = settings, view_size
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.text = TextAugmenter(settings, self.rng)
        self.images = ImageAugmenter(settings, self.gen)
        self.image_processor = image_processor
        self.pool: Sequence[PoolEntry] = ()
        self.pool_file: Optional[str] = None
        self.by_content = content_aware(settings)
        if settings.locality_pool:
            self.pool_file, root = resolve_locality_pool(settings.locality_pool, settings.locality_image_root)
            self.pool = load_locality_pool(self.pool_file, (root if root is not None else coco_root) or "")

    def in_and_se(self, view: dict) -> List[Row]:
        """IN and SE rows (image views at ``view_size``)."""
        s, k = self.settings, self.settings.pool_factor
        prompt, target, image = view["prompt"], view["target"], view.get("image")
        rows = [Row("IN", prompt, target, image)]
        if image is not None:
            image = _shrink(image, self.view_size)
        texts = self.text.variants(prompt, k * (s.se_text + s.se_joint))
        rows += [Row("SE_text", t, target, image) for t in texts[: k * s.se_text]]
        if image is not None:
            rows += [Row("SE_image", prompt, target, self.images.view(image)) for _ in range(k * s.se_image)]
            rows += [Row("SE_joint", t, target, self.images.view(image)) for t in texts[k * s.se_text:]]
        return rows

    def out_candidates(self, view: dict) -> Dict[str, List[Row]]:
        """Text-only and image OUT rows; image rows still to be split into near and far by
        ``split_near_far`` once image features are known."""
        s, k = self.settings, self.settings.pool_factor
        text_entries = [e for e in self.pool if e.image_path is None]
        image_entries = [e for e in self.pool if e.image_path is not None]
        text_rows = [Row("OUT_text", e.prompt, e.answer) for e in self._sample(text_entries, k * s.out_text)]
        candidates = self._sample(image_entries, self._searched(self.by_content)) if (s.out_image or self.by_content) else []
        image_rows = [Row("OUT_image", e.prompt, e.answer, self.load_image(e.image_path), e.image_path)
                      for e in candidates]
        return {"text": text_rows, "image": image_rows}

    def text_watch(self, seed: int, n: int) -> List[Row]:
        """``n`` text-only pool questions for ``spill.spilled`` to ask again after the edit (their
        targets: the unedited model's answers), drawn apart from the edit's own rows."""
        entries = [e for e in self.pool if e.image_path is None]
        return [Row("OUT_text", e.prompt, None) for e in random.Random(seed + 2).sample(entries, min(n, len(entries)))]

    def past(self, edits: Sequence[dict], view: Optional[dict] = None) -> List[Row]:
        """Rows from the earlier edits of a sequence (only edit fields: a past record's evaluation
        fields were never kept). ``past_reference: current``: each asked with its own image and
        answered with its own new target, which this edit must leave as it is (KL to the current
        model, like every OUT row). ``sequence_start``: every earlier edit's own prompt and the rows
        it carried (``carried_rows``) - ``IN_past`` rows that must give their targets, ``OUT_past``
        rows that must keep the model's answers from before the sequence - less those about content
        another edit of the sequence changes (``without_conflicts``)."""
        if not edits or not self.settings.out_past:
            return []  # draws nothing: single edits see exactly the rows they always did
        if self.settings.past_reference == "current":
            chosen = self._sample(edits, self.settings.pool_factor * self.settings.out_past)
            return [Row("OUT_past", e["prompt"], e["target"], e.get("image")) for e in chosen]
        rows = []
        for j, e in enumerate(edits):
            others = [o for o in [*edits[:j], *edits[j + 1:], view] if o is not None]
            own = [Row("IN_past", e["prompt"], e["target"], e.get("image"), content=e.get("content"))]
            own += [dataclasses.replace(r, env="IN_past" if r.env.startswith("SE") else "OUT_past") for r in e["rows"]]
            later = [o for o in [*edits[j + 1:], view] if o is not None]
            rows += [r for r in without_conflicts(own, others) if not _overridden(r, e, later)]
        return rows

    def _sample(self, items: Sequence, n: int) -> list:
        return self.rng.sample(list(items), min(n, len(items)))

    def load_image(self, path: str) -> torch.Tensor:
        return pool_image(path, self.image_processor, self.view_size)

    def near_and_far(self, view: dict, se_rows: List[Row], candidates: List[Row],
                     features: Callable[[List[torch.Tensor]], torch.Tensor],
                     answers: Optional[Callable[[List[Row]], List[str]]] = None) -> List[Row]:
        """Near misses: the pool images closest to the edit image that lie outside the radius its
        own SE views span and that do not show the same content (``same_content``). They are asked
        the edit's own question and their own; the rest of the quota is far rows."""
        s, k = self.settings, self.settings.pool_factor
        quota = k * s.out_image
        if self.by_content and answers is not None and candidates and view.get("image") is not None:
            return self._by_content(view, se_rows, candidates, features, answers)
        if not candidates or quota == 0 or view.get("image") is None:
            return candidates[:quota]
        views = [r.image for r in se_rows if r.env == "SE_image"]
        feats = features([view["image"], *views, *[r.image for r in candidates]])
        anchor, view_feats, cand_feats = feats[0], feats[1:1 + len(views)], feats[1 + len(views):]
        radius = (view_feats - anchor).norm(dim=-1).max().item() if len(views) else 0.0
        dist = (cand_feats - anchor).norm(dim=-1)
        order = [i for i in dist.argsort().tolist() if dist[i].item() > radius]
        n_near = int(round(quota * s.near_miss_share))
        near, same = self._nearest_distinct(view, candidates, order, max(n_near // 2, 1 if n_near else 0), answers)
        rows = []
        for i, answer in near:  # the edit's question (target: the unedited model's answer) and its own
            rows.append(Row("OUT_near", view["prompt"], answer, candidates[i].image))
            rows.append(Row("OUT_near", candidates[i].prompt, candidates[i].target, candidates[i].image))
        used = {i for i, _ in near} | same
        far_idx = [i for i in order if i not in used]
        self.rng.shuffle(far_idx)
        rows += [Row("OUT_far", candidates[i].prompt, candidates[i].target, candidates[i].image)
                 for i in far_idx[: quota - len(rows)]]
        return rows

    def _searched(self, by_content: bool) -> int:
        """Pool images looked at per edit: every one the probes describe, or a few per OUT image row."""
        s = self.settings
        return s.probe_pool if by_content else s.near_miss_search * s.pool_factor * s.out_image

    def _by_content(self, view: dict, se_rows: List[Row], candidates: List[Row], features, answers) -> List[Row]:
        """``ContentMiner``'s near misses, same-content and protecting rows, and far rows (their own
        question) from the candidates that share nothing with the edit image."""
        anchor = features([view["image"]])
        distances = (features([r.image for r in candidates], [r.source for r in candidates]) - anchor).norm(dim=-1).tolist()
        found = ContentMiner(self.settings, self.rng, self.text.named).rows(view, candidates, distances, answers)
        if found is None:  # the probes describe nothing besides the edit's answer: search as without them
            self.by_content = False
            return self.near_and_far(view, se_rows, self._sample(candidates, self._searched(False)), features, answers)
        far = found.pop("far")
        view["content"], view["watched"] = found.pop("edit"), found.pop("watched")
        self.rng.shuffle(far)
        n_far = self.settings.pool_factor * EnvironmentSampler.far_quota(self.settings)
        return [row for group in found.values() for row in group] + far[:n_far]

    def _nearest_distinct(self, view: dict, candidates: List[Row], order: List[int], wanted: int,
                          answers: Optional[Callable[[List[Row]], List[str]]]):
        """The ``wanted`` nearest candidates that do not show the edit's content, each with the
        unedited model's answer to the edit's question on it, and the set of candidates found to
        show it. Probed a few at a time, nearest first (the same content hides among the nearest),
        so a 7B model answers about 3 x ``wanted`` probe rows, not 3 x the pool; farther candidates
        are not probed."""
        if answers is None:
            return [(i, None) for i in order[:wanted]], set()
        near, same, pos = [], set(), 0
        while len(near) < wanted and pos < len(order):
            batch = order[pos: pos + wanted - len(near) + 1]
            pos += len(batch)
            for i, (is_same, answer) in zip(batch, self.same_content(view, [candidates[i] for i in batch], answers)):
                if is_same:
                    same.add(i)
                elif len(near) < wanted:
                    near.append((i, answer))
        return near, same

    @staticmethod
    def same_content(view: dict, candidates: List[Row], answers: Callable[[List[Row]], List[str]]) -> List[tuple]:
        """(shows the same content, the edit question's answer on it) for each candidate image. The
        same content, to the unedited model: it answers the edit's question and the candidate's own
        question the same way on both images. Such an image is not a near miss - the edit must carry
        over to it - and training it to keep its old answer would fight the edit (an image of the
        same object in another position lies outside the augmentation radius as often as not). Only
        asked questions count, so a near miss that differs in something neither question asks about
        is missed (conservative)."""
        probes = [Row("probe", view["prompt"], None, view["image"])]
        for c in candidates:
            probes += [Row("probe", view["prompt"], None, c.image), Row("probe", c.prompt, None, view["image"]),
                       Row("probe", c.prompt, None, c.image)]
        said = answers(probes)
        edit_answer, per_candidate = said[0], [said[1 + 3 * j: 4 + 3 * j] for j in range(len(candidates))]
        return [(on_c == edit_answer and own_on_edit == own_on_c, on_c) for on_c, own_on_edit, own_on_c in per_candidate]


# --------------------------------------------------------------------------------------------
# OUT and SE by content: what the unedited model says about each pool image
# --------------------------------------------------------------------------------------------
def content_aware(settings) -> bool:
    """Whether near misses are found by content (``ContentMiner``): probes given and a pool to probe."""
    return settings.probe_pool > 0 and bool(settings.probes)


def same_answer(a: str, b: str) -> bool:
    """Answers compared as a person would: case, punctuation and a leading article do not count."""
    return _normal_answer(a) == _normal_answer(b)


def _normal_answer(text: str) -> str:
    words = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()
    return " ".join(words[1:] if words[:1] in (["a"], ["an"], ["the"]) else words)


@dataclass
class Description:
    """The unedited model's answer to each question asked on one image."""

    answers: Dict[str, str]
    image: torch.Tensor
    source: Optional[str] = None  # the pool image's path (None: the edit image)


class ContentMiner:
    """Near misses and same-content images of an edit, told apart by the unedited model's answers
    rather than by pixels: augmented views of one image do not show where a concept ends, and
    "the same answer to the edit's question" alone takes exactly the images an edit spills into
    (same colour, other shape, for a colour edit) for the edit's own content.

    Every probe is asked on the edit image and on each candidate, the edit's own question on the
    nearest ones (``describe``). A probe that answers like the edit's question asks the same thing
    (``alike``); the others describe the image's other attributes. Same content: the edit
    question's answer and every other attribute equal to the edit image's. Near miss: some equal, not all; those that share the edit question's
    answer are the ones an edit changes by mistake, and half the near misses are of that kind.
    Rows:

    * ``OUT_near``: a question alike the edit's on each near miss (target: the unedited answer);
    * ``SE_content``: the questions alike the edit's, and its rephrasings that name what the edit
      image shows (``named``), on the edit image and same-content images (target: the edit's target);
    * ``OUT_protect``: the other probes on the edit image and same-content images (what else the
      model says about the edited concept must not change);
    * ``far`` (``OUT_far`` rows): on images that share nothing, a question alike the edit's and the
      image's own pool question.
    """

    SAME_QUESTION_AGREEMENT = 0.9  # a probe that answers like the edit's question asks the same thing
    EDIT_QUESTION_SAMPLE = 32      # nearest candidates the edit's own question is asked on (``describe``)

    def __init__(self, settings, rng: random.Random,
                 named: Optional[Callable[[str, Dict[str, str]], List[str]]] = None):
        """``named(prompt, description)``: rephrasings of the edit's question that name what the
        edit image shows (``TextAugmenter.named``; the description: the other attributes' answers),
        asked on the same-content images too."""
        self.settings, self.rng, self.named = settings, rng, named

    def rows(self, view: dict, candidates: List[Row], distances: Sequence[float],
             answers: Callable[[List[Row]], List[str]]) -> Optional[Dict[str, List[Row]]]:
        """``candidates``: pool image rows (their own question and answer), ``distances`` their
        feature distances to the edit image. Rows by group, and ``far``: the candidates that share
        nothing with the edit image. None when no probe asks anything the edit's question does not
        (then content cannot be told from the edit's answer)."""
        nearest = sorted(range(len(candidates)), key=lambda i: distances[i])
        edit, described, alike, other = self.describe(view, candidates, answers, nearest)
        if not other:
            return None
        attributes = [view["prompt"], *other]
        same, sharing, partial, far = [], [], [], []
        for i in nearest:
            equal = [same_answer(described[i].answers[q], edit.answers[q]) for q in attributes]
            group = same if all(equal) else sharing if equal[0] else partial if any(equal) else far
            group.append(i)
        s, k = self.settings, self.settings.pool_factor
        near = _half_and_half(sharing, partial, k * s.near_miss_rows)
        same_content = [edit, *[described[i] for i in same[: k * s.same_content_rows]]]
        # named by the other attributes only: the edited one's old answer would be wrong in a rephrasing
        named = self.named(view["prompt"], {q: edit.answers[q] for q in other}) if self.named else []
        carry = [Row("SE_content", q, view["target"], d.image, d.source, content=self.content(d))
                 for d in same_content for q in [*alike, *named]]
        protect = [Row("OUT_protect", q, d.answers[q], d.image, content=self.content(d))
                   for d in same_content for q in other]
        for group in (carry, protect):
            self.rng.shuffle(group)
        return {"OUT_near": [self._kept("OUT_near", alike[n % len(alike)], i, candidates, described)
                             for n, i in enumerate(near)],
                "SE_content": [r for r in carry if not (r.prompt == view["prompt"] and r.image is edit.image)
                               ][: k * s.same_content_rows],
                "OUT_protect": protect[: k * s.protect_rows],
                "far": self._far_rows(candidates, described, far, alike),
                "edit": self.content(edit),
                "watched": self._watched(view, candidates, described, same[k * s.same_content_rows:], set(same),
                                         alike, other)}

    def _far_rows(self, candidates: List[Row], described: List["Description"], far: List[int],
                  alike: List[str]) -> List[Row]:
        """On each image that shares nothing with the edit image: a question alike the edit's (its
        unedited answer), which is what an edit that spreads past its concept changes there, and the
        image's own pool question."""
        rows = []
        for n, i in enumerate(far):
            rows += [self._kept("OUT_far", alike[n % len(alike)], i, candidates, described),
                     dataclasses.replace(candidates[i], env="OUT_far", content=self.content(described[i]))]
        return rows

    def _kept(self, env: str, question: str, i: int, candidates: List[Row], described: List["Description"]) -> Row:
        """``question`` on candidate ``i``'s image with the unedited model's answer there: a row
        that must keep it."""
        return Row(env, question, described[i].answers[question], described[i].image, candidates[i].source,
                   self.content(described[i]))

    def _watched(self, view, candidates, described, unused_same, same, alike, other) -> List[Row]:
        """What ``spill.spilled`` asks again on the edited weights: the same-content images the rows
        do not hold, asked the edit's question (they must give its target), and every other image,
        asked every question (they must keep their unedited answers)."""
        carry = [Row("SE_content", q, view["target"], described[i].image, candidates[i].source,
                     self.content(described[i])) for i in unused_same for q in alike]
        keep = [self._kept("OUT_spill", q, i, candidates, described)
                for i in range(len(candidates)) if i not in same for q in [*alike, *other]]
        return carry + keep

    def content(self, description: "Description") -> tuple:
        """What an image shows, to the unedited model: its answers to the fixed probes (the same
        questions for every edit, so two edits' images compare)."""
        return tuple(_normal_answer(description.answers[q]) for q in self.settings.probes)

    def describe(self, view: dict, candidates: List[Row], answers: Callable[[List[Row]], List[str]],
                 nearest: Sequence[int]):
        """The edit image's description, each candidate's, the questions that ask what the edit's
        question asks (itself first), and the probes that ask something else.

        Every probe is asked on every image (the pool index answers those). The edit's own question,
        unless it is a probe, is asked on the edit image and the ``EDIT_QUESTION_SAMPLE`` nearest
        candidates; a probe that asks the same thing there stands in for it on the others. Asking it
        on every candidate was most of a content edit's set-up (the index cannot know an edit's
        question), and a stand-in answers what it asks by construction."""
        edit_question = view["prompt"]
        probes = [q for q in dict.fromkeys(self.settings.probes) if q != edit_question]
        images = [view["image"], *[c.image for c in candidates]]
        sources = [None, *[c.source for c in candidates]]
        on_sample = edit_question not in self.settings.probes
        asked = [0, *[1 + i for i in nearest[:self.EDIT_QUESTION_SAMPLE]]] if on_sample else range(len(images))
        said = answers([Row("probe", q, None, images[j], sources[j]) for j in range(len(images)) for q in probes]
                       + [Row("probe", edit_question, None, images[j], sources[j]) for j in asked])
        table = [dict(zip(probes, said[j * len(probes):(j + 1) * len(probes)])) for j in range(len(images))]
        for j, answer in zip(asked, said[len(images) * len(probes):]):
            table[j][edit_question] = answer
        sample = [table[j] for j in asked]
        alike = [edit_question, *[q for q in probes if self._asks_the_same(sample, edit_question, q)]]
        self._answer_the_rest(table, edit_question, alike[1:], images, sources, answers)
        questions = [edit_question, *probes]
        other = [q for q in questions if q not in alike]
        descriptions = [Description({q: row[q] for q in questions}, image, source)
                        for row, image, source in zip(table, images, sources)]
        return descriptions[0], descriptions[1:], alike, other

    @staticmethod
    def _answer_the_rest(table, edit_question, stand_ins, images, sources, answers) -> None:
        """The edit question's answer on the images it was not asked on: a stand-in probe's answer,
        or, with none, the question asked there too."""
        rest = [j for j, row in enumerate(table) if edit_question not in row]
        if stand_ins:
            for j in rest:
                table[j][edit_question] = table[j][stand_ins[0]]
            return
        for j, answer in zip(rest, answers([Row("probe", edit_question, None, images[j], sources[j]) for j in rest])):
            table[j][edit_question] = answer

    def _asks_the_same(self, table: List[Dict[str, str]], edit_question: str, probe: str) -> bool:
        """A probe whose answers agree with the edit question's on the edit image (``table[0]``) and
        on nearly every candidate asked asks the same thing (a colour probe for a colour edit): it is
        neither a described attribute nor a row to protect (the edit must change it)."""
        if not same_answer(table[0][edit_question], table[0][probe]):
            return False
        agree = sum(same_answer(row[edit_question], row[probe]) for row in table)
        return agree >= self.SAME_QUESTION_AGREEMENT * len(table)


def _half_and_half(first: list, second: list, n: int) -> list:
    """n items, half from each list (the first gets the odd one), the other list filling a shortfall."""
    from_first = min(len(first), max((n + 1) // 2, n - len(second)))
    return first[:from_first] + second[: n - from_first]


def without_conflicts(rows: Sequence[Row], edits: Sequence[dict]) -> List[Row]:
    """The rows that keep an answer from before a sequence (``OUT_*``), less those whose image shows
    content one of ``edits`` changes: what a question asks about such an image is that edit's to
    decide (conservative: every question on it, not only the edited one)."""
    changed = {e.get("content") for e in edits} - {None}
    return [r for r in rows if not (r.env.startswith("OUT") and r.content in changed)]


def _overridden(row: Row, edit: dict, later: Sequence[dict]) -> bool:
    """An earlier edit's own row asked again, on the same content, by a later edit: the later wins."""
    return (row.env == "IN_past" and edit.get("content") is not None
            and any(o.get("content") == edit["content"] and o["prompt"] == row.prompt for o in later))


class ImageCache:
    """Least-recently-used processed images, bounded by bytes rather than by count: a budget holds a
    whole MiniMMEdit pool at the model's 64 pixels (~50 KB an image) but only ~160 images at
    EasyEdit's 364 (1.6 MB each, models without a fixed size). Processing a pool image (decode,
    EasyEdit's resize to 364, back to the model's size) cost half of an edit's set-up on MiniMMEdit."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()

    def get(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        return value

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


POOL_IMAGE_CACHE_BYTES = 256 * 2 ** 20
_PROCESSED_POOL_IMAGES = ImageCache(POOL_IMAGE_CACHE_BYTES)


def pool_image(path: str, processor: Optional[Callable], view_size: Optional[int]) -> torch.Tensor:
    """A pool image as the rows show it: processed, at the model's own size. The pool is fixed:
    each image is processed once and the recent ones are kept (``POOL_IMAGE_CACHE_BYTES``)."""
    key = (path, type(processor).__name__, view_size)
    return _PROCESSED_POOL_IMAGES.get(key, lambda: _shrink(_load_processed_image(path, processor), view_size))


def _shrink(image: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """``image`` resized down to size x size (the adapter's own resize, done once instead of every pass)."""
    if not size or image.shape[-1] <= size:
        return image
    return torch.nn.functional.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                                           antialias=True, align_corners=False)[0].to(image.dtype)


def _load_processed_image(path: str, processor: Optional[Callable]) -> torch.Tensor:
    from . import compat

    if not os.path.isfile(path):
        raise ODEditFileNotFoundError("environments.locality_pool image", path,
                                      "set environments.locality_image_root to the pool's image folder")
    return compat.process_image_file(processor, path)


class EnvironmentSampler:
    """Each step: IN plus a fresh random subset of every SE/OUT group, from the fixed pool."""

    GROUP_QUOTA = {"SE_text": "se_text", "SE_image": "se_image", "SE_joint": "se_joint",
                   "OUT_text": "out_text", "OUT_past": "out_past", "IN_past": "out_past", "OUT_spill": "near_miss_rows",
                   "SE_content": "same_content_rows",
                   "OUT_protect": "protect_rows"}

    def __init__(self, rows: List[Row], settings, seed: int):
        self.rows, self.settings = rows, settings
        self.rng = random.Random(seed + 1)
        self.groups: Dict[str, List[int]] = {}
        for i, row in enumerate(rows):
            self.groups.setdefault(row.env, []).append(i)

    def quota(self, env: str) -> int:
        if env == "IN":
            return 1
        if env in self.GROUP_QUOTA:
            return getattr(self.settings, self.GROUP_QUOTA[env])
        if env == "OUT_near":
            if content_aware(self.settings):
                return self.settings.near_miss_rows
            return max(1, int(round(self.settings.out_image * self.settings.near_miss_share)))
        return self.far_quota(self.settings)

    @staticmethod
    def far_quota(settings) -> int:
        return max(1, int(round(settings.out_image * (1 - settings.near_miss_share))))

    def sample(self) -> List[int]:
        chosen = []
        for env, idx in self.groups.items():
            chosen += self.rng.sample(idx, min(self.quota(env), len(idx)))
        return sorted(chosen)
