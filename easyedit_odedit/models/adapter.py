"""The interface EasyEdit's multimodal code calls, over transformers' vision-language models.

EasyEdit's LAVIS-style path (``model_name: blip2`` / ``minigpt4``: evaluation, MEND, the trainer)
calls ``model(samples)`` with ``image``, ``text_input``, ``labels`` and ``prompts_len`` and reads
``.logits``, ``.labels``, ``.attention_mask``, ``.loss`` and ``.config``. ``MultimodalLMAdapter``
gives any (image encoder, causal LM, tokenizer) triple that interface:

* the sequence is ``[image tokens][prompt + target]``, left-padded, so the text is the suffix of
  every row (the PyPI release's evaluator reads the last ``len(target)`` positions);
* ``labels`` are full-length and -100 everywhere except the target tokens (main's evaluator shifts
  them against the logits);
* images of any size are resized to the encoder's own, so EasyEdit's 364-pixel BLIP processor can
  feed a 64-pixel model.

It also exposes the pieces ODEdit's objective needs to run many environments in one batch: the
embedding step, the decoder step with a logit scale, and the decoder's layer stack (for caching
the activations below the edited layers).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ModelOutput

IGNORE = -100


@dataclass
class AdapterOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None


@dataclass
class EmbeddedBatch:
    """Rows ready for the decoder: left-padded embeddings with their mask, positions and labels."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor


class AdapterConfig(dict):
    """Plain-dict config: MEND stores ``model.config`` in its archive and compares it on load."""

    def to_dict(self):
        return dict(self)


