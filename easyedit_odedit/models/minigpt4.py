"""MiniGPT-4 (EVA-CLIP-g ViT + BLIP-2 Q-Former + ``llama_proj`` + Vicuna) from transformers classes.

EasyEdit's own ``MiniGPT4`` class cannot be built on transformers 5: its LAVIS Q-Former (a 2022
copy of transformers' BERT) calls ``init_weights()`` without ``post_init()`` (``'BertModel' object
has no attribute 'all_tied_weights_keys'``) and its forward calls ``invert_attention_mask``, which
transformers 5 removed; its EVA ViT sizes are hard-coded (1.0 B parameters). The plugin therefore
composes the same network from transformers' ``Blip2VisionModel`` (the EVA ViT-g layout, with
``ln_vision`` as its ``post_layernorm``), ``Blip2QFormerModel`` (the Q-Former's query branch, which
is all MiniGPT-4 uses) and ``LlamaForCausalLM``, and loads the checkpoints EasyEdit's MiniGPT-4
YAMLs name (``state_dict_file``, ``qformer_checkpoint``, ``pretrained_ckpt``, the Vicuna folder).

A plugin MiniGPT-4 is a folder holding only ``odedit_model.json``, which names those four paths
(``python -m easyedit_odedit.models.minigpt4 --help`` writes it). ``name`` in the YAML points at
the folder; EasyEdit's ``MiniGPT4(llama_model=<folder>)`` call is routed here by ``compat``.

Parameter names are EasyEdit's with its top-level modules renamed (``parameter_name`` below):
``llama_model.X`` -> ``language_model.X``, ``llama_proj`` -> ``image_encoder.llama_proj``, the ViT,
``ln_vision``, Q-Former and query tokens -> ``image_encoder.{vision_model,qformer,query_tokens}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from ..errors import ODEditError, ODEditFileNotFoundError
from .adapter import MultimodalLMAdapter
from .encoders import MiniGPT4ImageEncoder
from .manifest import MANIFEST

LOG = logging.getLogger(__name__)

ARCHITECTURE = "minigpt4"
# The checkpoints, in the order EasyEdit's MiniGPT4 loads them (later files override earlier ones).
CHECKPOINT_FIELDS = ("vision", "qformer", "projection")
# EasyEdit's defaults: EVA-CLIP-g (create_eva_vit_g), bert-base Q-Former with cross-attention every
# second layer and 32 queries, 364-pixel images (the editor's img_size), MiniGPT-4's VQA image prompt.
# The ViT's image size and the Q-Former's input width follow from image_size and the ViT.
EVA_CLIP_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                  patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
BLIP2_QFORMER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     cross_attention_frequency=2)
DEFAULTS = dict(vision_config=EVA_CLIP_G, qformer_config=BLIP2_QFORMER, num_query_tokens=32, image_size=364,
                image_prompt="###Human: <Img><ImageHere></Img> ", dtype="float32")
IMAGE_SLOT = "<ImageHere>"
LN_VISION_EPS = 1e-5  # LAVIS's ln_vision is a default nn.LayerNorm; the ViT blocks use 1e-6

# ---------------------------------------------------------------------------------------------
# Names: EasyEdit/LAVIS MiniGPT-4 -> plugin. One table read in both directions; {i} is a layer.
# ---------------------------------------------------------------------------------------------
_VIT = "image_encoder.vision_model."
_QF = "image_encoder.qformer."
NAME_TABLE: List[Tuple[str, str]] = [
    ("llama_model.", "language_model."),
    ("llama_proj.", "image_encoder.llama_proj."),
    ("query_tokens", "image_encoder.query_tokens"),
    ("ln_vision.", _VIT + "post_layernorm."),
    ("visual_encoder.cls_token", _VIT + "embeddings.class_embedding"),
    ("visual_encoder.pos_embed", _VIT + "embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", _VIT + "embeddings.patch_embedding."),
    ("visual_encoder.blocks.{i}.norm1.", _VIT + "encoder.layers.{i}.layer_norm1."),
    ("visual_encoder.blocks.{i}.norm2.", _VIT + "encoder.layers.{i}.layer_norm2."),
    ("visual_encoder.blocks.{i}.attn.qkv.", _VIT + "encoder.layers.{i}.self_attn.qkv."),
    ("visual_encoder.blocks.{i}.attn.proj.", _VIT + "encoder.layers.{i}.self_attn.projection."),
    ("visual_encoder.blocks.{i}.mlp.", _VIT + "encoder.layers.{i}.mlp."),
    ("Qformer.bert.embeddings.LayerNorm.", _QF + "layernorm."),
    ("Qformer.bert.encoder.layer.{i}.attention.self.", _QF + "encoder.layer.{i}.attention.attention."),
    ("Qformer.bert.encoder.layer.{i}.crossattention.self.", _QF + "encoder.layer.{i}.crossattention.attention."),
    ("Qformer.bert.encoder.layer.{i}.", _QF + "encoder.layer.{i}."),
]
# Parts of a BLIP-2 checkpoint MiniGPT-4 deletes or never had (the Q-Former's text branch and LM
# head, the BLIP-2 language model's projection): read past them.
UNUSED = re.compile(r"^Qformer\.(cls\.|bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)"
                    r"|bert\.encoder\.layer\.\d+\.(intermediate|output)\.)|^(t5_|opt_)")


def _pattern(template: str) -> str:
    return re.escape(template).replace(re.escape("{i}"), r"(\d+)")


def _translate(name: str, source: int) -> Optional[str]:
    """``name`` read in column ``source`` of NAME_TABLE, written in the other column."""
    for row in NAME_TABLE:
        match = re.match(_pattern(row[source]), name)
        if match:
            target = row[1 - source].replace("{i}", match.group(1)) if match.groups() else row[1 - source]
            return target + name[match.end():]
    return None


def parameter_name(easyedit_name: str) -> Optional[str]:
    """The plugin's name for a parameter of EasyEdit's MiniGPT4 (None for parts it does not use)."""
    return None if UNUSED.match(easyedit_name) else _translate(easyedit_name, 0)


def easyedit_name(plugin_name: str) -> Optional[str]:
    return _translate(plugin_name, 1)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class MiniGPT4Adapter(MultimodalLMAdapter):
    """MiniGPT-4's input layout: ``[image prompt before][32 image tokens][image prompt after][text]``,
    text without BOS (EasyEdit's MiniGPT4 tokenises with ``add_special_tokens=False``, and its
    evaluator counts ``prompts_len`` the same way for ``model_name: minigpt4``)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        tokens = super().encode_images(images)
        before, after = (self._prompt_embeds(part, tokens) for part in self.config["image_prompt"].split(IMAGE_SLOT))
        return torch.cat([before, tokens, after], dim=1)

    def _prompt_embeds(self, text: str, like: torch.Tensor) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        embeds = self.language_model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=like.device))
        return embeds.to(like.dtype).unsqueeze(0).expand(like.shape[0], -1, -1)


