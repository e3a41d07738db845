"""The pool index saved to disk (``environments.pool_index``): loaded, it gives the same edits as one
built in memory; a bad file is rebuilt with a warning; a folder that cannot be written names the setting."""
import copy
import os
import re

import pytest
import torch
from easyeditor import MultimodalEditor

from easyedit_odedit import ODEditError, ODEditHyperParams, pool_index, pool_index_store, restore_all
from easyedit_odedit.environments import _PROCESSED_POOL_IMAGES
from tests.conftest import edit_kwargs, write_yaml
from tests.test_content_environments import CONTENT_ENV
from tests.test_edit import same, state


def _hparams(world, where):
    env = {"locality_pool": str(world / "pool.json"), **CONTENT_ENV, "pool_index": where}
    return ODEditHyperParams.from_hparams(write_yaml(world, "FT-L", {"layers": [-1], "num_steps": 6, "lr": 0.1},
                                                     environments=env, preset="content",
                                                     constraints={"max_steps": 6}))


def _fresh_process_state():
    """What a new process would not have: the in-memory indexes and the processed pool images."""
    pool_index._INDEXES.clear()
    _PROCESSED_POOL_IMAGES.clear()


def _edited_weights(world, where):
    editor = MultimodalEditor.from_hparams(_hparams(world, where))
    editor.edit(**edit_kwargs(world), keep_original_weight=False, verbose=False)
    edited = state(editor.model)
    restore_all(editor.model)
    return edited


def _files(folder):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


def test_a_loaded_index_gives_bit_identical_edits_and_computes_nothing(world, tmp_path, monkeypatch):
    _fresh_process_state()
    in_memory = _edited_weights(world, "memory")
    _fresh_process_state()
    saved = _edited_weights(world, str(tmp_path / "index"))
    files = _files(tmp_path / "index")
    # the features and the answers of each fixed probe (at the edit's answer length)
    assert len(files) == 1 + len(CONTENT_ENV["probes"]) and any(f.endswith("features.pt") for f in files)

    _fresh_process_state()
    saves, loads = [], []
    real_load = pool_index_store.IndexStore.load
    monkeypatch.setattr(pool_index_store.IndexStore, "save", lambda self, entry, value: saves.append(entry))
    monkeypatch.setattr(pool_index_store.IndexStore, "load",
                        lambda self, entry: loads.append(entry) or real_load(self, entry))
    loaded = _edited_weights(world, str(tmp_path / "index"))
    assert saves == [] and len(loads) == len(files)  # every entry came from disk
    assert same(in_memory, saved) and same(saved, loaded)


def test_a_corrupt_or_stale_file_is_rebuilt_with_a_warning(world, tmp_path):
    folder = tmp_path / "index"
    _fresh_process_state()
    reference = _edited_weights(world, str(folder))
    features = next(f for f in _files(folder) if f.endswith("features.pt"))
    answers = next(f for f in _files(folder) if "answers-" in f)
    with open(features, "wb") as f:
        f.write(b"not a torch file")
    stored = torch.load(answers, weights_only=True)
    torch.save(dict(stored, key=dict(stored["key"], images="another image set")), answers)

    _fresh_process_state()
    with pytest.warns(RuntimeWarning) as caught:
        rebuilt = _edited_weights(world, str(folder))
    messages = " ".join(str(w.message) for w in caught)
    assert "features.pt is unreadable" in messages and "is stale" in messages
    assert same(reference, rebuilt)
    assert torch.load(features, weights_only=True)["key"] == torch.load(answers, weights_only=True)["key"]


def test_a_folder_that_cannot_be_written_names_the_setting_and_leaves_the_weights(world, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fresh_process_state()
    editor = MultimodalEditor.from_hparams(_hparams(world, str(blocker / "index")))
    before = state(editor.model)
    with pytest.raises(ODEditError, match=re.escape("environments.pool_index")):
        editor.edit(**edit_kwargs(world), keep_original_weight=False, verbose=False)
    assert same(before, state(editor.model))


def test_the_weights_digest_tells_apart_what_norms_cannot():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        flipped.weight.neg_()  # another model with every norm the same
    assert torch.equal(pool_index.weights_fingerprint(model), pool_index.weights_fingerprint(flipped))
    digest = pool_index_store.weights_digest
    assert digest(model) != digest(flipped)
    assert digest(model) != digest(copy.deepcopy(model).double())
    clone = torch.nn.Linear(4, 3)
    clone.load_state_dict(model.state_dict())
    assert digest(model) == digest(clone) == digest(clone, workers=3)


def test_the_setting_names_memory_the_cache_or_a_folder(world, monkeypatch, tmp_path):
    monkeypatch.setenv("ODEDIT_CACHE", str(tmp_path / "cache"))
    assert pool_index_store.store_folder("memory") is None
    assert pool_index_store.store_folder("auto") == os.path.join(str(tmp_path / "cache"), "pool-index")
    assert pool_index_store.store_folder("rel/dir") == os.path.abspath("rel/dir")
    with pytest.raises(ODEditError, match=re.escape("environments.pool_index")):
        _hparams(world, " ")


def test_the_images_key_is_their_content_wherever_they_lie(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(b"same bytes")
    digest = pool_index_store.images_digest
    assert digest([str(tmp_path / "a" / "x.png")]) == digest([str(tmp_path / "b" / "x.png")])
    (tmp_path / "b" / "x.png").write_bytes(b"other bytes")
    assert digest([str(tmp_path / "a" / "x.png")]) != digest([str(tmp_path / "b" / "x.png")])
    assert digest([str(tmp_path / "a" / "x.png")]) != digest([str(tmp_path / "a" / "gone.png")])


def test_a_failed_write_names_the_setting_and_leaves_no_partial_file(tmp_path, monkeypatch):
    store = pool_index_store.IndexStore(str(tmp_path), {"format": 1})

    def disk_full(obj, f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pool_index_store.torch, "save", disk_full)
    with pytest.raises(ODEditError, match=re.escape("environments.pool_index")) as raised:
        store.save(("features",), torch.zeros(2))
    assert "No space left" in str(raised.value) and _files(tmp_path) == []
