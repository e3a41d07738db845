"""The pool index on disk (``environments.pool_index``: a folder, or ``auto``).

A saved index is only as good as its key: what an index holds is a function of the model's weights,
the pool, how its images are processed, the probes and the batch layout, and of the arithmetic that
computed it. The key therefore holds

* ``weights``: SHA-256 over every parameter's and buffer's name, dtype, shape and raw bytes
  (``weights_digest``). Not a fingerprint of norms: norms do not change when rows are permuted or
  signs flipped, and two checkpoints of one architecture can share them; a byte hash cannot be
  fooled short of a SHA-256 collision. Each tensor is hashed on its own, in a thread pool (hashlib
  releases the GIL), and the digests are hashed together;
* ``pool``: SHA-256 of the pool file's bytes, and ``images``: of its images' bytes (a pool whose
  images changed under the same JSON is stale; one copied elsewhere is the same pool);
* the image processor, the model's view size, ``probe_batch`` (the fixed slices), the device kind
  and the torch version (another kernel can round differently: the promise is that a loaded index
  gives bit-identical edits to one built in memory, not that two devices agree).

One folder per key (the hash of the key without ``images``), one file per entry - the features, and
the answers to each (probe, ``n_tokens``) - each file holding its full key: a file whose key differs
is stale, one that cannot be read is corrupt; either is rebuilt with a warning. Files are written to
a temporary name and renamed, so a reader never sees half a file, and two processes that build the
same entry write the same bytes.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .errors import ODEditError

FORMAT = 1
SETTING = "environments.pool_index"
IN_MEMORY, AUTO = "memory", "auto"


def store_folder(value: str) -> Optional[str]:
    """The folder ``environments.pool_index`` names: None for ``memory``, the plugin's cache for
    ``auto`` (``$ODEDIT_CACHE/pool-index``), else the path itself."""
    if value == IN_MEMORY:
        return None
    if value == AUTO:
        from .shipped import cache_dir

        return os.path.join(cache_dir(), "pool-index")
    return os.path.abspath(os.path.expanduser(value))


def weights_digest(model: torch.nn.Module, workers: Optional[int] = None) -> str:
    """SHA-256 of the model's parameters and buffers: names, dtypes, shapes and bytes. ``workers``
    threads hash tensors side by side (default: torch's thread count, so a process told to use one
    core uses one)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    with ThreadPoolExecutor(max(1, workers or torch.get_num_threads())) as pool:
        digests = list(pool.map(lambda item: tensor_digest(item[1]), tensors))
    whole = hashlib.sha256()
    for (name, t), digest in zip(tensors, digests):
        whole.update(f"{name}\x00{t.dtype}\x00{tuple(t.shape)}\x00".encode())
        whole.update(digest)
    return whole.hexdigest()


def tensor_digest(t: torch.Tensor) -> bytes:
    """The tensor's bytes hashed, whatever its dtype (bfloat16 included) and device."""
    data = t.detach().reshape(-1).contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy()).digest()


def file_digest(path: str) -> str:
    stat = os.stat(path)
    return _file_digest(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def images_digest(paths: Sequence[str]) -> str:
    """SHA-256 over the pool images' bytes, in pool order (a missing image counts as changed).
    Contents, not paths or modification times: a pool copied elsewhere keeps its index, and one whose
    images changed under the same JSON is stale."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        except OSError:
            digest.update(f"missing {os.path.basename(path)}".encode())
    return digest.hexdigest()


def describe_processor(processor) -> str:
    """The processor's class and transform, without memory addresses (they change every process)."""
    shown = f"{type(processor).__module__}.{type(processor).__qualname__}"
    transform = getattr(processor, "transform", None)
    if transform is not None:
        shown += " " + repr(transform)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", shown)


def device_kind(adapter) -> str:
    device = torch.device(getattr(adapter, "device", "cpu"))
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return device.type


class IndexStore:
    """One pool index's files in ``folder``: ``load(entry)`` and ``save(entry, value)``."""

    def __init__(self, folder: str, key: Dict[str, Any]):
        self.key = key
        folder_key = {k: v for k, v in key.items() if k != "images"}
        name = hashlib.sha256(json.dumps(folder_key, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = os.path.join(folder, name)
        _writable(self.folder, folder)

    @classmethod
    def for_model(cls, folder: str, adapter, paths: Sequence[str], batch: int, pool: Dict[str, Any]) -> "IndexStore":
        """The store of this pool (``pool``: its file digest, processor and view size) on this model."""
        key = {"format": FORMAT, "weights": weights_digest(adapter), "images": images_digest(paths),
               "n_images": len(paths), "probe_batch": batch, "device": device_kind(adapter),
               "torch": str(torch.__version__), **pool}
        return cls(folder, key)

    def load(self, entry: tuple):
        """The stored value of ``entry``, or None when there is none (or it is stale or unreadable:
        then with a warning, and the caller builds and saves it again)."""
        path = self._path(entry)
        if not os.path.exists(path):
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            problem = None if stored["key"] == self.key and stored["entry"] == list(entry) else "stale"
        except Exception as err:  # a truncated or foreign file: any unpickling error means the same
            stored, problem = None, f"unreadable ({type(err).__name__}: {str(err)[:120]})"
        if problem:
            warnings.warn(f"pool index file {path} is {problem}; rebuilding it ({SETTING})", RuntimeWarning,
                          stacklevel=2)
            return None
        return stored["value"]

    def save(self, entry: tuple, value) -> None:
        temporary = None
        try:
            handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".writing-")
            with os.fdopen(handle, "wb") as f:
                torch.save({"key": self.key, "entry": list(entry), "value": value}, f)
            os.chmod(temporary, _file_mode())  # mkstemp's 0600 would hide a shared folder's index from others
            os.replace(temporary, self._path(entry))
        except OSError as err:
            if temporary is not None and os.path.exists(temporary):
                os.remove(temporary)  # a full disk leaves no half-written file behind
            raise _unwritable(self.folder, err) from None

    def _path(self, entry: tuple) -> str:
        if entry == ("features",):
            return os.path.join(self.folder, "features.pt")
        name = hashlib.sha256(json.dumps(list(entry)).encode()).hexdigest()[:24]
        return os.path.join(self.folder, f"answers-{name}.pt")


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    """0666 less the process's umask, as ``open`` would create the file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _writable(folder: str, setting_value: str) -> None:
    """Creates ``folder`` and writes a file there, so a bad setting fails before any work is done."""
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise _unwritable(setting_value, err) from None


def _unwritable(folder: str, err: OSError) -> ODEditError:
    return ODEditError(SETTING, folder, f"give a folder you can write, `{AUTO}` (the plugin's cache folder) or "
                       f"`{IN_MEMORY}` (no file) ({err.strerror or err})", problem="cannot be written")


def kept(store: Optional[IndexStore], entry: tuple, compute: Callable[[], Any]):
    """``entry`` from ``store`` when it holds it, else computed (and saved, with a store)."""
    value = store.load(entry) if store is not None else None
    if value is None:
        value = compute()
        if store is not None:
            store.save(entry, value)
    return value
