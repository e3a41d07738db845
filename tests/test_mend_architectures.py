"""MEND (+ODEdit) with the shipped real-model YAMLs: ``hparams/TRAINING/ODEdit/{arch}-mend.yaml`` (meta-training
through EasyEdit's own ``MultimodalTrainer``, MEND fields in ``hparams/TRAINING/MEND/{arch}-host.yaml``) and
``hparams/ODEdit/{arch}-mend.yaml`` (editing with the archive).

The YAMLs name layers 29-31 of the real 32-layer decoders; the tiny models of the same transformers
classes (``models.tiny.save_tiny_arch``) have 4. Each name is moved to the tiny model's top layers with
everything but the layer index kept, so a wrong name (``opt_model.`` for ``language_model.``, a
``language_model.model.layers`` where LLaVA has ``language_model.model.language_model.layers``) fails here.
Then MEND is meta-trained for a few iterations with ODEdit's objective and one edit runs with the archive:
only the YAML's weights change, and the restore is bit-identical.
"""
import json
import os
import re

import pytest
import torch
import yaml
from easyeditor import MultimodalEditor, MultimodalTrainer

from easyedit_odedit import ODEditHyperParams, compat
from easyedit_odedit.models.loading import load_adapter
from tests.conftest import LAVIS_PATH_ARCHS as ARCHS, TINY_ARCH_LAYERS as TINY_LAYERS, edit_kwargs
from tests.test_trainer import _vqa_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_LAYERS = 32
LAYER = re.compile(r"\.layers\.(\d+)\.")
# The hypernetwork's shape: the editing YAML must build the network the training run saved.
NETWORK = ("inner_params", "rank", "n_hidden", "hidden_dim", "init", "norm", "combine", "x_only", "delta_only",
           "act", "mlp_class", "shared", "one_sided", "edit_lr", "lr_lr")
# A few iterations at a tiny rank instead of EasyEdit's 30,000 at rank 1920.
TINY_TRAINING = dict(rank=8, max_iters=4, val_interval=2, val_steps=1, log_interval=2, eval_log_interval=2,
                     accumulate_bs=1, model_save_pt=2)


def _yaml(*parts):
    with open(os.path.join(ROOT, "hparams", *parts)) as f:
        return yaml.safe_load(f)


def on_tiny(names, layers=TINY_LAYERS):
    """The names with their layer indices moved to the top ``layers`` layers, the rest kept."""
    shift = max(int(LAYER.search(n).group(1)) for n in names) + 1 - layers
    return [LAYER.sub(lambda m: f".layers.{int(m.group(1)) - shift}.", n) for n in names]


@pytest.mark.parametrize("arch", ARCHS)
def test_mend_yamls_name_the_models_parameters(tiny_model, arch):
    host = _yaml("TRAINING", "MEND", f"{arch}-host.yaml")
    editing = _yaml("ODEdit", f"{arch}-mend.yaml")["host_hparams"]
    assert {k: editing[k] for k in NETWORK} == {k: host[k] for k in NETWORK}
    names = host["inner_params"]
    assert sorted({int(LAYER.search(n).group(1)) for n in names}) == [REAL_LAYERS - 3, REAL_LAYERS - 2, REAL_LAYERS - 1]
    params = dict(load_adapter(tiny_model(arch)).named_parameters())
    mapped = on_tiny(names)
    assert all(name in params and params[name].dim() == 2 for name in mapped), sorted(set(mapped) - set(params))
    assert [LAYER.sub(".layers.N.", n) for n in names] == [LAYER.sub(".layers.N.", n) for n in mapped]


def _train_json(world, path):
    """``test_trainer``'s E-VQA records with two-word targets: EasyEdit's MEND normalises the top layer's
    gradients over the labelled tokens it has seen and fails at its first step on a one-token target;
    MiniGPT-4 adds no BOS, so there a one-word target is one labelled token."""
    records = json.loads(open(_vqa_json(world, path, 4)).read())
    path.write_text(json.dumps([dict(r, alt=f"{r['alt']} circle") for r in records]))
    return str(path)


def _training_hparams(arch, model, world, results):
    config = _yaml("TRAINING", "ODEdit", f"{arch}-mend.yaml")
    host = dict(_yaml("TRAINING", "MEND", f"{arch}-host.yaml"), **TINY_TRAINING)
    host["inner_params"] = on_tiny(host["inner_params"])
    config.update(name=model, tokenizer_name=model, coco_image=str(world), rephrase_image=str(world),
                  results_dir=str(results), host_hparams=host)
    return ODEditHyperParams.from_dict(config, source_path=os.path.join(ROOT, "hparams/TRAINING/ODEdit/x.yaml"))


def _editing_hparams(arch, model, world, archive):
    config = _yaml("ODEdit", f"{arch}-mend.yaml")
    config["host_hparams"].update(archive=str(archive), rank=TINY_TRAINING["rank"],
                                  inner_params=on_tiny(config["host_hparams"]["inner_params"]))
    config.update(name=model, tokenizer_name=model, coco_image=str(world), rephrase_image=str(world),
                  optimiser={"steps": 2})
    config["environments"].update(locality_pool=str(world / "pool.json"), locality_image_root=str(world))
    return ODEditHyperParams.from_dict(config, source_path=os.path.join(ROOT, "hparams/ODEdit/x.yaml"))


def _spy_on_changes(editor) -> dict:
    """The whole state the edit leaves, before EasyEdit's keep_original_weight restores it."""
    seen, apply = {}, editor.apply_algo

    def spied(model, *args, **kwargs):
        edited, restore = apply(model, *args, **kwargs)
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return edited, restore

    editor.apply_algo = spied
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_mend_meta_trains_and_edits_with_the_shipped_yamls(world, tiny_model, tmp_path, arch):
    model = tiny_model(arch)
    hp = _training_hparams(arch, model, world, tmp_path / "results")
    VQADataset = compat.module("dataset.vqa").VQADataset
    records = VQADataset(_train_json(world, tmp_path / "train.json"), config=hp)
    MultimodalTrainer(config=hp, train_set=records, val_set=records).run()
    archive = tmp_path / "results" / "models" / "ODEdit" / hp.model_name  # {results_dir}/models/{alg}/{model_name}
    assert archive.is_file()

    hp = _editing_hparams(arch, model, world, archive)
    editor = MultimodalEditor.from_hparams(hp)
    before = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
    seen = _spy_on_changes(editor)
    editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    changed = sorted(k for k, v in seen["state"].items() if not torch.equal(before[k], v))
    assert changed == sorted(hp.host_params.inner_params)
    assert all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())
