"""Shared by the examples: a small synthetic E-VQA world, hparams loading, editor construction.

Without ``--hparams`` the examples build a tiny random model (``save_tiny_conv_llama``) and use
``hparams/ODEdit/tiny-ft-l.yaml`` with its paths pointed at a temporary folder. With ``--hparams``
they use that YAML (e.g. ``hparams/ODEdit/blip2-ft-l.yaml`` after replacing its paths); ``--data``
and ``--image-root`` then name a real E-VQA JSON and its image folder, otherwise the synthetic
records are used (plain English words, so any real tokenizer encodes them).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

import numpy as np
import yaml
from PIL import Image

import easyedit_odedit  # noqa: F401  (registers ODEdit in EasyEdit before the editor is built)
from easyedit_odedit import ODEditHyperParams, compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "hparams", "ODEdit", "tiny-ft-l.yaml")
COLOURS = ["green", "blue", "red", "yellow", "brown", "teal", "black", "gray"]
SHAPES = ["circle", "rectangle", "triangle"]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--hparams", help="an ODEdit YAML (default: a tiny random model with tiny-ft-l.yaml)")
    p.add_argument("--data", help="an E-VQA JSON (default: synthetic records written to --work)")
    p.add_argument("--image-root", help="folder the --data image paths are relative to "
                                        "(default: the YAML's coco_image)")
    p.add_argument("--work", default="results/examples", help="folder for the synthetic world, logs and metrics")
    p.add_argument("--num-steps", type=int, help="override host_hparams.num_steps")
    return p


def write_world(root: str, n_records: int) -> dict:
    """Images of one coloured shape each, ``n_records`` E-VQA records (a question about the image
    and a counterfactual answer) and a train-split locality pool."""
    root = os.path.abspath(root)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    rng = np.random.default_rng(0)
    n_images = max(8, 2 * n_records + 2)
    for i in range(n_images):
        pixels = np.full((64, 64, 3), 230, dtype=np.uint8)
        colour = rng.integers(0, 255, size=3)
        y, x, s = rng.integers(8, 32), rng.integers(8, 32), rng.integers(12, 24)
        pixels[y:y + s, x:x + s] = colour
        pixels = np.clip(pixels.astype(int) + rng.integers(-12, 12, size=pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "img", f"{i}.png"))
    questions = [("what color is the shape ?", "what is the color of the shape ?", COLOURS),
                 ("what shape is in the image ?", "what is the shape in the image ?", SHAPES),
                 ("is there a circle ?", "does the image contain a circle ?", ["yes", "no"])]
    records = []
    for i in range(n_records):
        src, rephrase, answers = questions[i % len(questions)]
        records.append({"src": src, "pred": answers[(i + 1) % len(answers)], "alt": answers[i % len(answers)],
                        "rephrase": rephrase, "image": f"img/{i}.png", "image_rephrase": f"img/{n_images - 1 - i}.png",
                        "loc": f"what is {['one', 'two', 'three'][i % 3]} plus two ?",
                        "loc_ans": ["three", "four", "five"][i % 3],
                        "m_loc": f"img/{(i + n_records) % n_images}.png",
                        "m_loc_q": "does the image contain a triangle ?", "m_loc_a": ["yes", "no"][i % 2]})
    pool = [dict(r, image=f"img/{(i + 3) % n_images}.png", alt="") for i, r in enumerate(records * 2)]
    paths = {"root": root, "data": os.path.join(root, "vqa_edit.json"), "pool": os.path.join(root, "vqa_train.json")}
    with open(paths["data"], "w") as f:
        json.dump(records, f, indent=1)
    with open(paths["pool"], "w") as f:
        json.dump(pool, f, indent=1)
    return paths


def set_up(args, n_records: int):
    """Work in ``args.work`` (EasyEdit writes logs/run.log in the current directory); the synthetic
    world unless ``--data`` names real records; the hparams and EasyEdit's editor.
    Returns (world or None, hparams, editor)."""
    os.makedirs(args.work, exist_ok=True)
    os.chdir(args.work)
    args.work = "."
    world = None if args.data else write_world("world", n_records=n_records)
    hp = load_hparams(args, world)
    return world, hp, build_editor(hp)


def load_hparams(args, world: Optional[dict]) -> ODEditHyperParams:
    """The YAML as given, with the synthetic world's paths (and the tiny model) filled in when used."""
    path = args.hparams or TINY_YAML
    with open(path) as f:
        config = yaml.safe_load(f)
    if not args.hparams:
        from easyedit_odedit.models.tiny import save_tiny_conv_llama

        model_dir = os.path.join(args.work, "tiny-model")
        if not os.path.isdir(model_dir):
            save_tiny_conv_llama(model_dir)
        config.update(name=os.path.abspath(model_dir), tokenizer_name=os.path.abspath(model_dir))
    if world is not None:
        root = os.path.abspath(world["root"])
        config.update(coco_image=root, rephrase_image=root)
        config.setdefault("environments", {}).update(locality_pool=world["pool"], locality_image_root=root)
    if args.num_steps:
        config["host_hparams"]["num_steps"] = args.num_steps
    return ODEditHyperParams.from_dict(config, source_path=path)


def build_editor(hp):
    """EasyEdit's own editor; for GitHub main's HF models prepared for ODEdit (image loader and
    processor, see easyedit_odedit/models/hf_native.py)."""
    from easyeditor import MultimodalEditor

    from easyedit_odedit.models import hf_native

    return hf_native.prepare_editor(MultimodalEditor.from_hparams(hp), max_side=448)


def unwrap(model):
    """What ODEdit keeps its sequential-edit history under (the model, or main HF models' view)."""
    from easyedit_odedit.models import hf_native

    return hf_native.view_for(model) if hf_native.is_native(model) else model


def records(args, world: Optional[dict]) -> List[dict]:
    with open(args.data or world["data"]) as f:
        return json.load(f)


def image_path(hp, relative: str, args) -> str:
    """Absolute: the PyPI release joins it to coco_image (a no-op for absolute paths), main opens it as given."""
    root = args.image_root or hp.coco_image or ""
    return os.path.abspath(os.path.join(root, relative))


def edit_arguments(hp, recs: List[dict], args) -> dict:
    """``MultimodalEditor.edit`` arguments for E-VQA records (the VQADataset prompt template)."""
    template = "Question: {} Short answer:"
    return dict(prompts=[template.format(r["src"]) for r in recs], targets=[r["alt"] for r in recs],
                image=[image_path(hp, r["image"], args) for r in recs],
                rephrase_prompts=[template.format(r["rephrase"]) for r in recs],
                rephrase_image=[image_path(hp, r["image_rephrase"], args) for r in recs],
                locality_inputs={"text": {"prompt": [r["loc"] for r in recs],
                                          "ground_truth": [r["loc_ans"] for r in recs]},
                                 "vision": {"image": [image_path(hp, r["m_loc"], args) for r in recs],
                                            "prompt": [template.format(r["m_loc_q"]) for r in recs],
                                            "ground_truth": [r["m_loc_a"] for r in recs]}})


def numeric(section: dict) -> dict:
    return {k: round(float(v), 4) for k, v in section.items() if k.endswith("_acc")}


def flavour() -> str:
    return compat.flavour()
