"""Train and evaluate MiniMMEdit's base model: a small ResNet tower + Llama decoder on easy-vqa.

    python -m easyedit_odedit.benchmark.base_model train --out easyedit_odedit/assets/minimmedit-base \
        [--steps N --seed S --threads T]
    python -m easyedit_odedit.benchmark.base_model evaluate --model DIR

Images are seen exactly as under EasyEdit (``pixels.model_pixels``: EasyEdit's
``BlipImageEvalProcessor(364)``, then the adapter's own resize to 64), computed once per run.

Recipe (see ``RECIPE``): every batch holds ``per_image`` questions on each of ``batch / per_image``
train images (the tower runs once per image), question families drawn with fixed weights, every
template equally often, and yes/no questions generated with the asked-about attribute true half of
the time, so the answer is never predictable from the text alone; plus a batch of text-only
questions. With every yes/no group equally likely the answer is match XOR negation and neither
alone correlates with it: training sat at chance for 900+ steps. So the positive groups come
twice as often as the negated ones (match alone then predicts the answer) for the first
``yesno_curriculum`` of the steps (1.0: all of them; switching to equal groups after 40% did not
help). A training-only auxiliary head on the pooled tower output predicts shape and colour; it
is not part of the saved adapter. The image tower trains with batch statistics (BatchNorm in
training mode); the saved adapter runs it in eval mode with the running statistics.

Accuracy is teacher-forced answer-token accuracy through ``MultimodalLMAdapter.forward`` (the
call EasyEdit makes): on every easy-vqa test question, per family, and on the held-out text-only
questions. Validation during training uses train images that are kept out of training.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import random
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..models.adapter import IGNORE, EmbeddedBatch, token_nll
from ..models.loading import build_conv_llama, load_adapter, save_adapter
from ..models.tokenizer import build_word_tokenizer
from . import world
from .pixels import model_pixels

IMAGE_SIZE = 64
VISION_CONFIG = dict(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1],
                     layer_type="basic", hidden_act="relu", downsample_in_first_stage=False)
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
RECIPE = dict(batch=128, per_image=4, text_batch=32, lr=2e-3, min_lr_ratio=0.05, warmup=100,
              weight_decay=0.01, grad_clip=1.0, family_weights={"colour": 1.0, "shape": 1.0, "yesno": 2.0},
              yesno_group_weights={"yesno.colour": 2.0, "yesno.colour.not": 1.0, "yesno.shape": 2.0,
                                   "yesno.shape.not": 1.0},
              yesno_curriculum=1.0,
              text_config={},
              text_weight=1.0, aux_weight=1.0, val_fraction=0.05, eval_every=250)
DEFAULT_STEPS = 2000


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------
def build_tokenizer():
    """Word-level tokenizer over every question, answer and text-only fact, plus the VQA prompt."""
    return build_word_tokenizer(world.vocabulary_texts(), extra_words=world.PROMPT_WORDS)


class RowEncoder:
    """(prompt, answer) -> (ids of ``prompt + " " + answer``, number of prompt ids), cached; the
    same split EasyEdit and the adapter make."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: Dict[Tuple[str, str], Tuple[List[int], int]] = {}

    def __call__(self, prompt: str, answer: str) -> Tuple[List[int], int]:
        key = (prompt, answer)
        if key not in self._cache:
            ids = self.tokenizer(f"{prompt} {answer}")["input_ids"]
            self._cache[key] = (ids, len(self.tokenizer.encode(prompt)))
        return self._cache[key]


