"""Images exactly as EasyEdit's evaluation feeds them to a plugin model.

EasyEdit's ``VQADataset`` opens each image with PIL, ``.convert("RGB")``, applies
``BlipImageEvalProcessor(image_size=364)`` (resize to 364x364 bicubic, ``ToTensor``, normalise with
the BLIP mean/std), and the ``MultimodalLMAdapter`` then resizes the 364-pixel tensor to its own
``image_size`` (bilinear, antialias). ``model_pixels`` applies that whole chain once, so a model
trained or scored on its output sees exactly what it sees under EasyEdit.

``processor="easyedit"`` uses EasyEdit's own class (imports EasyEdit, ~7 s); ``"torchvision"``
is the same transform rebuilt from torchvision (tests check that the two agree).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms  # importable: the package imports compat (its shim) first
from torchvision.transforms.functional import InterpolationMode

from .. import compat

EVAL_SIZE = 364
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def eval_processor(processor: str = "easyedit") -> Callable:
    """PIL image -> [3, 364, 364] tensor, as EasyEdit's VQA/caption datasets process images."""
    if processor == "easyedit":
        compat.prepare_host()
        return compat.module("dataset.processor.blip_processors").BlipImageEvalProcessor(image_size=EVAL_SIZE)
    if processor == "torchvision":
        return transforms.Compose([
            transforms.Resize((EVAL_SIZE, EVAL_SIZE), interpolation=InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(BLIP_MEAN, BLIP_STD),
        ])
    raise ValueError(f"processor must be 'easyedit' or 'torchvision', got {processor!r}")


def to_model_size(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """The adapter's own resize (``MultimodalLMAdapter.encode_images``)."""
    if pixels.shape[-1] == image_size and pixels.shape[-2] == image_size:
        return pixels
    return F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", antialias=True,
                         align_corners=False)


def model_pixels(paths: Sequence[str], image_size: int, processor: str = "easyedit",
                 chunk: int = 64) -> torch.Tensor:
    """[N, 3, image_size, image_size]: each file through EasyEdit's processor, then the adapter's
    resize. Passing these to the adapter is equivalent to passing the 364-pixel tensors."""
    process = eval_processor(processor)
    out = []
    for start in range(0, len(paths), chunk):
        batch = []
        for path in paths[start:start + chunk]:
            if processor == "easyedit":  # a PIL image in the PyPI release, a path on GitHub main
                batch.append(compat.process_image_file(process, path))
                continue
            with Image.open(path) as im:
                batch.append(process(im.convert("RGB")))
        out.append(to_model_size(torch.stack(batch), image_size))
    return torch.cat(out) if out else torch.empty(0, 3, image_size, image_size)
