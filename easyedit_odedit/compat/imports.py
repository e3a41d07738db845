"""Import shims: what the PyPI release of EasyEdit needs to be importable on today's torchvision
and transformers, each applied only where the thing it repairs is actually broken.

A leaf module (no import from the plugin), so EasyEdit can be imported with exactly these shims
and nothing else of the plugin (``tests/test_compat.py`` compares EasyEdit's own edits that way).
"""
from __future__ import annotations

import sys

import torch

TRANSFORMERS_REEXPORTS = ("apply_chunking_to_forward", "prune_linear_layer", "find_pruneable_heads_and_indices")
_KEEP_ALIVE: list = []


def ensure_torchvision_importable() -> None:
    """PyPI's torchvision is a CUDA build; next to CPU torch its C extension cannot load and the
    import dies with ``operator torchvision::nms does not exist`` (which also breaks
    ``transformers.modeling_utils``). Only in that case, declare the two op schemas its Python
    side registers fake kernels for, and import again. The pure-Python transforms then work."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: nothing to repair
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")  # kept alive by the dispatcher
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP_ALIVE.append(lib)
    import torchvision  # noqa: F401,F811


def restore_transformers_reexports() -> None:
    """EasyEdit's Q-Former imports three helpers from ``transformers.modeling_utils`` that recent
    transformers no longer re-export there. Put back only the missing ones."""
    import transformers.modeling_utils as modeling_utils  # after ensure_torchvision_importable
    from transformers import pytorch_utils

    for name in TRANSFORMERS_REEXPORTS:
        if hasattr(modeling_utils, name):
            continue
        if hasattr(pytorch_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
        elif name == "find_pruneable_heads_and_indices":
            setattr(modeling_utils, name, _find_pruneable_heads_and_indices)


def _find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
    """Removed from transformers v5; only imported (never called) on EasyEdit's multimodal path."""
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
        mask[head] = 0
    mask = mask.view(-1).contiguous().eq(1)
    index = torch.arange(len(mask))[mask].long()
    return heads, index
