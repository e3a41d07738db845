"""Checks on edit requests, run before any weight changes."""
from __future__ import annotations

import torch

from .errors import ODEditError


def check_request(request, tokenizer, index: int = 0) -> dict:
    where = f"request[{index}]"
    if not isinstance(request, dict):
        raise ODEditError(where, type(request).__name__, "pass a dict with prompt, target and image")
    for key in ("prompt", "target"):
        value = request.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ODEditError(f"{where}.{key}", value, f"give a non-empty string {key}")
    ids = tokenizer(request["target"].strip(), add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise ODEditError(f"{where}.target", request["target"],
                          "use words the model's tokenizer knows (it maps this target to the unknown token)",
                          problem="cannot be encoded")
    image = request.get("image")
    if image is not None:
        if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4) or image.shape[-3] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ODEditError(f"{where}.image", shape, "pass an RGB image tensor [3, H, W] (EasyEdit's vis_tok output)")
        if not torch.isfinite(image).all():
            raise ODEditError(f"{where}.image", "non-finite values", "pass an image without NaN or inf")
    return request
