"""Image encoders: pixels -> a sequence of image-token embeddings in the language model's space."""
from __future__ import annotations

import torch
from torch import nn


def _features(output) -> torch.Tensor:
    """transformers v5 returns a ModelOutput whose ``pooler_output`` holds the projected features;
    v4 returned the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    features = output.pooler_output
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


class ConvGridEncoder(nn.Module):
    """A convolutional tower (e.g. transformers' ``ResNetModel``) whose last feature map is read
    as a grid of image tokens and projected into the language model (LLaVA's projector shape)."""

    def __init__(self, tower: nn.Module, tower_dim: int, text_dim: int):
        super().__init__()
        # channels-last convolutions and pooling: the same values, half the time on a CPU (oneDNN's
        # NCHW max-pool took a third of the tower's time), and the layout tensor cores prefer
        self.tower = tower.to(memory_format=torch.channels_last)
        self.projector = nn.Sequential(nn.Linear(tower_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = pixel_values.contiguous(memory_format=torch.channels_last)
        grid = self.tower(pixels).last_hidden_state                # [B, C, h, w]
        return self.projector(grid.flatten(2).transpose(1, 2))      # [B, h*w, D]


class LlavaImageEncoder(nn.Module):
    """LLaVA's own vision tower + projector, called through ``get_image_features``. The LLaVA model
    is registered once, as the adapter's language model; this only keeps a reference to it, inside a
    tuple: EasyEdit's MEND copies a module's plain attributes onto its functional copy, and would
    register a bare module reference there as a child it never patched (training then fails)."""

    def __init__(self, llava_model: nn.Module):
        super().__init__()
        self._llava = (llava_model,)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _features(self._llava[0].get_image_features(pixel_values=pixel_values))


class QFormerImageEncoder(nn.Module):
    """A ViT, a Q-Former over its patch features, and a linear projection of the query outputs
    into the language model (BLIP-2's and MiniGPT-4's image side). Subclasses name the projection
    the way their model family does, so YAML module names match what users know."""

    projection_name = "projection"

    def __init__(self, vision_model: nn.Module, qformer: nn.Module, query_tokens: nn.Parameter,
                 projection: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.qformer = qformer
        self.query_tokens = query_tokens
        setattr(self, self.projection_name, projection)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query = self.qformer(query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
                             encoder_hidden_states=image_embeds, encoder_attention_mask=mask,
                             return_dict=True).last_hidden_state
        return getattr(self, self.projection_name)(query.to(image_embeds.dtype))


class Blip2ImageEncoder(QFormerImageEncoder):
    """BLIP-2's vision model, Q-Former and projection (the adapter's language model is the OPT)."""

    projection_name = "language_projection"

    def __init__(self, blip2_model: nn.Module):
        super().__init__(blip2_model.vision_model, blip2_model.qformer, blip2_model.query_tokens,
                         blip2_model.language_projection)


class MiniGPT4ImageEncoder(QFormerImageEncoder):
    """MiniGPT-4's EVA ViT + Q-Former (BLIP-2's) and its ``llama_proj`` into Vicuna."""

    projection_name = "llama_proj"
