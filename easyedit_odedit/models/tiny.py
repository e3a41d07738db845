"""Tiny models built from transformers config classes, for tests and examples (random weights)."""
from __future__ import annotations

import os
from typing import Iterable

import torch
import transformers

from . import minigpt4
from .loading import build_conv_llama, save_adapter
from .tokenizer import build_word_tokenizer

TINY_VOCAB_TEXT = ("question : what color is the shape ? short answer : red green blue black gray teal "
                   "brown yellow circle rectangle triangle yes no what shape is in the image ? "
                   "does the image contain a ? is there not one two three four five six seven eight "
                   "nine ten plus minus equals")


def tiny_tokenizer(extra_texts: Iterable[str] = ()):
    return build_word_tokenizer([TINY_VOCAB_TEXT, *extra_texts])


def tiny_conv_llama(seed: int = 0, image_size: int = 32, hidden: int = 64, layers: int = 2, tokenizer=None):
    torch.manual_seed(seed)
    tokenizer = tokenizer or tiny_tokenizer()
    vision = dict(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                  layer_type="basic", downsample_in_first_stage=False)
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                initializer_range=0.2)  # larger than the 0.02 default: a random model with
    # near-uniform logits cannot be edited in a few steps, which makes tests say nothing
    return build_conv_llama(tokenizer, image_size, vision, text).eval()


def save_tiny_conv_llama(path: str, seed: int = 0, **kwargs) -> str:
    return save_adapter(tiny_conv_llama(seed, **kwargs), path, seed=seed, note="random weights, tests only")


