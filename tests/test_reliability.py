"""Issue #5: bad input fails before EasyEdit or ODEdit touches the model, interrupted edits leave the
weights as they were, and many edits in one process leak nothing.

Bad YAML (missing, malformed, unknown keys, wrong types, unknown host, IKE, missing host YAML) is
covered in test_hparams.py; here: the arguments of ``MultimodalEditor.edit`` and the device.
"""
import copy
import gc
import inspect
import logging
import os
import tracemalloc
import types

import pytest
import torch

from easyeditor import MultimodalEditor

from easyedit_odedit import ODEditError, ODEditFileNotFoundError, ODEditHyperParams, compat, validation
from easyedit_odedit.odedit.objective import ODEditObjective
from tests.conftest import PROMPT, edit_kwargs, write_yaml

FAST_ENV = {"pool_factor": 1, "se_image": 1, "out_image": 1}


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fast_hparams(world, host="FT-L", host_hparams=None):
    return ODEditHyperParams.from_hparams(write_yaml(
        world, host, host_hparams or {"layers": [-1], "num_steps": 2, "lr": 0.1},
        environments=dict(FAST_ENV, locality_pool=str(world / "pool.json"))))


@pytest.fixture(scope="module")
def editor(world, tmp_path_factory):
    """One editor for the module (EasyEdit writes logs/run.log into the current directory)."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("editor-logs"))
    try:
        return MultimodalEditor.from_hparams(fast_hparams(world))
    finally:
        os.chdir(cwd)


@pytest.fixture
def grads_kept(editor):
    """Puts requires_grad back after each test, whatever the edit did to it."""
    grads = {n: p.requires_grad for n, p in editor.model.named_parameters()}
    yield grads
    for name, p in editor.model.named_parameters():
        p.requires_grad_(grads[name])


@pytest.fixture(scope="module")
def bad(world):
    """Files that are not usable images."""
    folder = world / "bad"
    folder.mkdir(exist_ok=True)
    png = (world / "img" / "0.png").read_bytes()
    (folder / "corrupt.png").write_bytes(png[:8] + b"\x00" * 64)   # PNG signature, garbage chunks
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])    # cut in the middle of the pixel data
    (folder / "text.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    names = ("corrupt", "truncated", "text", "empty")
    return types.SimpleNamespace(**{name: str(folder / f"{name}.png") for name in names},
                                 folder=str(folder), missing=str(world / "img" / "missing.png"))


def _with(**changes):
    def change(kwargs, world, bad):
        for key, value in changes.items():
            value = value(kwargs, world, bad) if callable(value) else value
            if value is _DROP:
                kwargs.pop(key)
            else:
                kwargs[key] = value
        return kwargs
    return change


def _loc(part, **changes):
    """locality_inputs with one part ('text' / 'vision') changed (None drops a key)."""
    def value(kwargs, world, bad):
        loc = copy.deepcopy(kwargs["locality_inputs"])
        for key, new in changes.items():
            new = new(kwargs, world, bad) if callable(new) else new
            if new is _DROP:
                loc[part].pop(key)
            else:
                loc[part][key] = new
        return loc
    return value


_DROP = object()

# (id, change to the good kwargs, error type, field the message must name, more text it must hold)
BAD_CALLS = [
    ("image-missing", _with(image=lambda k, w, b: [b.missing]), ODEditFileNotFoundError, "image[0]", "does not exist"),
    # the PyPI release joins relative paths to coco_image; GitHub main opens them from the current directory
    ("image-relative", _with(image=["img/nope.png"]), ODEditFileNotFoundError, "image[0]",
     "coco_image" if compat.flavour() == compat.PYPI else "current directory"),
    ("image-corrupt", _with(image=lambda k, w, b: [b.corrupt]), ODEditError, "image[0]", "not a readable image"),
    ("image-truncated", _with(image=lambda k, w, b: [b.truncated]), ODEditError, "image[0]", "not a readable image"),
    ("image-not-an-image", _with(image=lambda k, w, b: [b.text]), ODEditError, "image[0]", "not a readable image"),
    ("image-empty-file", _with(image=lambda k, w, b: [b.empty]), ODEditError, "image[0]", "not a readable image"),
    ("image-folder", _with(image=lambda k, w, b: [b.folder]), ODEditError, "image[0]", "not a file"),
    ("image-not-a-path", _with(image=[torch.zeros(3, 8, 8)]), ODEditError, "image[0]", "not a path"),
    ("rephrase-image-missing", _with(rephrase_image=lambda k, w, b: [b.missing]), ODEditFileNotFoundError,
     "rephrase_image[0]", "does not exist"),
    ("rephrase-image-corrupt", _with(rephrase_image=lambda k, w, b: [b.corrupt]), ODEditError, "rephrase_image[0]",
     "not a readable image"),
    ("locality-image-missing", _with(locality_inputs=_loc("vision", image=lambda k, w, b: [b.missing])),
     ODEditFileNotFoundError, "locality_inputs['vision']['image'][0]", "does not exist"),
    ("locality-image-corrupt", _with(locality_inputs=_loc("vision", image=lambda k, w, b: [b.truncated])),
     ODEditError, "locality_inputs['vision']['image'][0]", "not a readable image"),
    ("targets-longer", _with(targets=["green", "red"]), ODEditError, "targets", "2 entries for 1 prompt"),
    ("image-list-longer", _with(image=lambda k, w, b: k["image"] * 2), ODEditError, "image", "2 entries for 1 prompt"),
    ("targets-list-for-str-prompt", _with(prompts=PROMPT), ODEditError, "targets", "does not match prompts"),
    ("targets-str-for-list-prompts", _with(targets="green"), ODEditError, "targets", "not a list"),
    ("prompts-empty-list", _with(prompts=[], targets=[], image=[]), ODEditError, "prompts", "is empty"),
    ("prompts-wrong-type", _with(prompts=7), ODEditError, "prompts", "wrong type"),
    ("prompt-empty", _with(prompts=[""]), ODEditError, "prompts[0]", "is empty"),
    ("target-empty", _with(targets=[""]), ODEditError, "targets[0]", "is empty"),
    ("target-blank", _with(targets=["   "]), ODEditError, "targets[0]", "is empty"),
    ("target-not-a-string", _with(targets=[None]), ODEditError, "targets[0]", "wrong type"),
    ("target-unknown-words", _with(targets=["zebra"]), ODEditError, "targets[0]", "cannot be encoded"),
    ("targets-missing", _with(targets=_DROP, target_new=["green"]), ODEditError, "targets", "target_new"),
    ("misspelt-keyword", _with(rephrase_prompt=["what is the color ?"]), ODEditError, "rephrase_prompt",
     "rephrase_prompts"),
    ("rephrase-prompts-longer", _with(rephrase_prompts=["a", "b"]), ODEditError, "rephrase_prompts",
     "2 entries for 1 edit"),
    ("rephrase-prompts-empty", _with(rephrase_prompts=[""]), ODEditError, "rephrase_prompts[0]", "is empty"),
    ("rephrase-image-longer", _with(rephrase_image=lambda k, w, b: k["image"] * 3), ODEditError, "rephrase_image",
     "3 entries for 1 edit"),
    ("locality-not-a-dict", _with(locality_inputs=[("text", "what ?")]), ODEditError, "locality_inputs", "not a dict"),
    ("locality-unknown-part", _with(locality_inputs=lambda k, w, b: {"txt": k["locality_inputs"]["text"]}),
     ODEditError, "locality_inputs['txt']", "not a known key"),
    ("locality-text-not-a-dict", _with(locality_inputs={"text": ["what is two plus two ?"]}), ODEditError,
     "locality_inputs['text']", "not a dict"),
    ("locality-text-no-ground-truth", _with(locality_inputs=_loc("text", ground_truth=_DROP)), ODEditError,
     "locality_inputs['text']['ground_truth']", "is missing"),
    ("locality-text-unknown-key", _with(locality_inputs=_loc("text", answer=["five"])), ODEditError,
     "locality_inputs['text']['answer']", "not a known key"),
    ("locality-text-longer", _with(locality_inputs=_loc("text", prompt=["a ?", "b ?"])), ODEditError,
     "locality_inputs['text']['prompt']", "2 entries for 1 edit"),
    ("locality-text-empty-answer", _with(locality_inputs=_loc("text", ground_truth=[""])), ODEditError,
     "locality_inputs['text']['ground_truth'][0]", "is empty"),
    ("locality-vision-no-image", _with(locality_inputs=_loc("vision", image=_DROP)), ODEditError,
     "locality_inputs['vision']['image']", "is missing"),
    ("locality-vision-shorter", _with(locality_inputs=_loc("vision", prompt=[])), ODEditError,
     "locality_inputs['vision']['prompt']", "0 entries for 1 edit"),
]


@pytest.mark.parametrize("change, error, field, text", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_edit_arguments_fail_before_easyedit_with_the_field_named(editor, world, bad, change, error, field, text):
    before = state(editor.model)
    kwargs = change(edit_kwargs(world), world, bad)
    with pytest.raises(error) as caught:
        editor.edit(**kwargs, keep_original_weight=True, verbose=False)
    message = str(caught.value)
    assert message.startswith(field + " ") and text in message and "Fix: " in message, message
    assert same(before, state(editor.model))


# (id, device, GPUs the machine pretends to have, field, text)
BAD_DEVICES = [
    ("unparsable", "gpu", 0, "cannot be parsed"),
    ("bad-index-string", "cuda:x", 0, "cannot be parsed"),
    ("negative", -1, 0, "cannot be parsed"),
    ("float", 1.5, 0, "wrong type"),
    ("unsupported-kind", "meta", 0, "not a supported device"),
    ("cuda:7-on-2-gpus", "cuda:7", 2, "names a GPU that does not exist"),
    ("5-on-2-gpus", 5, 2, "names a GPU that does not exist"),
    ("cpu-string-on-pypi-with-gpus", "cpu", 2, "cannot be used by this EasyEdit"),
]


@pytest.mark.parametrize("device, gpus, text", [c[1:] for c in BAD_DEVICES], ids=[c[0] for c in BAD_DEVICES])
def test_bad_device_fails_before_easyedit(editor, world, monkeypatch, device, gpus, text):
    if gpus:  # nothing reaches CUDA: the check raises before EasyEdit runs
        monkeypatch.setattr(validation, "_gpu_count", lambda: gpus)
    if text.startswith("cannot be used") and compat.flavour() != compat.PYPI:
        pytest.skip("only the PyPI release builds f'cuda:{device}' itself")
    monkeypatch.setitem(editor.hparams.easyedit, "device", device)
    before = state(editor.model)
    with pytest.raises(ODEditError) as caught:
        editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    message = str(caught.value)
    assert message.startswith("hparams.device ") and text in message and repr(device) in message, message
    assert same(before, state(editor.model))


@pytest.mark.skipif(compat.flavour() != compat.PYPI, reason="the PyPI release joins image paths to coco_image")
def test_unset_coco_image_on_the_pypi_release(editor, world, monkeypatch):
    monkeypatch.setattr(editor, "vis_root", None)  # what `coco_image: null` in the YAML gives
    before = state(editor.model)
    with pytest.raises(ODEditError, match=r"^hparams\.coco_image .*Fix: set `coco_image:`"):
        editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    assert same(before, state(editor.model))


def test_gpu_device_on_a_machine_without_gpu_runs_on_cpu(editor, world, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("only meaningful on a machine without a GPU")
    monkeypatch.setitem(editor.hparams.easyedit, "device", "cuda:7")
    before = state(editor.model)
    metrics, _, _ = editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    assert "rewrite_acc" in metrics[0]["post"]
    assert same(before, state(editor.model))


def test_inputs_the_pypi_release_would_crash_on_are_normalised(editor, world):
    """locality_inputs=None (PyPI calls .keys() on it) and single-string locality fields (PyPI
    compares the unwrapped string's length with the number of edits); the caller's dict is kept."""
    kwargs = edit_kwargs(world)
    metrics, _, _ = editor.edit(**dict(kwargs, locality_inputs=None), keep_original_weight=True, verbose=False)
    assert "locality_acc" not in metrics[0]["post"]
    loc = {"text": {"prompt": "what is two plus two ?", "ground_truth": "four"}}
    kept = copy.deepcopy(loc)
    metrics, _, _ = editor.edit(**dict(kwargs, locality_inputs=loc), keep_original_weight=True, verbose=False)
    assert "locality_acc" in metrics[0]["post"] and loc == kept


def test_other_algorithms_are_not_checked(editor, world, monkeypatch):
    calls = []
    monkeypatch.setattr(validation, "validate_edit_call", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(editor, "alg_name", "MEND")
    monkeypatch.setattr(editor, "apply_algo", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("host ran")))
    with pytest.raises(RuntimeError, match="host ran"):
        editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    assert calls == []


def test_github_main_signature_and_raw_paths(world, monkeypatch):
    """GitHub main's edit() has ``file_type`` 4th and opens image paths as given (no coco_image)."""
    def main_edit(self, prompts, targets, image, file_type=None, rephrase_prompts=None, rephrase_image=None,
                  locality_inputs=None, keep_original_weight=False, verbose=True, sequential_edit=False, **kwargs):
        pass

    monkeypatch.setattr(compat, "flavour", lambda: compat.MAIN)
    fake = types.SimpleNamespace(alg_name="ODEdit", tok=None, vis_root=str(world),
                                 hparams=types.SimpleNamespace(device="cpu", coco_image=str(world)))
    kwargs = edit_kwargs(world)
    args, rest = validation.validate_edit_call(
        fake, (kwargs["prompts"], kwargs["targets"], kwargs["image"], "image", kwargs["rephrase_prompts"]), {},
        method=main_edit)
    bound = inspect.signature(main_edit).bind(fake, *args, **rest).arguments
    assert bound["file_type"] == "image" and bound["rephrase_prompts"] == kwargs["rephrase_prompts"]
    os.chdir(world)  # relative to the current directory, not to coco_image
    validation.validate_edit_call(fake, (), dict(kwargs, image=["img/0.png"]), method=main_edit)
    os.chdir(world / "img")
    with pytest.raises(ODEditFileNotFoundError, match=r"^image\[0\] .*current directory"):
        validation.validate_edit_call(fake, (), dict(kwargs, image=["img/0.png"]), method=main_edit)
    with pytest.raises(ODEditError, match=r"^file_type has 2 entries for 1 edit"):
        validation.validate_edit_call(fake, (), dict(kwargs, file_type=["image", "image"]), method=main_edit)


@pytest.mark.parametrize("host, host_hparams", [("FT-L", {"layers": [-1], "num_steps": 4, "lr": 0.1}),
                                                ("LoRA", {"layers": [-1], "num_steps": 4, "lr": 0.1, "rank": 2})])
def test_keyboard_interrupt_mid_edit_restores_and_propagates(editor, world, monkeypatch, grads_kept, host,
                                                             host_hparams):
    monkeypatch.setattr(editor, "hparams", fast_hparams(world, host, host_hparams))
    original_update, calls = ODEditObjective.update, []

    def update(self, idx):
        calls.append(self.step)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original_update(self, idx)

    monkeypatch.setattr(ODEditObjective, "update", update)
    before, to_before = state(editor.model), torch.Tensor.to
    with pytest.raises(KeyboardInterrupt):
        editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    assert len(calls) == 2
    assert same(before, state(editor.model))  # same keys too: no LoRA module left behind
    assert torch.Tensor.to is to_before  # the CPU redirect was taken down


@pytest.mark.parametrize("host, host_hparams", [
    ("FT-L", {"layers": [-1], "num_steps": 2, "lr": 0.1}),
    pytest.param("LoRA", {"layers": [-1], "num_steps": 2, "lr": 0.1, "rank": 2})])
def test_an_edit_leaves_requires_grad_as_it_was(editor, world, monkeypatch, grads_kept, host, host_hparams):
    monkeypatch.setattr(editor, "hparams", fast_hparams(world, host, host_hparams))
    assert any(grads_kept.values())
    editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    assert grads_kept == {n: p.requires_grad for n, p in editor.model.named_parameters()}


def _handler_count():
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return sum(len(lg.handlers) for lg in loggers)


def _rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _traced(snapshot) -> int:
    """Traced bytes, less what the test harness keeps: pytest stores every captured log record
    (EasyEdit logs each edit at INFO) and warning."""
    harness = ["*/logging/__init__.py", "*/traceback.py", "*/linecache.py", "*/tracemalloc.py", "*/_pytest/*",
               "*/pluggy/*", "*/warnings.py"]
    kept = snapshot.filter_traces([tracemalloc.Filter(False, pattern) for pattern in harness])
    return sum(stat.size for stat in kept.statistics("filename"))


def _live_tensors():
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_twenty_edits_leak_no_fd_handler_tensor_or_memory(editor, world):
    """Measured on the 2-core dev box (20 edits after 3 warm-up edits): fds, handlers and live
    tensors constant; traced Python memory outside the test harness +25 KiB; RSS wanders by up to
    45 MiB with the allocator (no trend). The bounds are about 10x and 1.5x that. (Tensor storage
    is invisible to tracemalloc: the live-tensor count covers it.)"""
    kwargs = edit_kwargs(world)
    before = state(editor.model)
    for _ in range(3):  # warm-up: lazy imports, caches (locality pool, processors)
        editor.edit(**kwargs, keep_original_weight=True, verbose=False)
    gc.collect()
    fds, handlers, tensors, rss = len(os.listdir("/proc/self/fd")), _handler_count(), _live_tensors(), _rss_kib()
    tracemalloc.start()
    try:
        first = _traced(tracemalloc.take_snapshot())
        for _ in range(20):
            editor.edit(**kwargs, keep_original_weight=True, verbose=False)
        gc.collect()
        grown = _traced(tracemalloc.take_snapshot()) - first
    finally:
        tracemalloc.stop()
    print(f"20 edits: fds {fds}->{len(os.listdir('/proc/self/fd'))}, handlers {handlers}->{_handler_count()}, "
          f"live tensors {tensors}->{_live_tensors()}, tracemalloc +{grown / 1024:.1f} KiB, "
          f"RSS {rss / 1024:.1f}->{_rss_kib() / 1024:.1f} MiB")
    assert len(os.listdir("/proc/self/fd")) == fds
    assert _handler_count() == handlers
    assert _live_tensors() <= tensors
    assert grown < 256 * 1024, f"tracemalloc grew by {grown} bytes over 20 edits"
    assert _rss_kib() - rss < 64 * 1024, f"RSS grew by {(_rss_kib() - rss) / 1024:.1f} MiB over 20 edits"
    assert same(before, state(editor.model))


def test_edited_parameters_the_request_does_not_reach_are_a_clear_error(world):
    """FT-V edits the projector; a text-only request with text-only environments never reaches it.
    ODEdit says so (and leaves the weights as they were) instead of torch's "does not require grad"."""
    from easyedit_odedit.odedit.odedit_main import apply_odedit_to_multimodal_model

    hp = ODEditHyperParams.from_hparams(write_yaml(world, "FT-V", {"num_steps": 2, "lr": 0.1, "modules": ["projector"]},
                                                   environments={"locality_pool": str(world / "pool.json"),
                                                                 "out_image": 0, "se_image": 0, "se_joint": 0}))
    editor = MultimodalEditor.from_hparams(hp)
    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    with pytest.raises(ODEditError, match="do not affect this request"):
        apply_odedit_to_multimodal_model(editor.model, editor.tok, [{"prompt": PROMPT, "target": "green", "image": None}],
                                         hp, keep_original_weight=True)
    assert all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())


