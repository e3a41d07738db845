"""The plugin's MiniGPT-4 against EasyEdit's own MiniGPT-4 classes, at tiny sizes.

EasyEdit's ``MiniGPT4`` cannot be built on transformers 5 (see ``models/minigpt4.py``), but its EVA
ViT builds and runs, and its Q-Former builds once ``all_tied_weights_keys`` exists (here, inside the
test only). So the files the tiny folder holds are checked against those classes: the ViT file
loads strictly into EasyEdit's EVA ViT and gives the plugin's features after EasyEdit's position
interpolation; the Q-Former file has exactly the names EasyEdit's MiniGPT-4 keeps. One edit per
host through EasyEdit's editor is in ``tests/test_architectures.py`` (``minigpt4-*``).
"""
import json
import os
import shutil
from functools import partial

import pytest
import torch

from easyedit_odedit import compat
from easyedit_odedit.errors import ODEditError, ODEditFileNotFoundError
from easyedit_odedit.models import minigpt4
from easyedit_odedit.models.loading import MANIFEST, load_adapter
from easyedit_odedit.models.tiny import save_tiny_minigpt4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_minigpt4(str(tmp_path_factory.mktemp("mg4") / "minigpt4"), layers=2)


@pytest.fixture(scope="module")
def adapter(folder):
    return load_adapter(folder)


def _manifest(folder):
    with open(os.path.join(folder, MANIFEST)) as f:
        return json.load(f)


def _copy_with(folder, tmp_path, **changes):
    """The tiny folder with manifest fields changed (paths made absolute first)."""
    manifest = _manifest(folder)
    for field in ("llama", *minigpt4.CHECKPOINT_FIELDS):
        manifest[field] = os.path.join(folder, manifest[field])
    manifest.update(changes)
    return minigpt4.write_manifest(str(tmp_path / "changed"), **{k: v for k, v in manifest.items() if k != "architecture"})