def save_tiny_hf(path: str, model_type: str, seed: int = 0) -> str:
    """A tiny random ``LlavaForConditionalGeneration`` (CLIP + Llama) or
    ``Blip2ForConditionalGeneration`` (BLIP-2 vision + Q-Former + OPT) with a word tokenizer."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    n_vocab = len(tokenizer)
    if model_type == "llava":
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=32, patch_size=8)
        text = transformers.LlamaConfig(vocab_size=n_vocab + 1, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
        config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=n_vocab,
                                          vision_feature_layer=-1, projector_hidden_act="gelu")
        model = transformers.LlavaForConditionalGeneration(config)
    elif model_type == "blip-2":
        vision = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=32, patch_size=8)
        qformer = transformers.Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, encoder_hidden_size=32)
        text = transformers.OPTConfig(vocab_size=n_vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                      num_attention_heads=4, word_embed_proj_dim=64, pad_token_id=0)
        config = transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                          text_config=text.to_dict(), num_query_tokens=4)
        model = transformers.Blip2ForConditionalGeneration(config)
    else:
        raise ValueError(f"model_type must be 'llava' or 'blip-2', got {model_type!r}")
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------
# Tiny models of the real architectures the shipped YAMLs name (same transformers config classes,
# same module and parameter names, 3 decoder layers so the YAMLs' negative layer indices resolve)
# ------------------------------------------------------------------------------------------------
TINY_ARCHITECTURES = ("blip2-opt", "llava-1.5", "qwen2-vl", "llava-onevision", "minigpt4")

# Chat templates in the shape of the real models' (Qwen2 im_start/im_end turns); written here,
# because a tiny word-level vocabulary cannot hold the real templates' system prompts.
_QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_LLAVA_OV_TEMPLATE = _QWEN2_VL_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>\n")


def _chat_tokenizer(special_tokens):
    tokenizer = tiny_tokenizer(["user assistant"])
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer


def save_tiny_arch(path: str, arch: str, seed: int = 0, layers: int = 3) -> str:
    """Write a tiny random model of ``arch`` (one of ``TINY_ARCHITECTURES``) to ``path``.

    * ``blip2-opt``: ``Blip2ForConditionalGeneration`` with an OPT decoder (Salesforce/blip2-opt-2.7b's
      classes; ``model.decoder.layers.N.fc1``), loaded by the plugin through EasyEdit's LAVIS path.
    * ``llava-1.5``: ``LlavaForConditionalGeneration`` (CLIP + Llama, ``vision_feature_layer=-2``,
      ``default`` feature selection, like llava-1.5-7b-hf), LAVIS path.
    * ``qwen2-vl`` / ``llava-onevision``: ``Qwen2VLForConditionalGeneration`` /
      ``LlavaOnevisionForConditionalGeneration`` with a processor and chat template, for GitHub main's
      HF path; main recognises them by folder name, so ``path`` must contain ``qwen2-vl`` /
      ``llava-onevision``.
    * ``minigpt4``: a plugin MiniGPT-4 folder over EasyEdit's MiniGPT-4 file formats (``save_tiny_minigpt4``).
    """
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"arch must be one of {TINY_ARCHITECTURES}, got {arch!r}")
    if arch == "minigpt4":
        return save_tiny_minigpt4(path, seed, layers)
    if arch in ("qwen2-vl", "llava-onevision") and arch not in os.path.basename(os.path.normpath(path)).lower():
        raise ValueError(f"GitHub main recognises {arch} models by folder name: put {arch!r} in {path!r}")
    torch.manual_seed(seed)
    processor = None
    if arch == "blip2-opt":
        tokenizer = tiny_tokenizer()
        vision = transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=32, patch_size=8)
        qformer = transformers.Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, encoder_hidden_size=32)
        text = transformers.OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                                      num_attention_heads=4, word_embed_proj_dim=64, pad_token_id=0,
                                      bos_token_id=2, eos_token_id=2)
        config = transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                          text_config=text.to_dict(), num_query_tokens=4)
        model = transformers.Blip2ForConditionalGeneration(config)
    elif arch == "llava-1.5":
        tokenizer = tiny_tokenizer()
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8)
        text = transformers.LlamaConfig(vocab_size=len(tokenizer) + 1, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4)
        config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=len(tokenizer),
                                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                                          projector_hidden_act="gelu")
        model = transformers.LlavaForConditionalGeneration(config)
    elif arch == "qwen2-vl":
        specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                    "<|video_pad|>"]
        tokenizer = _chat_tokenizer(specials)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
        pixels = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=32 * 32)
        processor = transformers.Qwen2VLProcessor(
            image_processor=transformers.Qwen2VLImageProcessor(**pixels),
            video_processor=transformers.Qwen2VLVideoProcessor(**pixels),
            tokenizer=tokenizer, chat_template=_QWEN2_VL_TEMPLATE)
        vision = dict(depth=1, embed_dim=16, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2)
        text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=None, eos_token_id=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                                            video_token_id=ids["<|video_pad|>"],
                                            vision_start_token_id=ids["<|vision_start|>"],
                                            vision_end_token_id=ids["<|vision_end|>"])
        model = transformers.Qwen2VLForConditionalGeneration(config)
    else:  # llava-onevision
        specials = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
        tokenizer = _chat_tokenizer(specials)
        pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
        processor = transformers.LlavaOnevisionProcessor(
            image_processor=transformers.LlavaOnevisionImageProcessor(size={"height": 32, "width": 32},
                                                                      image_grid_pinpoints=pinpoints),
            video_processor=transformers.LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}),
            tokenizer=tokenizer, num_image_tokens=16, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9", chat_template=_LLAVA_OV_TEMPLATE)
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False)
        text = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
        config = transformers.LlavaOnevisionConfig(
            vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full", vision_feature_layer=-1)
        model = transformers.LlavaOnevisionForConditionalGeneration(config)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    (processor or tokenizer).save_pretrained(path)
    return path


def save_tiny_minigpt4(path: str, seed: int = 0, layers: int = 4) -> str:
    """A plugin MiniGPT-4 folder over tiny random files in EasyEdit's MiniGPT-4 formats (EVA ViT
    state, Q-Former and ``llama_proj`` checkpoints, a Llama folder). The ViT's files hold 28-pixel
    position tables and the model runs at 42 pixels, so loading interpolates them as EasyEdit does."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                    pad_token_id=0, bos_token_id=None, eos_token_id=2, initializer_range=0.2)
    settings = dict(minigpt4.DEFAULTS, image_size=28, num_query_tokens=4,
                    vision_config=dict(minigpt4.EVA_CLIP_G, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2),
                    qformer_config=dict(minigpt4.BLIP2_QFORMER, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2))
    adapter = minigpt4.build_minigpt4(tokenizer, transformers.LlamaForCausalLM(text), settings)
    with torch.no_grad():  # the initialisers zero biases and set norms to 1: a swapped bias would not show
        for parameter in adapter.image_encoder.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    llama = os.path.join(path, "llama")
    adapter.language_model.save_pretrained(llama)
    for folder in (llama, path):  # the manifest folder too, so `tokenizer_name` may name either
        tokenizer.save_pretrained(folder)
    files = minigpt4.export_checkpoints(adapter, path)
    relative = {k: os.path.relpath(v, path) for k, v in {**files, "llama": llama}.items()}
    return minigpt4.write_manifest(path, **relative, **dict(settings, image_size=42))
