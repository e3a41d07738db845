"""Spill found on the edited weights: after an edit's optimisation, the pool images the content
miner described (``ContentMiner``: their unedited answers to the edit's question and the probes)
are asked again, of the model as edited. A question whose answer moved, on an image that does not
show the edit's content, is where the edit spilled; it becomes an ``OUT_spill`` row (its unedited
answer to keep) of another round of the edit. An image of the same content that does not give the
edit's target is where the edit fell short; it becomes an ``SE_content`` row of that round.

Cost of a round: one greedy decode of every watched (question, image) pair - ``probe_pool`` images
times the questions, ``n_tokens`` forward passes in slices of ``probe_batch`` rows - plus a new
unedited-reference pass over the edit's rows and the round's optimisation steps.
"""
from __future__ import annotations

from typing import List

from ..environments import Row, same_answer
from ..models.adapter import MultimodalLMAdapter
from .rows import unedited_answers


def spilled(adapter: MultimodalLMAdapter, view: dict, n_tokens: int, settings) -> List[Row]:
    """Up to ``pool_factor * near_miss_rows`` watched rows the edited model gets wrong: first those
    where the edit went where it must not (an OUT row now giving the edit's target) or fell short of
    the same content (an SE row), then the other OUT rows whose answer moved; one row per image
    before a second one. Taken rows leave the watch."""
    watched: List[Row] = view.get("watched") or []
    said = []
    for start in range(0, len(watched), settings.probe_batch):
        said += unedited_answers(adapter, watched[start:start + settings.probe_batch], n_tokens)
    wrong = [(row, answer) for row, answer in zip(watched, said) if not same_answer(answer, row.target)]
    wrong.sort(key=lambda found: found[0].env != "SE_content" and not same_answer(found[1], view["target"]))
    first, repeat, seen = [], [], set()
    for row, _ in wrong:  # stable sort: the pool's order within each kind
        shows = row.source or row.prompt  # the image, or the text question
        (repeat if shows in seen else first).append(row)
        seen.add(shows)
    taken = (first + repeat)[: settings.pool_factor * settings.near_miss_rows]
    view["watched"] = [row for row in watched if all(row is not t for t in taken)]
    return taken
