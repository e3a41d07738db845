"""Activations below the lowest edited layer, computed once per edit.

When every edited parameter lives in decoder layers >= k and the environment rows are fixed for the
edit, the input of layer k never changes during the edit. ``PrefixCache`` runs the model once
(without gradients), keeps the output of layer k-1 for every row, and afterwards makes layers
0..k-1 return it instead of computing, so a step costs only the layers that are edited.
It works for any transformers decoder that keeps its blocks in one ``nn.ModuleList``.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterable, Optional, Tuple

import torch
from torch import nn


def decoder_layers(language_model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The largest ``ModuleList`` named ``...layers`` in the language model's decoder (not, say, a
    LLaVA vision tower's encoder layers), with its path from the language model."""
    decoder = language_model.get_decoder() if hasattr(language_model, "get_decoder") else language_model
    inside = {id(m) for m in decoder.modules()}
    best = None
    for name, mod in language_model.named_modules():
        if id(mod) not in inside:
            continue
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "layers" and len(mod):
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[2]:
                best = (name, mod, size)
    if best is None:
        raise LookupError("no decoder layer list found")
    return best[0], best[1]


def lowest_edited_layer(param_names: Iterable[str], layers_path: str) -> Optional[int]:
    """The smallest decoder-layer index among the edited parameters, or None if any edited
    parameter lies outside the layer stack (then nothing below it is fixed)."""
    pattern = re.compile(rf"^language_model\.{re.escape(layers_path)}\.(\d+)\.")
    indices = []
    for name in param_names:
        match = pattern.match(name)
        if match is None:
            return None
        indices.append(int(match.group(1)))
    return min(indices) if indices else None


class PrefixCache:
    def __init__(self, layers: nn.ModuleList, first_edited: int):
        self.layers, self.k = layers, first_edited
        self.cached: Optional[torch.Tensor] = None
        self.as_tuple = False

    @contextlib.contextmanager
    def capturing(self):
        """While active, a forward pass over every row keeps the output of layer k-1."""
        def hook(module, args, output):
            self.as_tuple = isinstance(output, tuple)
            self.cached = (output[0] if self.as_tuple else output).detach()

        handle = self.layers[self.k - 1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _wrap(self, hidden: torch.Tensor):
        return (hidden,) if self.as_tuple else hidden

    @contextlib.contextmanager
    def bypass(self, rows: torch.Tensor):
        """Layers below k pass their input through; layer k-1 returns the cached rows."""
        cached = self.cached[rows]

        def passthrough(hidden_states, *args, **kwargs):
            return self._wrap(hidden_states)

        def cached_output(hidden_states, *args, **kwargs):
            return self._wrap(cached)

        for j in range(self.k - 1):
            self.layers[j].forward = passthrough
        self.layers[self.k - 1].forward = cached_output
        try:
            yield
        finally:
            for j in range(self.k):
                del self.layers[j].forward
