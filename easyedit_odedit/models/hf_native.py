"""ODEdit on transformers' own vision-language models: GitHub main's HF path.

EasyEdit main builds ``Qwen2VLForConditionalGeneration`` and ``LlavaOnevisionForConditionalGeneration``
itself (``model_name`` a folder whose name contains ``qwen2-vl`` / ``llava-onevision``), with an
``AutoProcessor`` as ``tok``, evaluates with ``model(**processor_batch)`` and hands ODEdit's apply
the raw model. ``view_for(model)`` gives ODEdit the ``MultimodalLMAdapter`` protocol over such a
model without wrapping, moving or copying anything:

* **Parameter names.** The view registers the model's *existing* modules and parameters in two
  skeleton containers that mirror the model's attribute paths: ``image_encoder`` holds the vision
  parts (``model.visual`` for Qwen2-VL; ``model.vision_tower``, ``model.multi_modal_projector`` and
  ``model.image_newline`` for LLaVA-OneVision), ``language_model`` everything else. So a view name
  is ``language_model.<the model's own name>`` or ``image_encoder.<the model's own name>``, e.g.
  ``language_model.model.language_model.layers.27.mlp.down_proj.weight`` and
  ``image_encoder.model.visual.merger.mlp.0.weight``; strip the first component to get the name in
  ``model.named_parameters()``. This keeps the plugin's ``language_model.`` logic (host layer
  selection, the prefix cache) on the text decoder only - a vision tower's ``layers`` can never be
  taken for the decoder (in llava-onevision-qwen2-0.5b the SigLIP encoder holds more parameters than
  the Qwen2 decoder) - and makes FT-V parameters (``merger``, ``multi_modal_projector``) re-embed the
  images each step, so they receive gradients.
* **Rows.** Every row is built as main's evaluator builds it (``prepare_multimodal_hf_edit``): the
  processor's chat template over ``[image placeholders][prompt]`` with the generation prompt, then
  the target appended; labels are the target's tokens (``add_special_tokens=False``) right-aligned,
  -100 elsewhere. Text-only rows use the same template without placeholders. The prompt/target split
  of an ODEdit row (``"{prompt} {target}"`` + the prompt's token count) is recovered through the
  tokenizer's character offsets.
* **Embedding.** Each row goes through the model's own forward up to the input of its text decoder
  (a pre-hook captures ``inputs_embeds`` and ``position_ids`` and stops there), so image features,
  placeholder scattering, LLaVA-OneVision's anyres packing and Qwen2-VL's 3-D M-RoPE positions are
  exactly the model's; the rows are then left-padded into one batch. ``position_ids`` are ``[B, L]``
  or, for M-RoPE, batch-first ``[B, 3, L]`` (so ODEdit can index rows) and are put back to
  ``[3, B, L]`` for the decoder. ``decode`` runs the text decoder and then the LM head once on the
  whole padded batch (no pixels), so the prefix cache works unchanged. Cost: one vision+embedding
  forward per row (the same work a batched call does), one decoder forward per batch; ODEdit embeds
  the rows once per edit, and again every step only when vision parameters are edited (FT-V).
* **Images** may be PIL images, lists of PIL images (main's Qwen request format), ``uint8`` tensors
  ``[3, H, W]`` (raw pixels) or float tensors ``[3, H, W]``, which are EasyEdit's convention (its BLIP
  eval processor's output: OpenAI-CLIP mean/std; ODEdit's request check and locality pool use it)
  and are de-normalised before the model's own processor sees them.
* **Processor.** ``_unwrap`` only receives the model, so the processor is loaded from the folder the
  model came from (``model.config._name_or_path``, what main's editor loaded); call
  ``view_for(model, processor)`` first to supply one. The view is cached on the model, so sequential
  edits share one history: restore them with ``restore_all(view_for(model))``.

With main's editor: call ``prepare_editor(editor)`` after ``MultimodalEditor.from_hparams``. Main's
own ``vis_tok`` for these models yields PIL images, which ODEdit's request check rejects (it takes
EasyEdit's normalised float tensors), and main's ``tok`` is the processor, which that check calls
with a target string (a processor reads a positional argument as *images*). ``prepare_editor`` sets
``editor.vis_tok = TensorImageLoader()`` (files -> EasyEdit-normalised float tensors) and
``editor.tok = NativeProcessor(processor)``: the processor, except that a positional string goes to
its tokenizer and float image tensors are de-normalised back to pixels before the processor sees
them - so main's evaluator scores exactly the pixels ODEdit edited on.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor

from ..errors import ODEditError
from ..prefix_cache import decoder_layers
from .adapter import IGNORE, EmbeddedBatch, MultimodalLMAdapter

NATIVE_CLASSES = ("Qwen2VLForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
# Attribute paths of the vision side (transformers 5 layout first, then transformers 4's).
VISION_ROOTS = ("model.visual", "visual", "model.vision_tower", "vision_tower",
                "model.multi_modal_projector", "multi_modal_projector", "model.image_newline", "image_newline")
QWEN_VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
# EasyEdit's BlipImageEvalProcessor default normalisation (OpenAI CLIP statistics).
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_VIEW_ATTR = "_odedit_native_view"


def is_native(model) -> bool:
    return type(model).__name__ in NATIVE_CLASSES


def view_for(model: nn.Module, processor=None) -> "HFNativeView":
    """The (cached) view over ``model``; builds it on first use. ``processor`` defaults to
    ``AutoProcessor.from_pretrained(model.config._name_or_path)``."""
    view = model.__dict__.get(_VIEW_ATTR)
    if view is None or (processor is not None and view.processor is not processor):
        if processor is None:
            processor = _load_processor(model)
        view = HFNativeView(model, processor)
        model.__dict__[_VIEW_ATTR] = view  # not a registered submodule: no cycle in the module tree
    return view


def _load_processor(model):
    path = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if not path or not os.path.isdir(path):
        raise ODEditError("model.config._name_or_path", path,
                          "load the model from a local folder, or call "
                          "easyedit_odedit.models.hf_native.view_for(model, processor) before editing",
                          problem="is not a folder holding the model's processor")
    return AutoProcessor.from_pretrained(path)


# ------------------------------------------------------------------------------------------------
# Skeletons: the model's own modules under their own attribute paths, split vision / text
# ------------------------------------------------------------------------------------------------
def _vision_roots(model: nn.Module) -> List[str]:
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    roots = [r for r in VISION_ROOTS if r in names]
    return [r for r in roots if not any(r.startswith(o + ".") for o in roots if o != r)]


def _side(path: str, roots: Sequence[str]) -> str:
    if any(path == r or path.startswith(r + ".") for r in roots):
        return "vision"
    if any(r.startswith(path + ".") for r in roots):
        return "both"
    return "text"


def _mirror(module: nn.Module, prefix: str, roots: Sequence[str], side: str) -> nn.Module:
    """An empty container holding, under the same names, the children and parameters of
    ``module`` that lie on ``side``, recursing into the ones that straddle both sides."""
    container = nn.Module()
    for name, child in module.named_children():
        where = _side(prefix + name, roots)
        if where == side:
            container.add_module(name, child)
        elif where == "both":
            container.add_module(name, _mirror(child, prefix + name + ".", roots, side))
    for name, param in module.named_parameters(recurse=False):
        if _side(prefix + name, roots) == side:
            container.register_parameter(name, param)
    return container


class _Captured(Exception):
    def __init__(self, kwargs):
        super().__init__("decoder input captured")
        self.kwargs = kwargs


class HFNativeView(MultimodalLMAdapter):
    """``MultimodalLMAdapter``'s protocol over a transformers VLM and its processor."""

    feature_size = 384  # pixels; the square size images are resized to in ``encode_images``

    def __init__(self, model: nn.Module, processor):
        roots = _vision_roots(model)
        vision, text = _mirror(model, "", roots, "vision"), _mirror(model, "", roots, "text")
        config = {"architecture": f"hf-native-{model.config.model_type}", "model_type": model.config.model_type,
                  "hf_path": getattr(model.config, "_name_or_path", "")}
        super().__init__(vision, text, processor.tokenizer, image_size=0, config=config)
        self.__dict__["hf_model"] = model  # plain attribute: the parameters are registered once, above
        self.processor = processor
        self.vision_roots = roots
        self.mrope = model.config.model_type == "qwen2_vl"
        layers_path, _ = decoder_layers(text)
        self.decoder_path = layers_path.rsplit(".", 1)[0]
        self.image_token_id = self._image_token_id()
        covered = {id(p) for p in self.parameters()}
        missing = [n for n, p in model.named_parameters() if id(p) not in covered]
        if missing:
            raise RuntimeError(f"HFNativeView does not cover {missing[:3]}... of {type(model).__name__}")

    def _image_token_id(self) -> int:
        config = self.hf_model.config
        for key in ("image_token_id", "image_token_index"):
            if getattr(config, key, None) is not None:
                return int(getattr(config, key))
        return int(self.tokenizer.convert_tokens_to_ids(self.processor.image_token))

    def train(self, mode: bool = True):
        """Only the view's own flag: the skeletons hold the model's modules, and switching them
        would change the train/eval mode of the model EasyEdit evaluates."""
        self.training = mode
        return self

    def forward(self, *args, **kwargs):
        """Keyword batches (``model(**processor_output)``, main's evaluator) go to the model itself;
        a LAVIS-style ``samples`` dict goes through the view's own rows."""
        if kwargs and not args:
            return self.hf_model(**kwargs)
        return super().forward(*args, **kwargs)

    # -- rows -------------------------------------------------------------------------------------
    def split(self, text: str, n_prompt: int) -> Tuple[str, str]:
        """``"{prompt} {target}"`` and the prompt's token count -> (prompt, target)."""
        enc = self.tokenizer(text, return_offsets_mapping=True)
        offsets = [o for o in enc["offset_mapping"]]
        if n_prompt >= len(offsets):
            return text.strip(), ""
        end = max((o[1] for o in offsets[:n_prompt]), default=0)
        return text[:end].strip(), text[end:].strip()

    def chat(self, prompt: str, n_images: int) -> str:
        """The user turn exactly as main's evaluator renders it, generation prompt included."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        chat = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
        if self.mrope and n_images and "<|vision_start|>" not in chat:
            chat = QWEN_VISION_PLACEHOLDER * n_images + chat
        return chat

    def _row(self, prompt: str, target: str, images: List) -> dict:
        text = self.chat(prompt, len(images)) + target
        inputs = self.processor(images=images or None, text=[text], return_tensors="pt")
        ids = inputs["input_ids"][0]
        target_ids = self.tokenizer(target, add_special_tokens=False)["input_ids"] if target else []
        labels = torch.full_like(ids, IGNORE)
        if target_ids:
            labels[-len(target_ids):] = torch.tensor(target_ids[-len(ids):])
        embeds, positions = self._decoder_inputs(inputs)
        return {"input_ids": ids, "labels": labels, "embeds": embeds[0], "positions": positions}

    def _decoder_inputs(self, inputs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run the model up to its text decoder; return the decoder's inputs_embeds and positions."""
        model = self.hf_model
        batch = {k: (v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device))
                 for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        decoder = model.get_submodule(self.decoder_path)
        inner = getattr(model, "model", None)
        saved = inner.__dict__.get("rope_deltas") if inner is not None else None

        def stop(module, args, kwargs):
            raise _Captured(kwargs)

        handle = decoder.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            model(**batch, use_cache=False)
        except _Captured as captured:
            kwargs = captured.kwargs
        else:
            raise RuntimeError(f"{type(model).__name__} never called {self.decoder_path}")
        finally:
            handle.remove()
            if inner is not None and "rope_deltas" in inner.__dict__:
                inner.rope_deltas = saved  # the capture must leave no generation state behind
        embeds = kwargs["inputs_embeds"]
        positions = kwargs.get("position_ids")
        if positions is not None:
            positions = positions[:, 0] if positions.dim() == 3 else positions[0]  # one row
        return embeds, positions

    def embed(self, texts: Sequence[str], images, prompts_len: Sequence[int]) -> EmbeddedBatch:
        texts = [texts] if isinstance(texts, str) else list(texts)
        per_row = _images_per_row(images, len(texts))
        rows = []
        for text, n_prompt, image in zip(texts, prompts_len, per_row):
            prompt, target = self.split(text, int(n_prompt))
            rows.append(self._row(prompt, target, _to_pil_list(image)))
        return self._pad(rows)

    def _pad(self, rows: List[dict]) -> EmbeddedBatch:
        width = max(r["embeds"].shape[0] for r in rows)
        n, dim = len(rows), rows[0]["embeds"].shape[-1]
        embeds = rows[0]["embeds"].new_zeros(n, width, dim)
        mask = torch.zeros(n, width, dtype=torch.long, device=self.device)
        labels = torch.full((n, width), IGNORE, dtype=torch.long, device=self.device)
        k = next((r["positions"].shape[0] for r in rows if r["positions"] is not None and r["positions"].dim() == 2),
                 3 if self.mrope else 0)
        positions = torch.ones((n, k, width) if k else (n, width), dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            length = row["embeds"].shape[0]
            embeds[i, width - length:] = row["embeds"]
            mask[i, width - length:] = 1
            labels[i, width - length:] = row["labels"].to(self.device)
            pos = row["positions"]
            if pos is None:
                pos = torch.arange(length, device=self.device)
            if k and pos.dim() == 1:
                pos = pos.unsqueeze(0).expand(k, -1)
            positions[i, ..., width - length:] = pos.to(self.device)
        if not k:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return EmbeddedBatch(embeds, mask, positions, labels)

    def text_decoder(self) -> nn.Module:
        return self.hf_model.get_submodule(self.decoder_path)

    def lm_head(self) -> nn.Module:
        return self.hf_model.get_output_embeddings()

    def decode_hidden(self, batch: EmbeddedBatch, tail=None):
        """The text decoder on the whole batch (no pixels: the image features are in
        ``inputs_embeds``); its last hidden state, of the last ``tail`` positions when given."""
        if batch.position_ids.dim() == 3:  # batch-first [B, 3, L] -> the decoder's [3, B, L]
            batch = EmbeddedBatch(batch.inputs_embeds, batch.attention_mask, batch.position_ids.permute(1, 0, 2),
                                  batch.labels)
        return super().decode_hidden(batch, tail)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, D]: the decoder inputs at the image-token positions of a row that
        holds only the image. Images are first resized to ``feature_size`` x ``feature_size``, so
        every image gives the same N (these models' token counts follow the image size, and ODEdit
        compares the features of images of different sizes)."""
        images = images if images.dim() == 4 else images.unsqueeze(0)
        size = (self.feature_size, self.feature_size)
        feats = []
        for image in images:
            pil = [p.resize(size, Image.BICUBIC) for p in _to_pil_list(image)]
            row = self._row("", "", pil)
            feats.append(row["embeds"][row["input_ids"].to(row["embeds"].device) == self.image_token_id])
        return torch.stack(feats)


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def _images_per_row(images, n: int) -> list:
    if images is None:
        return [None] * n
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return [images] * n
        rows = list(images)
        return rows * n if len(rows) == 1 and n > 1 else rows
    rows = list(images)
    if len(rows) != n:
        raise ValueError(f"{len(rows)} images for {n} rows")
    return rows


def _to_pil_list(image) -> list:
    if image is None:
        return []
    if isinstance(image, (list, tuple)):
        return [p for item in image for p in _to_pil_list(item)]
    if isinstance(image, Image.Image):
        return [image.convert("RGB")]
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image).permute(2, 0, 1) if image.shape[-1] == 3 else torch.from_numpy(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() == 4:
            return [p for item in image for p in _to_pil_list(item)]
        if image.dtype != torch.uint8:
            mean = torch.tensor(BLIP_MEAN).view(3, 1, 1)
            std = torch.tensor(BLIP_STD).view(3, 1, 1)
            image = ((image.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB")]
    raise TypeError(f"cannot use {type(image).__name__} as an image")


def to_easyedit_tensor(image) -> torch.Tensor:
    """A PIL image (or a one-image list, main's Qwen format) -> EasyEdit's image convention: a float32
    ``[3, H, W]`` tensor normalised with the BLIP/OpenAI-CLIP mean and std."""
    images = _to_pil_list(image)
    if len(images) != 1:
        raise ValueError(f"expected one image, got {len(images)}")
    pixels = torch.from_numpy(np.asarray(images[0]).copy()).permute(2, 0, 1).float() / 255
    return (pixels - torch.tensor(BLIP_MEAN).view(3, 1, 1)) / torch.tensor(BLIP_STD).view(3, 1, 1)


class TensorImageLoader:
    """A ``vis_tok`` for main's editor with HF models: ``loader(path, file_type="image")`` -> an
    EasyEdit-normalised float32 tensor ``[3, H, W]`` at the file's own size (or resized so the longer
    side is at most ``max_side``: these models' token counts grow with the image)."""

    def __init__(self, max_side: Optional[int] = None):
        self.max_side = max_side

    def __call__(self, file, file_type: str = "image"):
        if file_type not in ("image", "single-image"):
            raise ValueError(f"TensorImageLoader reads single images, not {file_type!r}")
        with Image.open(file) as image:
            image = image.convert("RGB")
            if self.max_side and max(image.size) > self.max_side:
                scale = self.max_side / max(image.size)
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.BICUBIC)
            return to_easyedit_tensor(image)