def _text_rows(adapter, encoder: RowEncoder, rows: Sequence[Tuple[str, str]], prefix: Optional[torch.Tensor]):
    """Left-padded rows ``[prefix][pad][text]`` (the prefix: image tokens, or none); with explicit
    positions this is the adapter's ``[pad][image][text]`` layout up to float rounding."""
    encoded = [encoder(p, a) for p, a in rows]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(rows), width), adapter.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row, n_prompt) in enumerate(encoded):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
        labels[i, width - len(row) + n_prompt:] = torch.tensor(row[n_prompt:])
    embeds = adapter.language_model.get_input_embeddings()(ids)
    if prefix is not None:
        embeds = torch.cat([prefix, embeds], dim=1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), mask], dim=1)
        labels = torch.cat([torch.full(prefix.shape[:2], IGNORE, dtype=torch.long), labels], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return EmbeddedBatch(embeds, mask, positions, labels)


# ---------------------------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------------------------
class QuestionSampler:
    """Balanced image questions on given images: family by weight, then paraphrase group and
    template uniformly; yes/no slots name the image's own attribute half of the time."""

    def __init__(self, images: Sequence[world.Image], family_weights: Dict[str, float], rng: random.Random,
                 group_weights: Optional[Dict[str, float]] = None):
        self.images, self.rng = list(images), rng
        self.families = list(family_weights)
        self.weights = [family_weights[f] for f in self.families]
        self.group_weights = dict(group_weights or {})

    def question(self, image: world.Image) -> Tuple[str, str, str]:
        """(question, answer, family)."""
        family = self.rng.choices(self.families, self.weights)[0]
        groups = sorted({t.group for t in world.templates(family)})
        group = self.rng.choices(groups, [self.group_weights.get(g, 1.0) for g in groups])[0]
        template = self.rng.choice(world.templates(group))
        slot_value = None
        if family == "yesno":
            truth = image.colour if template.slot == "colour" else image.shape
            values = world.COLOURS if template.slot == "colour" else world.SHAPES
            slot_value = truth if self.rng.random() < 0.5 else self.rng.choice([v for v in values if v != truth])
        text = world.question_for(template, image.shape, image.colour, slot_value)
        return text, world.answer(template, slot_value, image.shape, image.colour), family


class AuxHead(nn.Module):
    """Training only: shape and colour from the pooled tower grid (mean and max)."""

    def __init__(self, dim: int):
        super().__init__()
        self.shape = nn.Linear(2 * dim, len(world.SHAPES))
        self.colour = nn.Linear(2 * dim, len(world.COLOURS))

    def forward(self, grid: torch.Tensor):
        pooled = torch.cat([grid.mean(dim=(2, 3)), grid.amax(dim=(2, 3))], dim=1)
        return self.shape(pooled), self.colour(pooled)


def _lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def split_validation(images: Sequence[world.Image], fraction: float, seed: int):
    """(train, validation) train-split images; the validation images are never trained on."""
    order = list(images)
    random.Random(seed).shuffle(order)
    n_val = int(round(len(order) * fraction))
    return sorted(order[n_val:], key=lambda im: im.id), sorted(order[:n_val], key=lambda im: im.id)


# ---------------------------------------------------------------------------------------------
# Evaluation (through the adapter's own forward, as EasyEdit calls it)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def answer_accuracy(adapter, rows: Sequence[Tuple[str, str, Optional[torch.Tensor]]], batch_size: int = 256) -> List[bool]:
    """Per row (prompt, answer, image or None): are all answer tokens the argmax of the previous
    position (teacher forcing)? Image rows: ``text_input = prompt + " " + answer``,
    ``prompts_len = len(tok.encode(prompt))``, as EasyEdit builds them."""
    was_training = adapter.training
    adapter.eval()
    out: List[bool] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images = [im for _, _, im in chunk]
        samples = {"text_input": [f"{p} {a}" for p, a, _ in chunk],
                   "prompts_len": [len(adapter.tokenizer.encode(p)) for p, _, _ in chunk],
                   "image": None if all(im is None for im in images) else images, "labels": None}
        result = adapter(samples)
        pred, labels = result.logits[:, :-1].argmax(-1), result.labels[:, 1:]
        keep = labels != IGNORE
        out += (((pred == labels) | ~keep).all(dim=1) & keep.any(dim=1)).tolist()
    adapter.train(was_training)
    return out


def _mean(flags: Sequence[bool]) -> float:
    return float(sum(flags)) / max(1, len(flags))


def evaluate_model(adapter, pixels_by_path: Optional[Dict[str, torch.Tensor]] = None,
                   split: str = "test", limit_per_family: Optional[int] = None,
                   seed: int = 0) -> Dict[str, float]:
    """Accuracy (%) on every easy-vqa question of ``split`` (all images, kept or not) per family,
    and on the text-only questions (``text_train`` / ``text_heldout``)."""
    texts, answers, image_ids = world.raw_questions(split)
    paths = world.image_paths(split)
    if pixels_by_path is None:
        ordered = [paths[i] for i in sorted(paths)]
        pixels_by_path = dict(zip(ordered, model_pixels(ordered, adapter.image_size)))
    by_family: Dict[str, list] = defaultdict(list)
    for text, ans, image_id in zip(texts, answers, image_ids):
        template, _ = world.parse_question(text)
        by_family[template.family].append((world.image_prompt(text), ans, pixels_by_path[paths[image_id]]))
    result: Dict[str, float] = {}
    rng = random.Random(seed)
    for family in world.FAMILIES:
        rows = by_family[family]
        if limit_per_family and len(rows) > limit_per_family:
            rows = rng.sample(rows, limit_per_family)
        result[family] = round(100 * _mean(answer_accuracy(adapter, rows)), 2)
        result[f"n_{family}"] = len(rows)
    for text_split in world.TEXT_SPLITS:
        rows = [(q.text, q.answer, None) for q in world.text_questions(text_split)]
        result[f"text_{text_split}"] = round(100 * _mean(answer_accuracy(adapter, rows)), 2)
        result[f"n_text_{text_split}"] = len(rows)
    return result


def _validation_rows(val_images: Sequence[world.Image], pixels_by_path, per_family: int, seed: int):
    """easy-vqa's own questions on the validation images, up to ``per_family`` per family."""
    ids = {im.id: im for im in val_images}
    rows: Dict[str, list] = defaultdict(list)
    for q in world.questions("train"):
        if q.image_id in ids:
            rows[q.family].append((world.image_prompt(q.text), q.answer, pixels_by_path[ids[q.image_id].path]))
    rng = random.Random(seed)
    return {f: rng.sample(r, min(per_family, len(r))) for f, r in rows.items()}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def train(out: str, steps: int = DEFAULT_STEPS, seed: int = 0, threads: int = 1,
          recipe: Optional[dict] = None, command: Optional[str] = None, progress: bool = True):
    """Train the base model and save it with ``save_adapter``; returns (adapter, accuracy)."""
    torch.set_num_threads(threads)
    recipe = dict(RECIPE, **(recipe or {}))
    seed_everything(seed)
    rng = random.Random(seed)

    tokenizer = build_tokenizer()
    adapter = build_conv_llama(tokenizer, IMAGE_SIZE, VISION_CONFIG, dict(TEXT_CONFIG, **recipe["text_config"]))
    aux = AuxHead(VISION_CONFIG["hidden_sizes"][-1])
    encoder = RowEncoder(tokenizer)

    t0 = time.time()
    kept = world.images("train")
    train_images, val_images = split_validation(kept, recipe["val_fraction"], seed)
    paths = [im.path for im in kept]
    pixels_by_path = dict(zip(paths, model_pixels(paths, IMAGE_SIZE)))
    train_pixels = torch.stack([pixels_by_path[im.path] for im in train_images])
    shape_ids = torch.tensor([world.SHAPES.index(im.shape) for im in train_images])
    colour_ids = torch.tensor([world.COLOURS.index(im.colour) for im in train_images])
    val_rows = _validation_rows(val_images, pixels_by_path, 200, seed)
    text_train = [(q.text, q.answer) for q in world.text_questions("train")]
    prep_seconds = time.time() - t0

    sampler = QuestionSampler(train_images, recipe["family_weights"], rng, recipe["yesno_group_weights"])
    params = list(adapter.parameters()) + list(aux.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, steps, recipe["warmup"], recipe["min_lr_ratio"]))

    grids: List[torch.Tensor] = []
    hook = adapter.image_encoder.tower.register_forward_hook(lambda m, i, o: grids.append(o.last_hidden_state))
    n_images = recipe["batch"] // recipe["per_image"]
    history, val_acc = [], {}
    t_train = time.time()
    bar = tqdm(range(steps), disable=not progress, dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        if step == int(recipe["yesno_curriculum"] * steps):
            sampler.group_weights = {}  # every paraphrase group equally often from here on
        adapter.train()
        adapter.image_encoder.train()  # batch statistics while the base model learns
        aux.train()
        pick = [rng.randrange(len(train_images)) for _ in range(n_images)]
        rows, row_image = [], []
        for j, index in enumerate(pick):
            for _ in range(recipe["per_image"]):
                question, ans, _ = sampler.question(train_images[index])
                rows.append((world.image_prompt(question), ans))
                row_image.append(j)
        grids.clear()
        image_tokens = adapter.image_encoder(train_pixels[pick])
        image_batch = _text_rows(adapter, encoder, rows, image_tokens[torch.tensor(row_image)])
        loss_image = token_nll(adapter.decode(image_batch)[0], image_batch.labels)
        text_batch = _text_rows(adapter, encoder, rng.sample(text_train, recipe["text_batch"]), None)
        loss_text = token_nll(adapter.decode(text_batch)[0], text_batch.labels)
        shape_logits, colour_logits = aux(grids[-1])
        loss_aux = (F.cross_entropy(shape_logits, shape_ids[pick]) + F.cross_entropy(colour_logits, colour_ids[pick]))
        loss = loss_image + recipe["text_weight"] * loss_text + recipe["aux_weight"] * loss_aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe["grad_clip"])
        optimizer.step()
        schedule.step()
        if (step + 1) % recipe["eval_every"] == 0 or step + 1 == steps:
            val_acc = {f: round(100 * _mean(answer_accuracy(adapter, r)), 1) for f, r in val_rows.items()}
            history.append({"step": step + 1, "seconds": round(time.time() - t_train, 1), **val_acc})
        bar.set_postfix(loss=f"{loss_image.item():.3f}", text=f"{loss_text.item():.3f}",
                        aux=f"{loss_aux.item():.3f}", **{k[:3]: v for k, v in val_acc.items()}, refresh=False)
    hook.remove()
    train_seconds = time.time() - t_train
    adapter.eval()

    accuracy = evaluate_model(adapter)
    os.makedirs(out, exist_ok=True)
    save_adapter(adapter, out, seed=seed, steps=steps, threads=threads, accuracy=accuracy,
                 command=command or _command(["train", "--out", out, "--steps", str(steps), "--seed", str(seed),
                                              "--threads", str(threads)]),
                 train_seconds=round(train_seconds, 1), prep_seconds=round(prep_seconds, 1),
                 recipe=recipe, validation_history=history, torch_version=torch.__version__,
                 world={"dataset": "easy-vqa 1.0 (PyPI easy_vqa)", "split_seed": world.SPLIT_SEED,
                        "train_images_kept": len(kept), "train_images_dropped": len(world.dropped_images("train")),
                        "validation_images": len(val_images),
                        "rephrase_templates": world.REPHRASE_TEMPLATES,
                        "image_pipeline": "EasyEdit BlipImageEvalProcessor(364) then bilinear antialias to 64"},
                 note="accuracy: teacher-forced answer-token accuracy (%) through MultimodalLMAdapter.forward; "
                      "colour/shape/yesno on every easy-vqa test question, text_* on the text-only questions")
    return adapter, accuracy