def _easyedit_eva(settings, image_size):
    vision = settings["vision_config"]
    eva = compat.module("trainer.blip2_models.eva_vit")
    return eva, eva.VisionTransformer(
        img_size=image_size, patch_size=vision["patch_size"], use_mean_pooling=False, embed_dim=vision["hidden_size"],
        depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
        mlp_ratio=vision["intermediate_size"] / vision["hidden_size"], qkv_bias=True, drop_path_rate=0.0,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()


def test_vision_file_loads_into_easyedit_eva_and_gives_the_plugins_features(folder, adapter):
    manifest = _manifest(folder)
    eva_module, eva = _easyedit_eva(manifest, manifest["image_size"])
    state = torch.load(os.path.join(folder, manifest["vision"]))
    eva_module.interpolate_pos_embed(eva, state)  # EasyEdit's 224 -> 364 step, here 28 -> 42 pixels
    eva.load_state_dict(state, strict=True)
    ln_vision = torch.nn.LayerNorm(eva.num_features)  # LAVIS's ln_vision: a default-eps LayerNorm
    qformer_state = torch.load(os.path.join(folder, manifest["qformer"]))["model"]
    ln_vision.load_state_dict({k[len("ln_vision."):]: v for k, v in qformer_state.items() if k.startswith("ln_vision.")})
    pixels = torch.randn(2, 3, manifest["image_size"], manifest["image_size"])
    with torch.no_grad():
        expected = ln_vision(eva(pixels))
        ours = adapter.image_encoder.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def _easyedit_qformer(settings, monkeypatch):
    qformer_module = compat.module("trainer.blip2_models.Qformer")
    # transformers 5 sets this in post_init(), which EasyEdit's Q-Former never calls (test-only)
    monkeypatch.setattr(qformer_module.BertPreTrainedModel, "all_tied_weights_keys", {}, raising=False)
    q = settings["qformer_config"]
    config = qformer_module.BertConfig(vocab_size=30, hidden_size=q["hidden_size"], num_hidden_layers=q["num_hidden_layers"],
                                       num_attention_heads=q["num_attention_heads"], intermediate_size=q["intermediate_size"])
    config.encoder_width = settings["vision_config"]["hidden_size"]
    config.add_cross_attention, config.cross_attention_freq = True, q["cross_attention_frequency"]
    config.query_length = settings["num_query_tokens"]
    return qformer_module.BertLMHeadModel(config)


def test_qformer_file_has_the_names_easyedit_minigpt4_keeps(folder, adapter, monkeypatch):
    manifest = _manifest(folder)
    full = {f"Qformer.{k}" for k in _easyedit_qformer(manifest, monkeypatch).state_dict()}
    kept = {k for k in full if not minigpt4.UNUSED.match(k)}
    assert kept and kept < full  # MiniGPT-4 deletes the text branch and the LM head
    saved = set(torch.load(os.path.join(folder, manifest["qformer"]))["model"])
    assert saved - {"ln_vision.weight", "ln_vision.bias", "query_tokens"} == kept
    ours = {n for n in adapter.state_dict() if n.startswith("image_encoder.qformer.")}
    assert {minigpt4.parameter_name(k) for k in kept} == ours


def test_every_parameter_name_maps_to_easyedit_and_back(adapter):
    for name in adapter.state_dict():
        original = minigpt4.easyedit_name(name)
        assert original is not None and minigpt4.parameter_name(original) == name, name
    assert minigpt4.easyedit_name("language_model.model.layers.1.mlp.down_proj.weight") == \
        "llama_model.model.layers.1.mlp.down_proj.weight"


def test_minigpt4_checkpoint_with_training_state_loads(folder, adapter, tmp_path):
    """pretrained_minigpt4.pth holds the optimiser and config next to ``model``."""
    projection = {"model": {k: v + 1 for k, v in torch.load(os.path.join(folder, "projection.pth"))["model"].items()},
                  "optimizer": {"state": {}}, "config": {"arch": "mini_gpt4"}, "epoch": 3}
    torch.save(projection, tmp_path / "pretrained_minigpt4.pth")
    loaded = load_adapter(_copy_with(folder, tmp_path, projection=str(tmp_path / "pretrained_minigpt4.pth")))
    torch.testing.assert_close(loaded.image_encoder.llama_proj.weight, adapter.image_encoder.llama_proj.weight + 1)


def test_images_are_wrapped_in_minigpt4s_prompt_and_text_has_no_bos(adapter):
    before, after = adapter.config["image_prompt"].split(minigpt4.IMAGE_SLOT)
    n_wrap = sum(len(adapter.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in (before, after))
    with torch.no_grad():
        tokens = adapter.encode_images(torch.randn(1, 3, 364, 364))
    assert tokens.shape[1] == adapter.config["num_query_tokens"] + n_wrap
    assert adapter.tokenizer("red")["input_ids"] == adapter.tokenizer("red", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("change,error,words", [
    ({"vision": "missing.pth"}, ODEditFileNotFoundError, "vision"),
    ({"qformer_config": dict(minigpt4.BLIP2_QFORMER, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2)}, ODEditError, "do not match the checkpoint shapes"),
    ({"image_prompt": "no slot"}, ODEditError, "image_prompt"),
    ({"dtype": "int8"}, ODEditError, "dtype"),
])
def test_bad_manifest_is_a_clear_error(folder, tmp_path, change, error, words):
    with pytest.raises(error, match=words):
        load_adapter(_copy_with(folder, tmp_path, **change))


def test_a_checkpoint_missing_image_weights_is_a_clear_error(folder, tmp_path):
    shutil.copy(os.path.join(folder, "vision.pth"), tmp_path / "vision.pth")
    vision = {k: v for k, v in torch.load(tmp_path / "vision.pth").items() if not k.startswith("blocks.1.")}
    torch.save(vision, tmp_path / "vision.pth")
    with pytest.raises(ODEditError, match="image-side weights unset"):
        load_adapter(_copy_with(folder, tmp_path, vision=str(tmp_path / "vision.pth")))
