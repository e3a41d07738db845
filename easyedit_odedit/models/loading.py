"""Checkpoints the plugin understands, and how they become a ``MultimodalLMAdapter``.

A YAML with ``model_name: blip2`` (EasyEdit's LAVIS path) and ``name: <directory>`` makes
EasyEdit's own ``MultimodalEditor``/trainer call ``Blip2OPT(opt_model=<directory>, ...)``;
``compat`` routes that call here when the directory is one of:

* a plugin checkpoint (``odedit_model.json``): a convolutional image tower + Llama decoder, saved
  as configs plus one safetensors file whose SHA-256 the loader checks, or a MiniGPT-4 manifest
  naming EasyEdit's MiniGPT-4 downloads (``minigpt4.py``; reached through ``MiniGPT4(llama_model=...)``);
* a transformers ``LlavaForConditionalGeneration`` or ``Blip2ForConditionalGeneration`` directory
  (``config.json`` with ``model_type`` ``llava`` / ``blip-2``).

Anything else goes to EasyEdit's own constructor unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch
import transformers
from safetensors.torch import load_file, save_file

from ..errors import ODEditError, ODEditFileNotFoundError
from .adapter import MultimodalLMAdapter
from .encoders import Blip2ImageEncoder, ConvGridEncoder, LlavaImageEncoder
from .manifest import MANIFEST, WEIGHTS
from .minigpt4 import load_minigpt4

HF_ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration"}


def _hf_model_type(path: str) -> Optional[str]:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f).get("model_type")


def is_plugin_checkpoint(path) -> bool:
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    return os.path.isfile(os.path.join(path, MANIFEST)) or _hf_model_type(path) in HF_ARCHITECTURES


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_conv_llama(tokenizer, image_size: int, vision_config: dict, text_config: dict,
                     provenance: Optional[dict] = None) -> MultimodalLMAdapter:
    """A convolutional tower (transformers ``ResNetModel``) + projector + ``LlamaForCausalLM``."""
    vision = transformers.ResNetConfig(**vision_config)
    text = transformers.LlamaConfig(**dict(text_config, vocab_size=len(tokenizer),
                                           pad_token_id=tokenizer.pad_token_id))
    encoder = ConvGridEncoder(transformers.ResNetModel(vision), vision.hidden_sizes[-1], text.hidden_size)
    config = {"architecture": "conv-llama", "image_size": image_size,
              "vision_config": vision_config, "text_config": text.to_dict(), **(provenance or {})}
    return MultimodalLMAdapter(encoder, transformers.LlamaForCausalLM(text), tokenizer, image_size, config)


def save_adapter(adapter: MultimodalLMAdapter, path: str, **provenance) -> str:
    """Write a plugin checkpoint: manifest (configs, provenance, weights hash), weights, tokenizer."""
    if adapter.config.get("architecture") != "conv-llama":
        raise ODEditError("adapter.config['architecture']", adapter.config.get("architecture"),
                          "save transformers models with their own save_pretrained")
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    save_file(state, os.path.join(path, WEIGHTS))
    adapter.tokenizer.save_pretrained(path)
    manifest = {k: adapter.config[k] for k in ("architecture", "image_size", "vision_config", "text_config")}
    manifest.update(provenance, weights=WEIGHTS, sha256=sha256_of(os.path.join(path, WEIGHTS)))
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return path


def load_adapter(path: str) -> MultimodalLMAdapter:
    if not os.path.isdir(path):
        raise ODEditFileNotFoundError("name", path, "point `name` at a saved model directory")
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        return _load_hf(path, _hf_model_type(path))
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("architecture") == "minigpt4":
        return load_minigpt4(path, manifest)
    return _load_conv_llama(path, manifest)


def _load_conv_llama(path: str, manifest: dict) -> MultimodalLMAdapter:
    weights = os.path.join(path, manifest.get("weights", WEIGHTS))
    if not os.path.isfile(weights):
        raise ODEditFileNotFoundError("name", weights, "the checkpoint is incomplete; re-save or re-download it")
    actual = sha256_of(weights)
    if manifest.get("sha256") and actual != manifest["sha256"]:
        raise ODEditError(f"{weights} sha256", actual,
                          f"the weights do not match the manifest ({manifest['sha256'][:12]}...); "
                          "the file is corrupt or was replaced: restore it from the package")
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    text_config = {k: v for k, v in manifest["text_config"].items()}
    adapter = build_conv_llama(tokenizer, manifest["image_size"], manifest["vision_config"], text_config,
                               {k: v for k, v in manifest.items() if k not in ("text_config", "vision_config")})
    adapter.load_state_dict(load_file(weights))
    return adapter.eval()


# LLaVA-1.5's instruction format, "USER: <image>\n{prompt} ASSISTANT: {answer}" (llava-hf model cards)
LLAVA_CHAT = {"user": "USER: ", "image_end": "\n", "assistant": " ASSISTANT:"}


def editing_dtype(stored) -> torch.dtype:
    """The dtype a checkpoint is edited in. transformers 5 loads a checkpoint in its stored dtype,
    and llava-hf's checkpoints are float16: small edit steps then underflow and the edit ends in NaN.
    float16 is loaded as bfloat16 on a GPU that has it (same memory) and float32 otherwise; bfloat16
    and float32 checkpoints stay as they are."""
    stored = getattr(torch, str(stored).replace("torch.", ""), None) if stored is not None else None
    if stored in (torch.bfloat16, torch.float32):
        return stored
    if stored == torch.float16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _load_hf(path: str, model_type: str) -> MultimodalLMAdapter:
    model_cls = getattr(transformers, HF_ARCHITECTURES[model_type])
    stored = transformers.AutoConfig.from_pretrained(path)
    stored = getattr(stored, "dtype", None) or getattr(stored, "torch_dtype", None)
    model = model_cls.from_pretrained(path, dtype=editing_dtype(stored))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image_size = model.config.vision_config.image_size
    config = {"architecture": f"hf-{model_type}", "image_size": image_size, "hf_path": path}
    if model_type == "llava":
        config["chat"] = LLAVA_CHAT
        return MultimodalLMAdapter(LlavaImageEncoder(model), model, tokenizer, image_size, config).eval()
    return MultimodalLMAdapter(Blip2ImageEncoder(model), model.language_model, tokenizer, image_size, config).eval()