def build_minigpt4(tokenizer, language_model: nn.Module, settings: dict) -> MiniGPT4Adapter:
    """Randomly initialised image side (filled by ``load_checkpoints``) around ``language_model``."""
    vision = transformers.Blip2VisionConfig(**dict(settings["vision_config"], image_size=settings["image_size"]))
    qformer = transformers.Blip2QFormerConfig(**dict(settings["qformer_config"], encoder_hidden_size=vision.hidden_size))
    vision_model = transformers.Blip2VisionModel(vision)
    vision_model.post_layernorm.eps = LN_VISION_EPS
    query_tokens = nn.Parameter(torch.zeros(1, settings["num_query_tokens"], qformer.hidden_size))
    encoder = MiniGPT4ImageEncoder(vision_model, transformers.Blip2QFormerModel(qformer), query_tokens,
                                   nn.Linear(qformer.hidden_size, language_model.config.hidden_size))
    config = dict(settings, architecture=ARCHITECTURE)
    adapter = MiniGPT4Adapter(encoder, language_model, tokenizer, settings["image_size"], config)
    return adapter.to(language_model.dtype)


def _settings(manifest: dict) -> dict:
    unknown = sorted(set(manifest) - set(DEFAULTS) - set(CHECKPOINT_FIELDS) - {"architecture", "llama"})
    if unknown:
        raise ODEditError(f"{MANIFEST} keys", unknown, f"use only {sorted(DEFAULTS) + ['llama', *CHECKPOINT_FIELDS]}")
    settings = {**DEFAULTS, **{k: manifest[k] for k in DEFAULTS if k in manifest}}
    if str(settings["image_prompt"]).count(IMAGE_SLOT) != 1:
        raise ODEditError(f"{MANIFEST} image_prompt", settings["image_prompt"],
                          f"put {IMAGE_SLOT} once where the image tokens go (MiniGPT-4: {DEFAULTS['image_prompt']!r})")
    return settings


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ODEditError(f"{MANIFEST} dtype", name, "use float32 or bfloat16 (float16 edits overflow)")
    return dtype