class MultimodalLMAdapter(nn.Module):
    def __init__(self, image_encoder: nn.Module, language_model: nn.Module, tokenizer,
                 image_size: int, config: Optional[dict] = None):
        super().__init__()
        self.image_encoder = image_encoder
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.config = AdapterConfig(config or {})
        # EasyEdit's LAVIS models carry their tokenizer under these names; WISE and SERAC read them.
        self.opt_tokenizer = tokenizer
        self._encoded: Optional[dict] = None  # see ``reusing_image_encodings``

    # -- device / dtype ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype

    def train(self, mode: bool = True):
        """The image encoder stays in eval mode: a BatchNorm tower in training mode makes a row's
        output depend on the rest of the batch, which editing must never do."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    # -- EasyEdit's interface ---------------------------------------------------------------
    def forward(self, samples, logit_scale=None) -> AdapterOutput:
        if isinstance(samples, (list, tuple)):  # main's trainer may pass a list of sample dicts
            samples = _merge_samples(samples)
        self._tokenise_string_labels(samples)
        batch = self.embed(samples["text_input"], samples.get("image"), self._prompt_counts(samples["prompts_len"]))
        logits, hidden = self.decode(batch, logit_scale=logit_scale)
        loss = token_nll(logits, batch.labels)
        # hidden_states: the last layer's, which the decoder computes anyway (ODEdit's MMD reads it)
        return AdapterOutput(loss=loss, logits=logits, labels=batch.labels,
                             attention_mask=batch.attention_mask, hidden_states=hidden)

    # EasyEdit's prompt counts include the tokenizer's leading special tokens (BOS) or not, by
    # version and model class (``compat.counts_special_tokens``, set when EasyEdit constructs the
    # model); ``embed`` counts with them. Without this a BOS tokenizer on main labels the prompt's
    # last token as part of the target.
    prompts_len_counts_special_tokens = True

    def _prompt_counts(self, prompts_len) -> List[int]:
        counts = [int(n) for n in prompts_len]
        if self.prompts_len_counts_special_tokens:
            return counts
        return [n + self.leading_special_tokens() for n in counts]

    def leading_special_tokens(self) -> int:
        """How many special tokens (BOS) the tokenizer puts before a text."""
        ids, special = self.tokenizer("a")["input_ids"], set(self.tokenizer.all_special_ids)
        return next((i for i, t in enumerate(ids) if t not in special), len(ids))

    def _tokenise_string_labels(self, samples) -> None:
        """The PyPI release's MEND executor passes target *strings* as labels and later calls
        ``.clone()`` on them; its ``MEND.edit`` runs the model first, so tokenise them here."""
        labels = samples.get("labels")
        if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], str):
            ids = [self.tokenizer(t.strip(), add_special_tokens=False)["input_ids"] for t in labels]
            width = max(len(i) for i in ids)
            samples["labels"] = torch.tensor([[IGNORE] * (width - len(i)) + i for i in ids],
                                             device=self.device)

    # -- pieces ------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] at any size -> [B, N, D] image-token embeddings."""
        return self.image_encoder(self._resize(images.to(device=self.device, dtype=self.dtype)))

    @contextlib.contextmanager
    def reusing_image_encodings(self):
        """Within this block every image tensor is encoded once: an edit's set-up encodes the same
        images for the near-miss search and again for the unedited pass, and no weight changes in
        between. Only for such blocks: an edit that changes the image encoder (FT-V) needs fresh
        encodings afterwards."""
        self._encoded = {}
        try:
            yield
        finally:
            self._encoded = None

    def forget_image_encodings(self) -> None:
        """Inside ``reusing_image_encodings``: the weights changed, encode again."""
        if self._encoded is not None:
            self._encoded = {}

    def _encode_list(self, images: List[torch.Tensor]) -> List[torch.Tensor]:
        """[N, D] image-token embeddings of each image (any sizes), in one batched pass."""
        memo = self._encoded if self._encoded is not None else {}
        todo = [im for im in dict.fromkeys(images, None) if id(im) not in memo]  # distinct, in order
        if todo:
            encoded = self.encode_images(torch.stack([self._resize(_chw(im).to(self.device)) for im in todo]))
            for im, enc in zip(todo, encoded):
                memo[id(im)] = (im, enc)  # the tensor is kept with it, so its id cannot be reused
        return [memo[id(im)][1] for im in images]

    @torch.no_grad()
    def image_features(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """[N, D]: each image's mean image-token embedding, for images of any sizes. One batched
        pass after resizing to the model's own size (one pass per image cost most of an edit's
        set-up); models whose token count follows the image size (``image_size == 0``) go one by one."""
        if not self.image_size:
            return torch.cat([self.encode_images(_chw(image).unsqueeze(0)).float().mean(1) for image in images])
        return torch.stack(self._encode_list(list(images))).float().mean(1)

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] == self.image_size and images.shape[-2] == self.image_size:
            return images
        batched = images if images.dim() == 4 else images.unsqueeze(0)
        out = F.interpolate(batched, size=(self.image_size, self.image_size), mode="bilinear",
                            antialias=True, align_corners=False)
        return out if images.dim() == 4 else out[0]

    def embed(self, texts: Sequence[str], images, prompts_len: Sequence[int]) -> EmbeddedBatch:
        """Tokenise, mask prompts, embed, and lay out ``[pad][image][text]`` rows (with a ``chat``
        config: ``[pad][BOS user][image][image_end prompt assistant][target]``, see ``chat_ids``)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.tokenizer(t)["input_ids"] for t in texts]
        image_embeds = self._image_rows(images, len(texts))
        token_embeds = self.language_model.get_input_embeddings()
        rows, labels = [], []
        for i, row_ids in enumerate(ids):
            before, after, n_masked = self.chat_ids(row_ids, int(prompts_len[i]), image_embeds[i] is not None)
            parts = [token_embeds(torch.tensor(before, device=self.device))] if before else []
            if image_embeds[i] is not None:
                parts.append(image_embeds[i])
            parts.append(token_embeds(torch.tensor(after, device=self.device)))
            n_before = len(before) + (image_embeds[i].shape[0] if image_embeds[i] is not None else 0)
            rows.append(torch.cat(parts, dim=0))
            labels.append([IGNORE] * (n_before + min(n_masked, len(after))) + after[n_masked:])
        return self._left_pad(rows, labels)

    def chat_ids(self, ids: List[int], n_prompt: int, has_image: bool):
        """(token ids before the image, token ids after it, how many of those are prompt).

        Without a ``chat`` entry in the config the whole text follows the image. With one (e.g.
        LLaVA-1.5's ``{"user": "USER: ", "image_end": "\n", "assistant": " ASSISTANT:"}``) the
        row reads as the model was instruction-tuned: BOS and the user tag before the image, the
        prompt, the assistant tag, then the target. ``n_prompt`` counts the prompt's tokens as
        EasyEdit does (BOS included when the tokenizer adds one)."""
        chat = self.config.get("chat")
        if not chat:
            return [], list(ids), n_prompt
        piece = self._chat_piece
        bos = list(ids[:1]) if ids and ids[0] == self.tokenizer.bos_token_id else []
        body, n_body = list(ids[len(bos):]), max(n_prompt - len(bos), 0)
        before = bos + piece(chat.get("user", ""))
        after = (piece(chat.get("image_end", "")) if has_image else []) + body[:n_body] + piece(chat.get("assistant", ""))
        return before, after + body[n_body:], len(after)

    def _chat_piece(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _image_rows(self, images, n: int) -> List[Optional[torch.Tensor]]:
        if images is None:
            return [None] * n
        if isinstance(images, (list, tuple)):
            present = [i for i, im in enumerate(images) if im is not None]
            rows: List[Optional[torch.Tensor]] = [None] * n
            for i, encoded in zip(present, self._encode_list([images[i] for i in present])):
                rows[i] = encoded
            return rows
        if images.dim() == 3:
            images = images.unsqueeze(0)
        encoded = self.encode_images(images)
        if encoded.shape[0] == 1 and n > 1:
            encoded = encoded.expand(n, -1, -1)
        return list(encoded)

    def _left_pad(self, rows: List[torch.Tensor], labels: List[List[int]]) -> EmbeddedBatch:
        width = max(r.shape[0] for r in rows)
        dim = rows[0].shape[-1]
        embeds = rows[0].new_zeros(len(rows), width, dim)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        label_t = torch.full((len(rows), width), IGNORE, dtype=torch.long, device=self.device)
        for i, (row, lab) in enumerate(zip(rows, labels)):
            embeds[i, width - row.shape[0]:] = row
            mask[i, width - row.shape[0]:] = 1
            label_t[i, width - len(lab):] = torch.tensor(lab, device=self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return EmbeddedBatch(embeds, mask, position_ids, label_t)

    def text_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def lm_head(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def decode(self, batch: EmbeddedBatch, logit_scale=None, tail: Optional[int] = None):
        """Run the language model; returns (logits * logit_scale, last hidden states), for the last
        ``tail`` positions only when given (a LLaVA row has 576 image positions that no risk reads:
        the LM head and its float copies would be most of the memory)."""
        hidden = self.decode_hidden(batch, tail)
        logits = self.lm_head()(hidden)
        return (logits if logit_scale is None else logits * logit_scale), hidden

    def decode_hidden(self, batch: EmbeddedBatch, tail: Optional[int] = None) -> torch.Tensor:
        """The decoder's last hidden states (after its final norm), of the last ``tail`` positions
        when given: for callers that apply the LM head to the few positions they read.

        The decoder and the LM head are called separately (rather than asking the causal LM for
        ``output_hidden_states``): transformers 5 collects hidden states with hooks that MEND's
        monkey-patched model copies do not carry."""
        hidden = self.text_decoder()(inputs_embeds=batch.inputs_embeds,
                                     attention_mask=batch.attention_mask,
                                     position_ids=batch.position_ids,
                                     use_cache=False).last_hidden_state
        return hidden if tail is None else hidden[:, -tail:]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the positions whose label is not -100."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def _chw(image: torch.Tensor) -> torch.Tensor:
    return image[0] if image.dim() == 4 else image


def _merge_samples(samples_list):
    merged = {"text_input": [], "image": [], "prompts_len": [], "labels": None}
    for samples in samples_list:
        n = len(samples["text_input"])
        merged["text_input"] += list(samples["text_input"])
        merged["prompts_len"] += list(samples["prompts_len"])
        image = samples.get("image")
        merged["image"] += [None] * n if image is None else [image[i] for i in range(n)]
    return merged
