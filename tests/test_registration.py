import importlib
import logging
import subprocess
import sys

import torch

import easyedit_odedit
from easyedit_odedit import compat
from easyedit_odedit.odedit.odedit_main import apply_odedit_to_multimodal_model


def test_odedit_is_in_easyedits_multimodal_registry():
    assert compat.alg_multimodal_dict()["ODEdit"] is apply_odedit_to_multimodal_model
    # the editor module holds the same dict object (star import), so it sees the entry too
    assert compat.module("editors.multimodal_editor").ALG_MULTIMODAL_DICT["ODEdit"] is apply_odedit_to_multimodal_model


def test_registering_twice_changes_nothing():
    before_mm = dict(compat.alg_multimodal_dict())
    before_train = dict(compat.alg_train_dict())
    editor_init = compat.module("editors.multimodal_editor").MultimodalEditor.__init__
    easyedit_odedit.register()
    importlib.reload(importlib.import_module("easyedit_odedit.registration")).register()
    assert compat.alg_multimodal_dict() == before_mm
    assert compat.alg_train_dict() == before_train
    assert compat.module("editors.multimodal_editor").MultimodalEditor.__init__ is editor_init


def test_cpu_redirect_is_off_outside_easyedit_calls():
    assert torch.Tensor.to is compat.scopes._originals.get("tensor_to", torch.Tensor.to)
    if not torch.cuda.is_available():
        with compat.cpu_redirect():
            assert torch.zeros(1).to("cuda:0").device.type == "cpu"
        assert torch.Tensor.to is compat.scopes._originals["tensor_to"]


def test_import_does_not_touch_global_state_beyond_easyedit(tmp_path):
    """A fresh interpreter: importing the plugin after EasyEdit adds no log handler, no seed, no file."""
    code = (
        "import os, logging, random, torch\n"
        "from easyedit_odedit import compat\n"
        "compat.import_easyeditor()\n"
        "handlers = list(logging.getLogger().handlers); state = torch.get_rng_state(); r = random.getstate()\n"
        "files = set(os.listdir('.'))\n"
        "import easyedit_odedit\n"
        "assert logging.getLogger().handlers == handlers, 'root handlers changed'\n"
        "assert torch.equal(torch.get_rng_state(), state), 'torch reseeded'\n"
        "assert random.getstate() == r, 'random reseeded'\n"
        "assert set(os.listdir('.')) == files, 'files written'\n"
        "print('clean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "clean" in out.stdout, out.stderr[-2000:]


def test_constructing_editors_does_not_pile_up_log_handlers(world):
    from easyeditor import MultimodalEditor
    from easyedit_odedit import ODEditHyperParams
    from tests.conftest import write_yaml

    hp = ODEditHyperParams.from_hparams(write_yaml(world))
    logger = logging.getLogger(compat.module("editors.multimodal_editor").__name__)
    MultimodalEditor.from_hparams(hp)
    count = len(logger.handlers)
    for _ in range(3):
        MultimodalEditor.from_hparams(hp)
    assert len(logger.handlers) == count