def _tokenizer_without_bos(path: str):
    """MiniGPT-4 never adds BOS; ODEdit counts prompt tokens with the adapter's tokenizer, so it
    must not add one either."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, add_bos_token=False)
    if tokenizer("a")["input_ids"] != tokenizer("a", add_special_tokens=False)["input_ids"]:
        raise ODEditError(f"{path} tokenizer", type(tokenizer).__name__,
                          "use the Vicuna folder's Llama tokenizer (it must honour add_bos_token=False)",
                          problem="still adds special tokens")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _read_state(path: str, field: str) -> Dict[str, torch.Tensor]:
    """A LAVIS ``.pth``: ``{"model": state}`` (Q-Former, MiniGPT-4) or a bare state (EVA ViT)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # MiniGPT-4's training checkpoints also pickle their config; the user downloaded them for
        # EasyEdit, which loads them the same way.
        LOG.warning("%s holds more than tensors; loading it with full unpickling", path)
        state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ODEditError(f"{MANIFEST} {field}", path, "name a LAVIS/MiniGPT-4 .pth state dict",
                          problem="is not a state dict")
    return dict(state) if field != "vision" else {"visual_encoder." + k: v for k, v in state.items()}


def _merge_qkv_biases(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """EVA's attention keeps q and v biases apart and has no k bias; transformers' BLIP-2 ViT has
    one qkv bias: [q, 0, v]."""
    out = {}
    for name, value in state.items():
        if name.endswith("attn.v_bias"):
            continue
        if name.endswith("attn.q_bias"):
            v_bias = state[name[:-len("q_bias")] + "v_bias"]
            out[name[:-len("q_bias")] + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
        else:
            out[name] = value
    return out


def _resize_positions(table: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Bicubic resize of the patch-position grid (class position kept), as LAVIS does when the
    image size differs from the checkpoint's (EasyEdit runs the 224-pixel ViT at 364)."""
    old = int(round((table.shape[1] - 1) ** 0.5))
    new = int(round(n_patches ** 0.5))
    if old == new:
        return table
    grid = table[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(table.dtype)], dim=1)


def _translated(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for name, value in _merge_qkv_biases(state).items():
        target = parameter_name(name)
        if target is None and not UNUSED.match(name):
            LOG.info("MiniGPT-4 checkpoint key %s is not part of the model; skipped", name)
        elif target is not None:
            out[target] = value
    return out


def load_checkpoints(adapter: MiniGPT4Adapter, files: Dict[str, str]) -> None:
    """Fill the image side from the LAVIS files; every image-side parameter must come from one."""
    state: Dict[str, torch.Tensor] = {}
    for field in CHECKPOINT_FIELDS:
        state.update(_translated(_read_state(files[field], field)))
    own = adapter.state_dict()
    positions = _VIT + "embeddings.position_embedding"
    if positions in state:
        state[positions] = _resize_positions(state[positions], own[positions].shape[1] - 1)
    wanted = {k for k in own if k.startswith("image_encoder.")}
    missing = sorted(wanted - set(state))
    if missing:
        raise ODEditError(f"{MANIFEST} {'/'.join(CHECKPOINT_FIELDS)}", missing[:5],
                          "name EasyEdit's MiniGPT-4 files (eva_vit_g.pth, blip2_pretrained_flant5xxl.pth, "
                          "pretrained_minigpt4.pth) and vision/qformer configs of their sizes",
                          problem=f"leave {len(missing)} image-side weights unset")
    image_side = {k: v for k, v in state.items() if k in wanted}
    _check_shapes(image_side, own)
    adapter.load_state_dict(image_side, strict=False)


def _check_shapes(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> None:
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ODEditError(f"{MANIFEST} vision_config/qformer_config", wrong[:3],
                          "set the configs to the checkpoints' sizes (the defaults are EVA-CLIP-g and bert-base)",
                          problem="do not match the checkpoint shapes")


def _resolve(folder: str, manifest: dict) -> Dict[str, str]:
    files = {}
    for field in ("llama", *CHECKPOINT_FIELDS):
        if not manifest.get(field):
            raise ODEditError(f"{os.path.join(folder, MANIFEST)} {field}", None,
                              "write the manifest with `python -m easyedit_odedit.models.minigpt4`",
                              problem="is missing")
        path = os.path.join(folder, os.path.expanduser(manifest[field]))  # absolute paths stay as they are
        if not os.path.exists(path):
            raise ODEditFileNotFoundError(f"{os.path.join(folder, MANIFEST)} {field}", path,
                                          "download the file (README: Using real models) or fix the path")
        files[field] = path
    return files


def load_minigpt4(folder: str, manifest: dict) -> MiniGPT4Adapter:
    settings = _settings(manifest)
    files = _resolve(folder, manifest)
    language_model = transformers.LlamaForCausalLM.from_pretrained(files["llama"], dtype=_dtype(settings["dtype"]))
    adapter = build_minigpt4(_tokenizer_without_bos(files["llama"]), language_model, settings)
    load_checkpoints(adapter, files)
    return adapter.eval()


def write_manifest(folder: str, llama: str, vision: str, qformer: str, projection: str, **settings) -> str:
    """A plugin MiniGPT-4 folder: only a manifest naming the four downloads (nothing is copied)."""
    manifest = {"architecture": ARCHITECTURE, "llama": llama, "vision": vision, "qformer": qformer,
                "projection": projection, **settings}
    _settings(manifest)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return folder


def _split_qkv_biases(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        if name.endswith("attn.qkv.bias"):
            q_bias, _, v_bias = value.chunk(3)
            out[name[:-len("qkv.bias")] + "q_bias"], out[name[:-len("qkv.bias")] + "v_bias"] = q_bias, v_bias
        else:
            out[name] = value
    return out


def export_checkpoints(adapter: MiniGPT4Adapter, folder: str) -> Dict[str, str]:
    """The image side in EasyEdit's MiniGPT-4 files (EVA ViT state; ``{"model": ...}`` for the
    Q-Former and ``llama_proj``), e.g. to hand a FT-V-edited projection back to EasyEdit. The ViT's
    k bias is dropped: EVA has none."""
    state = {easyedit_name(k): v.detach().cpu() for k, v in adapter.state_dict().items()
             if k.startswith("image_encoder.")}
    state = _split_qkv_biases(state)
    parts = {"vision": {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")},
             "qformer": {"model": {k: v for k, v in state.items() if k.split(".")[0] in ("Qformer", "ln_vision",
                                                                                        "query_tokens")}},
             "projection": {"model": {k: v for k, v in state.items() if k.startswith("llama_proj.")}}}
    os.makedirs(folder, exist_ok=True)
    files = {}
    for field, content in parts.items():
        files[field] = os.path.join(folder, f"{field}.pth")
        torch.save(content, files[field])
    return files


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a plugin MiniGPT-4 folder (a manifest naming "
                                     "EasyEdit's MiniGPT-4 downloads) for `name:` in hparams/ODEdit/minigpt4-*.yaml")
    parser.add_argument("--out", required=True, help="folder to write odedit_model.json into")
    parser.add_argument("--llama", required=True, help="Vicuna-7B folder (transformers format)")
    parser.add_argument("--vision", required=True, help="eva_vit_g.pth (EasyEdit's state_dict_file)")
    parser.add_argument("--qformer", required=True, help="blip2_pretrained_flant5xxl.pth (qformer_checkpoint)")
    parser.add_argument("--projection", required=True, help="pretrained_minigpt4.pth (pretrained_ckpt)")
    parser.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16 (default)")
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"],
                        help="pixels (EasyEdit: 364; MiniGPT-4 was trained at 224)")
    args = parser.parse_args(argv)
    paths = {k: os.path.abspath(getattr(args, k)) for k in ("llama", *CHECKPOINT_FIELDS)}
    print(write_manifest(args.out, dtype=args.dtype, image_size=args.image_size, **paths))


if __name__ == "__main__":
    main()
