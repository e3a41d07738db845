"""Reading YAML values: type checks against simple hints (``typed``), and the fields EasyEdit's
editor, evaluators and datasets read, with neutral defaults (``EASYEDIT_FIELDS``). Shared by
ODEdit's hparams and the hosts' own hparams."""
from __future__ import annotations

import typing
from typing import Any, Dict, List, Union

from .errors import ODEditError

# What EasyEdit's editor, evaluators and datasets read, with neutral defaults.
EASYEDIT_FIELDS: Dict[str, Any] = dict(
    model_name=None, name=None, tokenizer_class="PreTrainedTokenizerFast", tokenizer_name=None,
    device=0, dtype=None, model_class=None, state_dict_file=None, qformer_name_or_path=None,
    qformer_checkpoint=None, pretrained_ckpt=None, coco_image="", rephrase_image="",
    exact_match=False, model_parallel=False, max_length=32, batch_size=1, results_dir="./results",
    file_type="image", seed=42,
)


def typed(where: str, value, hint):
    """Check a YAML value against a simple type hint; accept "1e-3" strings for floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return typed(where, value, arg)
            except ODEditError:
                continue
        raise ODEditError(where, value, f"give a value of type {hint_name(hint)}", problem="has the wrong type")
    if origin in (list, List):
        if not isinstance(value, list):
            raise ODEditError(where, value, f"give a YAML list of {hint_name(args[0])}", problem="has the wrong type")
        return [typed(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, bool):
            raise ODEditError(where, value, "give a number", problem="has the wrong type")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ODEditError(where, value, "give a number, e.g. 0.001 or 1e-3", problem="has the wrong type")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ODEditError(where, value, "give a whole number", problem="has the wrong type")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ODEditError(where, value, "give true or false", problem="has the wrong type")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ODEditError(where, value, "give a string", problem="has the wrong type")
    return value


def hint_name(hint) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))
