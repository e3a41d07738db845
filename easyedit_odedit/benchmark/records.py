"""MiniMMEdit edit records in MMEdit's E-VQA JSON format, and the train-split locality pool.

    python -m easyedit_odedit.benchmark.records --model DIR --out DIR --n-train N --n-test N --seed S

writes ``OUT/train.json``, ``OUT/test.json`` (JSON lists of E-VQA records), ``OUT/locality_pool.json``
(train split only) and ``OUT/images/`` (the image root: every image a record or the pool names,
copied as PNG; record paths are relative to it, e.g. ``test/123.png``).

One record is one conjunctive concept edit with an explicit scope: "for images showing shape S in
colour C, the answer to question family Q is now A'":

* ``image`` + ``src``: an image of (S, C) and a question of family Q in an editor-reachable
  template; ``pred``: the base model's own answer; ``alt``: A' (another colour / shape than the
  true answer and than ``pred``);
* ``rephrase``: the question in the family's held-out template (T-Gen). Train-split records use
  another editor-reachable template instead, so that hosts trained on them (MEND, SERAC) never see
  a held-out template;
* ``image_rephrase``: another image of (S, C) (I-Gen);
* ``m_loc``/``m_loc_q``/``m_loc_a``: a near miss, alternately same shape other colour and same
  colour other shape, asked the edit's question template, with its true answer (I-Loc);
* ``loc``/``loc_ans``: a text-only question (held-out split for test records, train split for
  train records) (T-Loc).

Extra fields (EasyEdit ignores them), each a list of ``{"image", "question", "answer"}``:
``eval_gen`` (up to 5 more images of (S, C), answer A'), ``eval_near_shape`` (same shape, other
colour), ``eval_near_colour`` (same colour, other shape), ``eval_far`` (other shape and colour),
``eval_other_family`` (the other family's questions on the edit image); the locality lists carry
true answers. Plus ``edit`` (S, C, Q, template ids, the true answer) for analysis. No image is used
twice within one record. Consecutive windows of ``NO_REPEAT_WINDOW`` records never repeat an
(S, C, Q) scope, so sequential editing does not overwrite its own edits.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..models.loading import load_adapter
from . import world
from .pixels import model_pixels

N_EXTRA = 5
NO_REPEAT_WINDOW = 10
EXTRA_FIELDS = ("eval_gen", "eval_near_shape", "eval_near_colour", "eval_far", "eval_other_family")
EVQA_FIELDS = ("src", "pred", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans",
               "m_loc", "m_loc_q", "m_loc_a")
EDIT_FAMILIES = ("colour", "shape")


def image_relpath(image: world.Image) -> str:
    """Path of an image relative to the records' image root."""
    return f"{image.split}/{image.id}.png"


def _other(family: str) -> str:
    return "shape" if family == "colour" else "colour"


def _values(family: str) -> Tuple[str, ...]:
    return world.COLOURS if family == "colour" else world.SHAPES


def scopes(n: int, rng: random.Random) -> List[Tuple[str, str, str]]:
    """n edit scopes (shape, colour, family): shuffled rounds over all 48 combinations, each round
    re-drawn until no scope repeats within ``NO_REPEAT_WINDOW`` consecutive records."""
    every = [(s, c, f) for s in world.SHAPES for c in world.COLOURS for f in EDIT_FAMILIES]
    out: List[Tuple[str, str, str]] = []
    while len(out) < n:
        round_ = list(every)
        for _ in range(1000):
            rng.shuffle(round_)
            if not set(out[-NO_REPEAT_WINDOW:]) & set(round_[:NO_REPEAT_WINDOW]):
                break
        out += round_
    return out[:n]


class _Pools:
    """Images of one split by attributes."""

    def __init__(self, split: str):
        self.split = split
        self.by_attr: Dict[Tuple[str, str], List[world.Image]] = {}
        for image in world.images(split):
            self.by_attr.setdefault((image.shape, image.colour), []).append(image)

    def matching(self, shape=None, colour=None, not_shape=None, not_colour=None) -> List[world.Image]:
        return [im for (s, c), ims in sorted(self.by_attr.items()) for im in ims
                if shape in (None, s) and colour in (None, c) and s != not_shape and c != not_colour]