def test_re_embedded_steps_narrower_than_the_pool_edit(world):
    """FT-V re-embeds the sampled rows every step; a sample without the pool's longest row pads to
    less than the positions the risks read (found by the fuzz test: a mask/logits shape error)."""
    from easyedit_odedit.environments import Row
    from easyedit_odedit.models.loading import load_adapter
    from easyedit_odedit.odedit.objective import EditRows
    from easyedit_odedit.hosts import build_host

    hp = ODEditHyperParams.from_hparams(write_yaml(world, "FT-V", {"num_steps": 1, "lr": 0.05, "modules": ["projector"]},
                                                   risks={"kl_positions": "all"}))  # every position is read
    adapter = load_adapter(str(world / "model"))
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    rows = [Row("IN", PROMPT, "green", image),
            Row("SE_text", "please answer . please answer . " + PROMPT, "green", image),  # the longest row
            Row("OUT_text", "what is two plus two ?", "four")]
    params = build_host(hp).prepare(adapter)
    objective = ODEditObjective(adapter, EditRows(adapter, rows, "all"), params, hp, 0.05)
    before = {k: p.detach().clone() for k, p in params.items()}
    logs = objective.update([0, 2])  # a step without the longest row
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert any(not torch.equal(before[k], p) for k, p in params.items())
