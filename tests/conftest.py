import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import easyedit_odedit  # noqa: F401  (registers ODEdit, applies the host shims)
from easyedit_odedit.models.tiny import save_tiny_arch, save_tiny_conv_llama

PROMPT = "question : what color is the shape ? short answer :"


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny random model, a few PNGs and a train-split locality pool, in a temp folder."""
    root = tmp_path_factory.mktemp("world")
    save_tiny_conv_llama(str(root / "model"))
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(root / "img" / f"{i}.png")
    pool = [{"image": f"img/{i}.png", "src": "what color is the shape ?", "pred": "red", "alt": "blue",
             "rephrase": "what is the color of the shape ?", "image_rephrase": f"img/{(i + 2) % 8}.png",
             "loc": "what is two plus two ?", "loc_ans": "four", "m_loc": f"img/{(i + 1) % 8}.png",
             "m_loc_q": "what shape is in the image ?", "m_loc_a": "circle"} for i in range(6)]
    (root / "pool.json").write_text(json.dumps(pool))
    return root


# YAML prefix of the shipped real-model hparams -> the tiny model of the same transformers classes
# (``models.tiny.save_tiny_arch``: same module and parameter names) they are tested on.
TINY_ARCHS = {"blip2": "blip2-opt", "llava15": "llava-1.5", "qwen2vl": "qwen2-vl", "llava-onevision": "llava-onevision",
              "minigpt4": "minigpt4"}
MAIN_ONLY_ARCHS = ("qwen2vl", "llava-onevision")  # GitHub main's HF model path only
LAVIS_PATH_ARCHS = ("blip2", "minigpt4", "llava15")  # EasyEdit's LAVIS path (both versions): MEND and SERAC YAMLs
TINY_ARCH_LAYERS = 4


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(prefix)``: the folder of the tiny model for a YAML prefix, built once a session."""
    built = {}

    def get(prefix: str) -> str:
        if prefix not in built:
            folder = tmp_path_factory.mktemp("arch") / f"tiny-{TINY_ARCHS[prefix]}"  # main knows Qwen2-VL by name
            built[prefix] = save_tiny_arch(str(folder), TINY_ARCHS[prefix], layers=TINY_ARCH_LAYERS)
        return built[prefix]

    return get


def write_yaml(world, host="FT-L", host_hparams=None, **extra):
    config = {"alg_name": "ODEdit", "host": host,
              "host_hparams": host_hparams or {"layers": [-1], "num_steps": 6, "lr": 0.1},
              "model_name": "blip2", "name": str(world / "model"), "tokenizer_class": "PreTrainedTokenizerFast",
              "tokenizer_name": str(world / "model"), "device": 0, "coco_image": str(world),
              "rephrase_image": str(world), "environments": {"locality_pool": str(world / "pool.json")}}
    config.update(extra)
    path = world / f"cfg-{abs(hash(json.dumps(config, sort_keys=True, default=str)))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # EasyEdit writes logs/run.log in the current directory
    torch.manual_seed(0)


def edit_kwargs(world, rephrase="what is the color of the shape ?", loc_prompt="what is two plus three ?"):
    """Absolute image paths: the PyPI release joins them to coco_image, main reads them as given."""
    img = lambda i: str(world / "img" / f"{i}.png")  # noqa: E731
    return dict(prompts=[PROMPT], targets=["green"], image=[img(0)], rephrase_prompts=[rephrase],
                rephrase_image=[img(1)],
                locality_inputs={"text": {"prompt": [loc_prompt], "ground_truth": ["five"]},
                                 "vision": {"image": [img(2)], "prompt": ["what shape is in the image ?"],
                                            "ground_truth": ["circle"]}})