class NativeProcessor:
    """The model's processor as main's editor ``tok``: everything is the processor's, except that a
    call with a positional string is a tokenizer call (``tok(target, add_special_tokens=False)``),
    and image tensors are turned back into pixels (``_to_pil_list``) before the processor sees them."""

    def __init__(self, processor):
        self.__dict__["processor"] = processor

    def __getattr__(self, name):
        processor = self.__dict__.get("processor")
        if processor is None:  # copy/pickle probing an instance without state
            raise AttributeError(name)
        return getattr(processor, name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["processor"], name, value)

    def __call__(self, *args, **kwargs):
        processor = self.__dict__["processor"]
        if args and "images" not in kwargs and "text" not in kwargs and _is_text(args[0]):
            return processor.tokenizer(*args, **kwargs)
        images = kwargs.get("images")
        if images is not None:  # one entry per row: an image, or a list of images (multi-image rows)
            images = images if isinstance(images, (list, tuple)) else [images]
            kwargs["images"] = [_to_pil_list(i) if isinstance(i, (list, tuple)) else _to_pil_list(i)[0]
                                for i in images]
        return processor(*args, **kwargs)


def _is_text(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(isinstance(v, str) for v in value))


def prepare_editor(editor, max_side: Optional[int] = None):
    """Make a GitHub-main ``MultimodalEditor`` over a Qwen2-VL / LLaVA-OneVision model usable with
    ODEdit (see the module docstring); a no-op for other models. Returns the editor."""
    if not is_native(editor.model):
        return editor
    processor = editor.tok.__dict__["processor"] if isinstance(editor.tok, NativeProcessor) else editor.tok
    editor.tok = NativeProcessor(processor)
    editor.vis_tok = TensorImageLoader(max_side)
    view_for(editor.model, processor)
    return editor