def _sample(rng: random.Random, images: Sequence[world.Image], k: int, used: set) -> List[world.Image]:
    free = [im for im in images if im.id not in used]
    picked = rng.sample(free, min(k, len(free)))
    used.update(im.id for im in picked)
    return picked


def _item(image: world.Image, template: world.Template, answer: Optional[str] = None) -> dict:
    question = world.question_for(template, image.shape, image.colour)
    truth = world.answer(template, None, image.shape, image.colour)
    return {"image": image_relpath(image), "question": question, "answer": answer or truth}


def build_records(split: str, n: int, seed: int, predict=None) -> List[dict]:
    """n E-VQA records on ``split`` images (``train`` or ``test``). ``predict(list of (image,
    question)) -> list of answers`` gives ``pred`` (the base model's answer); without it ``pred``
    is the true answer."""
    if split not in world.SPLITS:
        raise ValueError(f"split must be one of {world.SPLITS}, got {split!r}")
    rng = random.Random(f"{seed}:{split}")
    pools = _Pools(split)
    text_split = "heldout" if split == "test" else "train"
    texts = world.text_questions(text_split)
    records = []
    for index, (shape, colour, family) in enumerate(scopes(n, rng)):
        used: set = set()
        same = pools.matching(shape=shape, colour=colour)
        image, image_rephrase = _sample(rng, same, 2, used)
        src_template = rng.choice(world.editor_templates(family))
        if split == "test":
            rephrase_template = world.rephrase_template(family)
        else:
            rephrase_template = rng.choice([t for t in world.editor_templates(family) if t.id != src_template.id])
        src = world.question_for(src_template, shape, colour)
        truth = world.answer(src_template, None, shape, colour)
        near_kind = "near_shape" if index % 2 == 0 else "near_colour"
        near_shape = pools.matching(shape=shape, not_colour=colour)
        near_colour = pools.matching(colour=colour, not_shape=shape)
        far = pools.matching(not_shape=shape, not_colour=colour)
        m_loc_image = _sample(rng, near_shape if near_kind == "near_shape" else near_colour, 1, used)[0]
        m_loc = _item(m_loc_image, src_template)
        text = rng.choice(texts)
        record = {
            "src": src, "pred": truth, "alt": None,
            "rephrase": world.question_for(rephrase_template, shape, colour),
            "image": image_relpath(image), "image_rephrase": image_relpath(image_rephrase),
            "loc": text.text, "loc_ans": text.answer,
            "m_loc": m_loc["image"], "m_loc_q": m_loc["question"], "m_loc_a": m_loc["answer"],
            "edit": {"shape": shape, "colour": colour, "family": family, "answer": truth,
                     "src_template": src_template.id, "rephrase_template": rephrase_template.id,
                     "m_loc_kind": near_kind, "split": split, "index": index},
        }
        gen = _sample(rng, same, N_EXTRA, used)
        record["eval_near_shape"] = [_item(im, src_template) for im in _sample(rng, near_shape, N_EXTRA, used)]
        record["eval_near_colour"] = [_item(im, src_template) for im in _sample(rng, near_colour, N_EXTRA, used)]
        record["eval_far"] = [_item(im, src_template) for im in _sample(rng, far, N_EXTRA, used)]
        record["eval_other_family"] = [_item(image, t) for t in world.editor_templates(_other(family))]
        record["_gen_images"] = gen
        records.append(record)
    preds = ([truth_of(r) for r in records] if predict is None else
             predict([(r["image"], world.image_prompt(r["src"])) for r in records]))
    for record, pred in zip(records, preds):
        family = record["edit"]["family"]
        record["pred"] = pred
        choices = [v for v in _values(family) if v not in (record["edit"]["answer"], pred)]
        record["alt"] = rng.choice(choices)
        record["eval_gen"] = [{"image": image_relpath(im), "question": record["src"], "answer": record["alt"]}
                              for im in record.pop("_gen_images")]
    return records


def truth_of(record: dict) -> str:
    return record["edit"]["answer"]


