"""EasyEdit's MEND and SERAC executors as ODEdit and EasyEdit's editor use them: fixes of defects
of EasyEdit (each switchable, see ``fixes.py``; the reasons are in ``patches.PATCHES``)."""
from __future__ import annotations

import functools
import logging

import torch

from .easyedit import MAIN, PYPI, flavour
from .fixes import fix_enabled

OWN_EXECUTOR, ONE_REQUEST, MEND_EVAL, MEND_EDIT_LRS, LOG_HANDLERS = (
    "own_executor", "one_request_executors", "mend_eval", "mend_edit_lrs", "log_handlers")


def ready_mend_executor(executor, model, tok, hparams):
    """EasyEdit's MEND executor, initialised, with its hypernetwork in evaluation mode. The PyPI
    release never calls ``.eval()`` (GitHub main does, before each edit): in training mode MEND's
    input normaliser re-estimates its statistics from every edit's own rows instead of using the
    archive's, so each edit depended on the edits before it (and a one-token answer raised).
    On the PyPI release it also pairs the learned per-weight edit learning rates with the right
    weights (``_pair_mend_edit_lrs_with_weights``)."""
    if not getattr(executor, "is_init", False):
        executor.init_model(model, tok, hparams)
        if flavour() == PYPI and fix_enabled(MEND_EDIT_LRS):
            _pair_mend_edit_lrs_with_weights(executor.alg)
    if fix_enabled(MEND_EVAL):
        executor.alg.eval()
    return executor


def _pair_mend_edit_lrs_with_weights(alg) -> None:
    """MEND learns one edit learning rate per inner parameter, ``edit_lrs[i]`` for
    ``inner_params[i]`` in the order the config lists them (``MEND.edit`` and the trainer pair
    them that way). The PyPI executor's ``apply_to_model`` instead walks
    ``model.named_parameters()`` and gives the i-th inner parameter *it meets* ``edit_lrs[i]``:
    when the config lists them in another order than the model holds them (EasyEdit's own YAMLs
    list ``down_proj`` before ``up_proj``), every weight got another weight's learning rate.
    Here the executor's MEND (its own deep copy of the config) lists its inner parameters in the
    model's order, with ``edit_lrs`` permuted the same way, so both pairings agree with training.
    The hypernetworks are untouched (they are keyed by weight shape and name, not by position)."""
    listed = list(alg.config.inner_params)
    wanted = set(listed)
    in_model = [n for n, _ in alg.model.named_parameters() if n in wanted]
    if in_model == listed or sorted(in_model) != sorted(listed) or len(alg.edit_lrs) != len(listed):
        return  # already in order, or names MEND itself will reject
    order = [listed.index(n) for n in in_model]
    with torch.no_grad():
        alg.edit_lrs.data = alg.edit_lrs.data[order].clone()
    alg.config.inner_params = in_model


def own_executor(editor) -> None:
    """EasyEdit's ``ALG_MULTIMODAL_DICT`` holds one executor per method for the whole process, and
    the SERAC and MEND executors keep the first model and archive they load (``is_init``): a second
    editor in the same process (another archive, another model) silently edited with the first one.
    Each editor gets an executor of its own."""
    if not fix_enabled(OWN_EXECUTOR):
        return
    executor = getattr(getattr(editor, "apply_algo", None), "__self__", None)
    if executor is not None and hasattr(executor, "is_init"):
        executor = type(executor)()
        editor.apply_algo = executor_apply(executor)
        editor.odedit_executor = executor  # e.g. to continue SERAC's memory from an edited SERAC


def editor_executor(editor):
    """The executor behind ``editor.apply_algo`` (MEND, SERAC), or None."""
    return getattr(editor, "odedit_executor", None)


# GitHub main's MultimodalEditor.edit passes ``[request]`` to every executor, but its multimodal MEND
# and SERAC executors read one request (``request["prompt"]``): every single edit failed there.
ONE_REQUEST_EXECUTORS = ("SeracMultimodalRewriteExecutor", "MendMultimodalRewriteExecutor")


def executor_apply(executor):
    """``executor.apply_to_model`` taking a list of requests on both EasyEdit versions."""
    apply = executor.apply_to_model
    if flavour() != MAIN or type(executor).__name__ not in ONE_REQUEST_EXECUTORS or not fix_enabled(ONE_REQUEST):
        return apply

    @functools.wraps(apply)
    def call(model, tok, request, *args, **kwargs):
        if isinstance(request, (list, tuple)) and len(request) == 1:
            request = request[0]
        return apply(model, tok, request, *args, **kwargs)

    return call


def dedupe_handlers(logger: logging.Logger) -> None:
    """EasyEdit's ``make_logs`` adds a file and a stream handler on every editor construction."""
    if not fix_enabled(LOG_HANDLERS):
        return
    seen, kept = set(), []
    for handler in logger.handlers:
        target = getattr(handler, "baseFilename", None) or id(getattr(handler, "stream", None))
        key = (type(handler), target)
        if key in seen:
            handler.close()
            continue
        seen.add(key)
        kept.append(handler)
    logger.handlers[:] = kept
