"""Checks on edit input, run before any weight changes.

* ``validate_edit_call`` checks the arguments of ``MultimodalEditor.edit(...)`` for an ODEdit
  editor *before EasyEdit touches them* (``compat``'s ``edit`` wrapper calls it: ``registration``).
  EasyEdit itself opens the image paths, asserts list lengths and indexes ``locality_inputs``, so
  bad input otherwise surfaces as a bare AssertionError, KeyError, IndexError or PIL error from
  deep inside EasyEdit.
* ``check_request`` checks one request dict as ``apply_odedit_to_multimodal_model`` receives it
  (after EasyEdit prepared it, or from a caller that bypasses the editor).
* ``check_model_fields`` checks an ODEdit config's ``model_name`` and ``name`` before EasyEdit's
  editor or trainer builds the model (``compat``'s ``__init__`` wrappers call it: ``registration``).

Every failure raises ``ODEditError`` / ``ODEditFileNotFoundError`` naming the field, the value and
the fix.
"""
from __future__ import annotations

import difflib
import inspect
import os
import warnings
from typing import Dict, Optional, Tuple

import torch
from PIL import Image

from . import compat
from .errors import ODEditError, ODEditFileNotFoundError
from .models.loading import is_plugin_checkpoint


# ------------------------------------------------------------------------------------------------
# One request (what ODEdit's apply function receives)
# ------------------------------------------------------------------------------------------------
def check_request(request, tokenizer, index: int = 0) -> dict:
    where = f"request[{index}]"
    if not isinstance(request, dict):
        raise ODEditError(where, type(request).__name__, "pass a dict with prompt, target and image")
    for key in ("prompt", "target"):
        value = request.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ODEditError(f"{where}.{key}", value, f"give a non-empty string {key}")
    _check_encodable(tokenizer, request["target"], f"{where}.target")
    image = request.get("image")
    if image is None:
        return request
    field = f"{where}.image"
    if (not isinstance(image, torch.Tensor) or image.layout is not torch.strided or image.dim() not in (3, 4)
            or image.shape[-3] != 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        if isinstance(image, torch.Tensor) and image.layout is not torch.strided:
            shape = f"{image.layout} tensor of shape {shape}"
        raise ODEditError(field, shape, "pass an RGB image tensor [3, H, W] (EasyEdit's vis_tok output)")
    if image.dim() == 4 and image.shape[0] != 1:
        raise ODEditError(field, tuple(image.shape), "pass one image per request: [3, H, W] or [1, 3, H, W]",
                          problem=f"holds {image.shape[0]} images")
    if not image.is_floating_point():
        raise ODEditError(field, f"dtype {image.dtype}", "pass a floating-point image, normalised like EasyEdit's "
                          "vis_tok output (float32), not raw pixel values", problem="has the wrong dtype")
    if min(image.shape[-2:]) < MIN_IMAGE_SIDE:
        raise ODEditError(field, tuple(image.shape), f"give at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels "
                          "(the SE image views blur with a 5x5 kernel)", problem="is too small")
    if not torch.isfinite(image).all():
        raise ODEditError(field, "non-finite values", "pass an image without NaN or inf")
    # The environments take [3, H, W]; CPU resizing has no half-precision kernels. A new dict: the
    # caller's request (EasyEdit evaluates it afterwards) is left as it is.
    normalised = image[0] if image.dim() == 4 else image
    if normalised.dtype in (torch.float16, torch.bfloat16):
        normalised = normalised.float()
    return request if normalised is image else dict(request, image=normalised)


# Smallest image side the environments handle (SE image views: 5x5 Gaussian blur, reflect padding).
MIN_IMAGE_SIDE = 3


def _check_encodable(tokenizer, target: str, field: str) -> None:
    ids = tokenizer(target.strip(), add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise ODEditError(field, target,
                          "use words the model's tokenizer knows (it maps this target to the unknown token)",
                          problem="cannot be encoded")


# ------------------------------------------------------------------------------------------------
# MultimodalEditor.edit(...) for alg_name == "ODEdit"
# ------------------------------------------------------------------------------------------------
# Keyword arguments EasyEdit's edit() accepts through **kwargs and uses (for other algorithms or
# for evaluation); anything else it swallows silently.
_KNOWN_EXTRAS = {"pypi": {"train_ds"}, "main": {"train_ds", "loc_prompts"}}
_LOCALITY_KEYS = {"text": ("prompt", "ground_truth"), "vision": ("image", "prompt", "ground_truth")}


def validate_edit_call(editor, args, kwargs, method=None) -> Tuple[tuple, dict]:
    """Check the arguments of ``editor.edit(*args, **kwargs)`` (``args`` without ``self``) for an
    ODEdit editor; returns ``(args, kwargs)`` to call the original with, normalised where the
    installed EasyEdit would crash on valid input (PyPI: ``locality_inputs=None``, single-string
    locality fields). Raises ``ODEditError`` / ``ODEditFileNotFoundError`` on bad input."""
    flavour = compat.flavour()
    method = method or compat.module("editors.multimodal_editor").MultimodalEditor.edit
    signature = inspect.signature(method)  # follows __wrapped__ to EasyEdit's own edit()
    bound = _bind(signature, editor, args, kwargs)
    arguments = bound.arguments
    _check_extras(signature, arguments, flavour)

    checker = _CallChecker(editor, flavour)
    n = checker.edits(arguments)
    checker.device()
    checker.targets_encodable()
    for name, root in (("rephrase_prompts", None), ("rephrase_image", "rephrase")):
        if arguments.get(name) is not None:
            arguments[name] = checker.per_edit_list(name, arguments[name], n, paths=root)
    if "file_type" in signature.parameters and arguments.get("file_type") is not None:
        checker.file_type(arguments["file_type"], n)
    arguments["locality_inputs"] = checker.locality(arguments.get("locality_inputs"), n)
    checker.images(arguments)
    return tuple(bound.args[1:]), dict(bound.kwargs)


def _bind(signature: inspect.Signature, editor, args, kwargs) -> inspect.BoundArguments:
    try:
        return signature.bind(editor, *args, **kwargs)
    except TypeError as err:
        try:
            partial = signature.bind_partial(editor, *args, **kwargs)
        except TypeError:
            raise ODEditError("edit arguments", f"{len(args)} positional, keywords {sorted(kwargs)}",
                              f"call edit(prompts, targets, image, ...) as its signature {signature} says "
                              f"({err})", problem="do not match edit()'s signature") from None
        missing = [name for name, p in signature.parameters.items()
                   if p.default is inspect.Parameter.empty
                   and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in partial.arguments]
        name = missing[0] if missing else "edit arguments"
        hint = _close_match(name, kwargs)
        fix = f"pass `{name}=`" + (f" (got `{hint}=`, which EasyEdit does not read)" if hint else "")
        raise ODEditError(name, None, fix, problem="is missing") from None


def _close_match(name: str, candidates) -> Optional[str]:
    """A keyword the caller probably meant as ``name`` (``target_new`` for ``targets``...)."""
    pool = [c for c in candidates if c != name]
    for c in pool:
        stem = name.rstrip("s")
        if c.startswith(stem) or stem.startswith(c.rstrip("s")):
            return c
    match = difflib.get_close_matches(name, pool, n=1, cutoff=0.75)
    return match[0] if match else None


def _check_extras(signature: inspect.Signature, arguments: dict, flavour: str) -> None:
    var_kw = [n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD]
    extras = arguments.get(var_kw[0], {}) if var_kw else {}
    named = [n for n, p in signature.parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD and n != "self"]
    for key, value in extras.items():
        if key in _KNOWN_EXTRAS.get(flavour, set()):
            continue
        meant = difflib.get_close_matches(key, named, n=1, cutoff=0.75)
        if meant:
            raise ODEditError(key, value, f"did you mean `{meant[0]}=`? EasyEdit silently ignores `{key}=`",
                              problem="is not an argument of edit()")
        warnings.warn(f"MultimodalEditor.edit(): keyword `{key}` is not read by EasyEdit or ODEdit and is ignored",
                      UserWarning, stacklevel=5)  # the caller of editor.edit()


class _CallChecker:
    def __init__(self, editor, flavour: str):
        self.editor, self.flavour, self.main = editor, flavour, flavour == compat.MAIN
        self.hparams = getattr(editor, "hparams", None)
        self.checked_paths: Dict[str, None] = {}

    # -- prompts / targets / image ----------------------------------------------------------
    def edits(self, arguments: dict) -> int:
        prompts, targets, image = arguments["prompts"], arguments["targets"], arguments["image"]
        if isinstance(prompts, str):
            for name, value in (("targets", targets), ("image", image)):
                if isinstance(value, (list, tuple)):
                    raise ODEditError(name, value, f"prompts is a single string, so give {name} as a single value too "
                                      "(or pass prompts, targets and image as lists of equal length)",
                                      problem="does not match prompts")
            prompts, targets, image = [prompts], [targets], [image]
        elif isinstance(prompts, list):
            if not prompts:
                raise ODEditError("prompts", prompts, "pass at least one prompt", problem="is empty")
            for name, value in (("targets", targets), ("image", image)):
                if not isinstance(value, list):
                    raise ODEditError(name, value, f"prompts is a list, so give {name} as a list too, "
                                      f"one entry per prompt ({len(prompts)})", problem="is not a list")
                if len(value) != len(prompts):
                    raise ODEditError(name, value, f"give one entry per prompt ({_count(len(prompts), 'prompt')})",
                                      problem=f"has {_count(len(value), 'entry')} for {_count(len(prompts), 'prompt')}")
        else:
            raise ODEditError("prompts", prompts, "pass a string or a list of strings", problem="has the wrong type")
        self._scalar = isinstance(arguments["prompts"], str)
        for name, values in (("prompts", prompts), ("targets", targets)):
            for i, value in enumerate(values):
                _non_empty_text(name if self._scalar else f"{name}[{i}]", value)
        self._prompts, self._targets, self._images = prompts, targets, image
        return len(prompts)

    def targets_encodable(self) -> None:
        tokenizer = getattr(self.editor, "tok", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # main's HF models: tok is a processor
        if tokenizer is None or not callable(tokenizer):
            return
        for i, target in enumerate(self._targets):
            _check_encodable(tokenizer, target, "targets" if self._scalar else f"targets[{i}]")

    def images(self, arguments: dict) -> None:
        for i, path in enumerate(self._images):
            self.image_file("image" if self._scalar else f"image[{i}]", path, "vis")
        rephrase = arguments.get("rephrase_image")
        for i, path in enumerate(rephrase or []):
            self.image_file(f"rephrase_image[{i}]", path, "rephrase")
        vision = (arguments.get("locality_inputs") or {}).get("vision")
        for i, path in enumerate((vision or {}).get("image", [])):
            self.image_file(f"locality_inputs['vision']['image'][{i}]", path, "vis")

    # -- lists that must hold one entry per edit ----------------------------------------------
    def per_edit_list(self, field: str, value, n: int, paths: Optional[str] = None) -> list:
        single = (str, os.PathLike) if paths else (str,)
        if isinstance(value, single):
            value = [value]
        if not isinstance(value, list):
            kind = "a path or a list of paths" if paths else "a string or a list of strings"
            raise ODEditError(field, value, f"give {kind}, one per edit", problem="has the wrong type")
        if len(value) != n:
            raise ODEditError(field, value, f"give one entry per edit ({_count(n, 'edit')})",
                              problem=f"has {_count(len(value), 'entry')} for {_count(n, 'edit')}")
        if not paths:
            for i, item in enumerate(value):
                _non_empty_text(f"{field}[{i}]", item)
        return value

    def file_type(self, value, n: int) -> None:
        if isinstance(value, str):
            return
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ODEditError("file_type", value, "give 'image' or a list of 'image', one per edit",
                              problem="has the wrong type")
        if len(value) != n:
            raise ODEditError("file_type", value, f"give one entry per edit ({_count(n, 'edit')})",
                              problem=f"has {_count(len(value), 'entry')} for {_count(n, 'edit')}")

    def locality(self, value, n: int) -> dict:
        """A new dict (the caller's is never changed); ``None`` becomes ``{}`` (the PyPI release
        calls ``.keys()`` on it) and single strings become one-element lists (the PyPI release
        compares the *unwrapped* string's length with the number of edits)."""
        if value is None:
            return {}
        field = "locality_inputs"
        if not isinstance(value, dict):
            raise ODEditError(field, value, "give a dict {'text': {'prompt': [...], 'ground_truth': [...]}, "
                              "'vision': {'image': [...], 'prompt': [...], 'ground_truth': [...]}} or leave it out",
                              problem="is not a dict")
        out = {}
        for key, part in value.items():
            if key not in _LOCALITY_KEYS:
                raise ODEditError(f"{field}[{key!r}]", part, "use the keys 'text' and/or 'vision'",
                                  problem="is not a known key")
            where = f"{field}[{key!r}]"
            needed = _LOCALITY_KEYS[key]
            if not isinstance(part, dict):
                raise ODEditError(where, part, f"give a dict with {', '.join(repr(k) for k in needed)}",
                                  problem="is not a dict")
            for sub in part:
                if sub not in needed:
                    raise ODEditError(f"{where}[{sub!r}]", part[sub],
                                      f"use the keys {', '.join(repr(k) for k in needed)}",
                                      problem="is not a known key")
            entry = {}
            for sub in needed:
                if sub not in part:
                    raise ODEditError(f"{where}[{sub!r}]", part, f"add {sub!r}: a list with one entry per edit ({n})",
                                      problem="is missing")
                entry[sub] = self.per_edit_list(f"{where}[{sub!r}]", part[sub], n,
                                                paths="vis" if sub == "image" else None)
            out[key] = entry
        return out

    # -- image files, resolved the way the installed EasyEdit resolves them ------------------
    def image_file(self, field: str, path, root_kind: str) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ODEditError(field, type(path).__name__, "give the path of an image file (EasyEdit opens it itself)",
                              problem="is not a path")
        resolved, how = self._resolve(field, path, root_kind)
        if resolved in self.checked_paths:
            return
        if not os.path.exists(resolved):
            raise ODEditFileNotFoundError(field, resolved, how)
        if not os.path.isfile(resolved):
            raise ODEditError(field, resolved, "give an image file, not a folder", problem="is not a file")
        try:
            with Image.open(resolved) as image:
                image.verify()  # structure and checksums
            with Image.open(resolved) as image:
                image.load()  # a truncated file passes verify() but fails to decode
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise ODEditError(field, resolved, f"replace it with a valid PNG/JPEG file ({type(err).__name__}: {err})",
                              problem="is not a readable image") from None
        self.checked_paths[resolved] = None

    def _resolve(self, field: str, path, root_kind: str) -> Tuple[str, str]:
        path = os.fspath(path)
        if self.main:
            return path, ("give the path of an existing image file: GitHub main EasyEdit opens it as given "
                          f"(relative paths start at the current directory, {os.getcwd()})")
        attr, hp_field = ("vis_root", "coco_image") if root_kind == "vis" else ("rephrase_root", "rephrase_image")
        root = getattr(self.editor, attr, getattr(self.hparams, hp_field, None))
        if not isinstance(root, (str, os.PathLike)):
            raise ODEditError(f"hparams.{hp_field}", root,
                              f"set `{hp_field}:` in the YAML: this EasyEdit (PyPI 0.0.1.dev0) joins {field} to it "
                              "('' reads paths relative to the current directory)", problem="is not a folder path")
        resolved = os.path.join(root, path)
        if os.path.isabs(path) or not os.fspath(root):
            return resolved, "give the path of an existing image file (absolute paths are opened as given)"
        return resolved, (f"this EasyEdit (PyPI 0.0.1.dev0) joins image paths to hparams.{hp_field} "
                          f"({os.fspath(root)!r}): give a path relative to it, or an absolute path")

    # -- the device EasyEdit will use ----------------------------------------------------------
    def device(self) -> None:
        check_device(getattr(self.hparams, "device", None), self.flavour)


def check_device(device, flavour: str, field: str = "hparams.device") -> None:
    """A device the installed EasyEdit can use on this machine. On a machine without a GPU, GPU
    indices and ``cuda:N`` are fine: ``compat`` runs EasyEdit's CUDA code on the CPU there."""
    n_gpu = _gpu_count()
    pypi = flavour == compat.PYPI
    if pypi:
        usage = "give a GPU index (e.g. 0)" + ("" if n_gpu else ", or 'cpu' (this machine has no GPU)")
    else:
        usage = "give a GPU index (e.g. 0), 'cuda:N' or 'cpu'"
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device, type(None))):
        raise ODEditError(field, device, usage, problem="has the wrong type")
    if device is None or (isinstance(device, str) and not device.strip()):
        if pypi and n_gpu:
            raise ODEditError(field, device, f"{usage}: this EasyEdit moves the model to f'cuda:{{device}}'",
                              problem="is not set")
        return
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        kind, index, bare = "cuda", int(device), True
    else:
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ODEditError(field, device, usage, problem="cannot be parsed as a device") from None
        kind, index, bare = parsed.type, parsed.index, False
    if index is not None and index < 0:
        raise ODEditError(field, device, f"{usage}; a negative index is no device",
                          problem="cannot be parsed as a device")
    if kind not in ("cuda", "cpu"):
        raise ODEditError(field, device, f"{usage}: ODEdit runs EasyEdit on cpu or cuda only",
                          problem="is not a supported device")
    if not n_gpu:
        return  # EasyEdit's CUDA calls are redirected to the CPU (compat.cpu_redirect)
    if kind == "cuda" and (index or 0) >= n_gpu:
        raise ODEditError(field, device, f"this machine has {n_gpu} GPU(s): use an index 0..{n_gpu - 1}",
                          problem="names a GPU that does not exist")
    if pypi and not bare:
        raise ODEditError(field, device, f"{usage}: this EasyEdit (PyPI 0.0.1.dev0) builds f'cuda:{{device}}' "
                          "itself, so only a bare GPU index works on a machine with a GPU",
                          problem="cannot be used by this EasyEdit")


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _count(n: int, noun: str) -> str:
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{n} {noun if n == 1 else plural}"


def _non_empty_text(field: str, value) -> None:
    if not isinstance(value, str):
        raise ODEditError(field, value, "give a string", problem="has the wrong type")
    if not value.strip():
        raise ODEditError(field, value, "give a non-empty string", problem="is empty")


# ------------------------------------------------------------------------------------------------
# The model an ODEdit editor or trainer is about to build
# ------------------------------------------------------------------------------------------------
LAVIS_PATH_NAMES = ("blip2", "minigpt4")  # EasyEdit's model_name values the plugin's loader serves


def check_model_fields(hparams, on_main: bool) -> None:
    """ODEdit drives models through the plugin's adapter: on EasyEdit's LAVIS path ``name`` must be a
    folder the plugin loads (EasyEdit would otherwise build its own LAVIS model, trying to download
    its weights for minutes on a machine without a hub, and ODEdit could not edit it anyway); the
    PyPI release has no other path (it fails with an UnboundLocalError); on GitHub main the HF path
    needs the folder to exist."""
    model_name, name = getattr(hparams, "model_name", None), getattr(hparams, "name", None)
    if model_name in LAVIS_PATH_NAMES:
        if is_plugin_checkpoint(name):
            return
        fix = ("set name to the folder `python -m easyedit_odedit.models.minigpt4` writes (README: MiniGPT-4)"
               if model_name == "minigpt4" else
               "set name (and tokenizer_name) to a transformers BLIP-2 or LLaVA directory, or a plugin model folder")
        fix += "; ODEdit edits models through the plugin's loader, not EasyEdit's own LAVIS models"
        if not _is_folder(name):
            raise ODEditFileNotFoundError("name", name, fix)
        raise ODEditError("name", name, fix, problem="is not a model folder the plugin can load")
    if not on_main:
        raise ODEditError("model_name", model_name, "the installed EasyEdit (PyPI release) builds blip2 and minigpt4 "
                          "only: use model_name: blip2 with a transformers LLaVA / BLIP-2 directory as name, or "
                          "install EasyEdit from GitHub main for its Qwen2-VL / LLaVA-OneVision path",
                          problem="is not a model the installed EasyEdit can build")
    if not _is_folder(name):
        raise ODEditFileNotFoundError("name", name, "set model_name and name to the model's folder (GitHub main "
                                      "recognises Qwen2-VL / LLaVA-OneVision by the folder's name)")


def _is_folder(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path)