def locality_pool(n_images: int, seed: int) -> List[dict]:
    """Train-split entries an editor may draw on at edit time: ``{"prompt", "answer", "image"}``
    for easy-vqa's own questions on train images (VQA prompt, true answer; held-out rephrase
    templates left out) and ``{"prompt", "answer"}`` for every train-split text-only question.
    The format ODEdit's ``environments.locality_pool`` reads."""
    rng = random.Random(f"{seed}:pool")
    index = world.image_index("train")
    candidates = [q for q in world.questions("train") if not world.is_rephrase_template(q.template_id)]
    picked = rng.sample(candidates, min(n_images, len(candidates)))
    entries = [{"prompt": world.image_prompt(q.text), "answer": q.answer,
                "image": image_relpath(index[q.image_id])} for q in picked]
    entries += [{"prompt": q.text, "answer": q.answer} for q in world.text_questions("train")]
    return entries


def referenced_images(records: Iterable[dict]) -> List[str]:
    """Every image path (relative to the image root) that records or pool entries name."""
    paths = set()
    for record in records:
        for key in ("image", "image_rephrase", "m_loc"):
            if record.get(key):
                paths.add(record[key])
        for key in EXTRA_FIELDS:
            paths.update(item["image"] for item in record.get(key, []))
    return sorted(paths)


def copy_images(relpaths: Iterable[str], image_root: str) -> int:
    """Copy the easy-vqa PNGs named by relative paths (``split/id.png``) under ``image_root``."""
    sources = {split: world.image_paths(split) for split in world.SPLITS}
    count = 0
    for rel in relpaths:
        split, name = rel.split("/")
        target = os.path.join(image_root, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            shutil.copyfile(sources[split][int(name[:-4])], target)
        count += 1
    return count


def model_predictor(adapter, batch_size: int = 128):
    """``predict`` for ``build_records``: the model's greedy first answer token after the VQA
    prompt, on the image as EasyEdit processes it."""
    sources = {split: world.image_paths(split) for split in world.SPLITS}

    def predict(rows: Sequence[Tuple[str, str]]) -> List[str]:
        out = []
        adapter.eval()
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            paths = [sources[rel.split("/")[0]][int(rel.split("/")[1][:-4])] for rel, _ in chunk]
            pixels = model_pixels(paths, adapter.image_size)
            with torch.no_grad():
                batch = adapter.embed([p for _, p in chunk], list(pixels), [0] * len(chunk))
                logits, _ = adapter.decode(batch)
            out += adapter.tokenizer.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
        return out

    return predict


def write_benchmark(model_dir: str, out: str, n_train: int, n_test: int, seed: int,
                    pool_images: int = 2000) -> Dict[str, str]:
    """Write train/test records, the locality pool and the image root; returns their paths."""
    predict = model_predictor(load_adapter(model_dir))
    os.makedirs(out, exist_ok=True)
    image_root = os.path.join(out, "images")
    paths = {"image_root": image_root}
    all_entries: List[dict] = []
    for split, n in (("train", n_train), ("test", n_test)):
        records = build_records(split, n, seed, predict)
        paths[split] = os.path.join(out, f"{split}.json")
        with open(paths[split], "w") as f:
            json.dump(records, f, indent=1)
        all_entries += records
    pool = locality_pool(pool_images, seed)
    paths["locality_pool"] = os.path.join(out, "locality_pool.json")
    with open(paths["locality_pool"], "w") as f:
        json.dump(pool, f, indent=1)
    copy_images(set(referenced_images(all_entries)) | {e["image"] for e in pool if "image" in e}, image_root)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"model": os.path.abspath(model_dir), "seed": seed, "n_train": n_train, "n_test": n_test,
                   "pool_images": pool_images, "split_seed": world.SPLIT_SEED,
                   "rephrase_templates": world.REPHRASE_TEMPLATES, **paths}, f, indent=1)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easyedit_odedit.benchmark.records", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the base model directory (gives `pred`)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = write_benchmark(args.model, args.out, args.n_train, args.n_test, args.seed, args.pool_images)
    for key, value in paths.items():
        print(f"{key:>14}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
