"""Activations below the lowest edited layer, computed once per edit.

When every edited parameter lives in decoder layers >= k and the environment rows are fixed for the
edit, the input of layer k never changes during the edit. ``PrefixCache`` runs the model once
(without gradients), keeps the output of layer k-1 for every row, and afterwards makes layers
0..k-1 return it instead of computing, so a step costs only the layers that are edited.
It works for any transformers decoder that keeps its blocks in one ``nn.ModuleList``.

``LastModuleCache`` goes further when the edit touches one module of the last layer only (FT-L's
and LoRA's top MLP): a step then runs that module and the final norm on the last few positions, and
the LM head on the positions the risks read.
"""
from __future__ import annotations

import contextlib
import re
import weakref
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
    def capturing(self, tail: Optional[int] = None):
        """While active, a forward pass over every row keeps the output of layer k-1."""
        def hook(module, args, output):
            self.as_tuple = isinstance(output, tuple)
            self.cached = (output[0] if self.as_tuple else output).detach()

        handle = self.layers[self.k - 1].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def captured(self) -> Tuple[torch.Tensor, ...]:
        """What the last capture kept ([rows, positions, ...]), for ``load_captured``."""
        return (self.cached,)

    def load_captured(self, tensors: Tuple[torch.Tensor, ...]) -> None:
        """Captures of several passes, merged: every row, right-aligned to the batch's width."""
        (self.cached,) = tensors

    def hidden_states(self, adapter, batch, rows: torch.Tensor, tail: Optional[int] = None) -> torch.Tensor:
        """``adapter.decode_hidden`` of the cached ``rows`` (``batch``, as wide as the captured rows
        or cut to its last columns), running only layers >= k."""
        with self.bypass(rows, batch.inputs_embeds.shape[1]):
            return adapter.decode_hidden(batch, tail)

    def _wrap(self, hidden: torch.Tensor):
        return (hidden,) if self.as_tuple else hidden

    @contextlib.contextmanager
    def bypass(self, rows: torch.Tensor, width: int):
        """Layers below k pass their input through; layer k-1 returns the cached rows' last
        ``width`` columns (rows are left-padded: a batch of short rows drops the padding's columns)."""
        cached = self.cached[rows][:, -width:]

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


FINAL_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f")


def edited_submodule(param_names: Iterable[str], layers_path: str, n_layers: int) -> Optional[str]:
    """``"mlp"`` when every edited parameter lies in one child module of the decoder's *last*
    layer (FT-L or LoRA on the top MLP), else None."""
    pattern = re.compile(rf"^language_model\.{re.escape(layers_path)}\.(\d+)\.([^.]+)\.")
    children = set()
    for name in param_names:
        match = pattern.match(name)
        if match is None or int(match.group(1)) != n_layers - 1:
            return None
        children.add(match.group(2))
    return children.pop() if len(children) == 1 else None


class LastModuleCache:
    """Edits confined to a position-wise module M of the last decoder layer whose output is added to
    the residual stream (a pre-norm transformer's MLP). Then, for the positions a risk reads,

        hidden = final_norm(residual + M(x)),

    with ``x`` (M's input) and ``residual`` (the layer's output minus M's output) fixed during the
    edit: a step runs M and the final norm on the last ``tail`` positions only - no attention, no
    image positions. The structure is not assumed but checked (``verify``) on the
    real model; when the check fails ODEdit uses ``PrefixCache`` instead."""

    def __init__(self, module: nn.Module, last_layer: nn.Module, final_norm: nn.Module,
                 fallback: Optional[PrefixCache] = None):
        self.module, self.last_layer, self.final_norm = module, last_layer, final_norm
        self.fallback = fallback
        self.x = self.residual = self.module_out = None

    @contextlib.contextmanager
    def capturing(self, tail: int, added: Optional[torch.Tensor] = None):
        """Keeps M's input and the residual at the last ``tail`` positions. With ``added``, M's
        output there is shifted by it instead (for ``verify``)."""
        def module_hook(module, args, output):
            if not (args and torch.is_tensor(args[0]) and torch.is_tensor(output)):
                self.module_out = None  # not a tensor -> tensor module (attention): ``verify`` says no
                return None
            if added is not None:
                output = output.clone()
                output[:, -tail:] += added
                return output
            self.x, self.module_out = args[0][:, -tail:].detach(), output[:, -tail:].detach()

        def layer_hook(module, args, output):
            if added is None and self.module_out is not None:
                hidden = output[0] if isinstance(output, tuple) else output
                self.residual = hidden[:, -tail:].detach() - self.module_out

        handles = [self.module.register_forward_hook(module_hook), self.last_layer.register_forward_hook(layer_hook)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def captured(self) -> Tuple[torch.Tensor, ...]:
        return self.x, self.module_out, self.residual

    def load_captured(self, tensors: Tuple[torch.Tensor, ...]) -> None:
        self.x, self.module_out, self.residual = tensors

    def hidden_states(self, adapter, batch, rows: torch.Tensor, tail: Optional[int] = None) -> torch.Tensor:
        """What ``adapter.decode_hidden(batch, tail)`` returns, from the cache alone (``batch`` is
        not read; ``tail`` must be the one captured): the decoder's last hidden states at the cached
        positions of ``rows``, as edited now."""
        return self.final_norm(self.residual[rows] + self.module(self.x[rows]))

    def verify(self, run_full, tail: int) -> bool:
        """Checks both assumptions on two cached rows (once per model: the answer is structural):
        M is position-wise (M on the cached positions alone reproduces its output) and the
        decoder's output is final_norm(residual + M's output) (the full model with M's output
        shifted by a random amount agrees)."""
        if self.residual is None:
            return False
        if self.module not in _VERIFIED:
            _VERIFIED[self.module] = self._check(run_full, tail)
        return _VERIFIED[self.module]

    @torch.no_grad()
    def _check(self, run_full, tail: int) -> bool:
        rows = torch.arange(min(2, self.x.shape[0]), device=self.x.device)
        if not _close(self.module(self.x[rows]), self.module_out[rows]):
            return False
        gen = torch.Generator(device="cpu").manual_seed(0)
        shift = torch.randn(self.module_out[rows].shape, generator=gen).to(self.x) * self.module_out.float().std().to(self.x.dtype)
        with self.capturing(tail, added=shift):
            full = run_full(rows)
        return _close(self.final_norm(self.residual[rows] + self.module_out[rows] + shift), full)


_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    tolerance = 1e-4 if a.dtype == torch.float32 and b.dtype == torch.float32 else 2e-2  # bf16/fp16: ~3 digits
    a, b = a.float(), b.float()
    return bool(((a - b).abs().max() <= tolerance * b.abs().max().clamp(min=1e-6)).item())


def final_norm_of(decoder: nn.Module) -> Optional[nn.Module]:
    for name in FINAL_NORM_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    return None
