"""Tiny models built from transformers config classes, for tests and examples (random weights)."""
from __future__ import annotations

import os
from typing import Iterable

import torch
import transformers

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