def _command(args: Sequence[str]) -> str:
    return "python -m easyedit_odedit.benchmark.base_model " + " ".join(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easyedit_odedit.benchmark.base_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_train = sub.add_parser("train", help="train the base model and save it")
    p_train.add_argument("--out", required=True)
    p_train.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--threads", type=int, default=1)
    p_train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a recipe entry (Python literal), e.g. --set lr=1e-3")
    p_eval = sub.add_parser("evaluate", help="accuracy of a saved model on easy-vqa test and text questions")
    p_eval.add_argument("--model", required=True)
    p_eval.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.cmd == "train":
        overrides = {}
        for item in args.set:
            key, _, value = item.partition("=")
            if key not in RECIPE:
                parser.error(f"unknown recipe key {key!r}; known: {sorted(RECIPE)}")
            overrides[key] = ast.literal_eval(value)
        cli = ["train", "--out", args.out, "--steps", str(args.steps), "--seed", str(args.seed),
               "--threads", str(args.threads)] + [f"--set {s}" for s in args.set]
        _, accuracy = train(args.out, args.steps, args.seed, args.threads, overrides, _command(cli))
    else:
        torch.set_num_threads(args.threads)
        accuracy = evaluate_model(load_adapter(args.model))
    for key, value in accuracy.items():
        if not key.startswith("n_"):
            print(f"{key:>14}: {value:6.2f}%  (n={accuracy.get('n_' + key)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
