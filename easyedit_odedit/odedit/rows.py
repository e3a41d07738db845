"""The rows an edit is trained on: its environments (``environments.EnvironmentBuilder``) with the
unedited model's answers where a row's target is what must not change."""
from __future__ import annotations

from typing import List, Sequence

import torch

from .. import compat
from ..environments import EnvironmentBuilder, Row, without_conflicts
from ..models.adapter import MultimodalLMAdapter
from ..pool_index import Probes, index_for
from ..pool_index_store import IndexStore, describe_processor, file_digest, store_folder


def build_rows(adapter: MultimodalLMAdapter, view: dict, hparams, seed: int, past: Sequence[dict] = (),
               unedited: bool = True) -> List[Row]:
    """``unedited``: the model holds the weights it had before any edit of ``past`` (the pool's
    index answers for it)."""
    env = hparams.environments
    builder = EnvironmentBuilder(env, image_processor(hparams), getattr(hparams, "coco_image", ""), seed,
                                 view_size=adapter.image_size)
    rows = builder.in_and_se(view)
    out = builder.out_candidates(view)

    n_tokens = len(adapter.tokenizer(view["target"])["input_ids"])
    # the pool's features and fixed probes' answers, computed once per (model, pool)
    index = pool_index_for(adapter, builder, env, unedited=unedited) if builder.by_content else None
    probes = Probes(adapter, lambda rows, n: unedited_answers(adapter, rows, n), n_tokens, env.probe_batch,
                    env.probes, index)
    rows += out["text"] + builder.near_and_far(view, rows, out["image"], probes.features, probes.answers)
    if view.get("watched") and hparams.constraints.reprobe_rounds:  # text questions, asked again after the edit
        text = builder.text_watch(seed, len(out["text"]) + env.probe_pool // TEXT_WATCH_SHARE)
        view["watched"] = view["watched"] + [r for r in text if all(r.prompt != t.prompt for t in out["text"])]
        _fill_unedited_answers(adapter, view["watched"], n_tokens)
    _fill_unedited_answers(adapter, rows, n_tokens)
    if past and env.past_reference == "sequence_start":
        rows = without_conflicts(rows, past)
        view["watched"] = without_conflicts(view.get("watched", []), past)  # earlier edits moved those
    return rows + builder.past(past, view)


TEXT_WATCH_SHARE = 8  # text questions watched for spill: one for every 8 pool images described


def pool_index_for(adapter: MultimodalLMAdapter, builder: EnvironmentBuilder, env, unedited: bool):
    """The index of the builder's pool on this model (``pool_index.index_for``), kept in the folder
    ``environments.pool_index`` names (``pool_index_store``), or in memory only."""
    paths = list(dict.fromkeys(e.image_path for e in builder.pool if e.image_path is not None))
    folder = store_folder(env.pool_index)
    key = (env.locality_pool, env.locality_image_root, adapter.image_size, env.probe_batch, folder)

    def open_store() -> IndexStore:
        pool = {"pool": file_digest(builder.pool_file), "processor": describe_processor(builder.image_processor),
                "view_size": adapter.image_size}
        return IndexStore.for_model(folder, adapter, paths, env.probe_batch, pool)

    return index_for(adapter, key, paths, builder.load_image, env.probe_batch, unedited,
                     open_store if folder else None)


def image_processor(hparams):
    """The processor EasyEdit's LAVIS path applies to request images, so pool images match them."""
    return compat.module("dataset.processor.blip_processors").BlipImageEvalProcessor(image_size=364, mean=None, std=None)


def _fill_unedited_answers(adapter: MultimodalLMAdapter, rows: List[Row], n_tokens: int) -> None:
    """Rows without a target get the unedited model's greedy answer (what must not change)."""
    todo = [r for r in rows if r.target is None]
    for row, answer in zip(todo, unedited_answers(adapter, todo, n_tokens)):
        row.target = answer


@torch.no_grad()
def unedited_answers(adapter: MultimodalLMAdapter, probes: List[Row], n_tokens: int) -> List[str]:
    """The model's greedy answer (``n_tokens`` tokens) to each row's prompt and image, batched."""
    answers, ids = [""] * len(probes), [[] for _ in probes]
    for _ in range(max(n_tokens, 1) if probes else 0):
        texts = [f"{r.prompt} {a}".rstrip() for r, a in zip(probes, answers)]
        lens = [len(adapter.tokenizer(t)["input_ids"]) for t in texts]
        batch = adapter.embed(texts, [r.image for r in probes], lens)
        logits, _ = adapter.decode(batch, tail=1)
        for row_ids, token in zip(ids, logits[:, -1].argmax(-1).tolist()):
            row_ids.append(token)
        # the tokens decoded together: a word split into sub-words comes back as one word
        answers = [adapter.tokenizer.decode(row_ids, skip_special_tokens=True).strip() for row_ids in ids]
    return answers
