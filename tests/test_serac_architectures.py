"""SERAC (+ODEdit) with the shipped real-model YAMLs: ``hparams/TRAINING/ODEdit/{arch}-serac.yaml``
(meta-training through EasyEdit's own ``MultimodalTrainer``, SERAC's fields in
``hparams/TRAINING/SERAC/{arch}-host.yaml``) and ``hparams/SERAC/{arch}.yaml`` (editing with the archive
through EasyEdit's own ``SERACMultimodalHparams`` and executor).

Each runs on the tiny model of the real model's transformers classes: a few meta-training iterations
with ODEdit's terms, then one edit with the archive. Before the counterfactual model copied only the text
side, LLaVA's failed at construction (its ``LlavaConfig`` has no ``hidden_size``) and would have copied
the vision tower; MiniGPT-4's needs ``model_class: MiniGPT4`` for EasyEdit's shifted loss.
"""
import os

import pytest
import torch
import yaml
from easyeditor import MultimodalEditor, MultimodalTrainer

from easyedit_odedit import ODEditHyperParams, compat
from easyedit_odedit.hosts.serac import PluginSERAC, scope_classifier_for, text_side_copy
from easyedit_odedit.models.loading import load_adapter
from tests.conftest import LAVIS_PATH_ARCHS, PROMPT, edit_kwargs
from tests.test_trainer import _vqa_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FIELDS = ("model_name", "name", "tokenizer_class", "tokenizer_name", "device", "coco_image", "rephrase_image",
                "results_dir")
# A few iterations instead of EasyEdit's 20,000-50,000.
TINY_TRAINING = dict(max_iters=4, val_interval=2, val_steps=1, log_interval=2, model_save_pt=2)


def _yaml(*parts):
    with open(os.path.join(ROOT, "hparams", *parts)) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("arch", LAVIS_PATH_ARCHS)
def test_serac_editing_yaml_is_the_training_yamls_and_loads_in_easyedit(arch, tmp_path):
    """The editing YAML carries the training run's SERAC fields and model fields (what the archive was
    trained with), plus the archive, and EasyEdit's own class reads it (both versions)."""
    host, training, editing = (_yaml("TRAINING", "SERAC", f"{arch}-host.yaml"),
                               _yaml("TRAINING", "ODEdit", f"{arch}-serac.yaml"), _yaml("SERAC", f"{arch}.yaml"))
    assert {k: v for k, v in editing.items() if k in host and k not in ("archive", "eval_only")} == \
        {k: v for k, v in host.items() if k not in ("archive", "eval_only")}
    assert {k: editing[k] for k in MODEL_FIELDS} == {k: training[k] for k in MODEL_FIELDS}
    assert host["archive"] is None and editing["archive"].startswith("/path/to/")
    hparams_class = compat.import_easyeditor().SERACMultimodalHparams
    hp = hparams_class.from_hparams(os.path.join(ROOT, "hparams", "SERAC", f"{arch}.yaml"))
    assert hp.alg_name == "SERAC_MULTI" and hp.model_class == host["model_class"]


def _training_hparams(arch, model, world, results, classifier):
    config = _yaml("TRAINING", "ODEdit", f"{arch}-serac.yaml")
    host = dict(_yaml("TRAINING", "SERAC", f"{arch}-host.yaml"), cls_name=classifier, **TINY_TRAINING)
    config.update(name=model, tokenizer_name=model, coco_image=str(world), rephrase_image=str(world),
                  results_dir=str(results), host_hparams=host, environments={"locality_pool": str(world / "pool.json")})
    return ODEditHyperParams.from_dict(config, source_path=os.path.join(ROOT, "hparams/TRAINING/ODEdit/x.yaml"))


def _editing_hparams(arch, model, world, classifier, archive, folder):
    """The shipped editing YAML with its /path/to entries pointed at the tiny world, read by EasyEdit."""
    config = _yaml("SERAC", f"{arch}.yaml")
    config.update(name=model, tokenizer_name=model, coco_image=str(world), rephrase_image=str(world),
                  results_dir=str(folder / "results"), cls_name=classifier, archive=str(archive))
    path = folder / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(config))
    return compat.import_easyeditor().SERACMultimodalHparams.from_hparams(str(path))


def _text_parameters(adapter) -> int:
    """Parameters of the decoder and the LM head (a tied head counted once)."""
    lm = adapter.language_model
    unique = {id(p): p for m in (lm.get_decoder(), lm.get_output_embeddings()) for p in m.parameters()}
    return sum(p.numel() for p in unique.values())


@torch.no_grad()
def _row_logits(adapter, world) -> torch.Tensor:
    from PIL import Image
    import numpy as np

    image = torch.tensor(np.asarray(Image.open(world / "img" / "0.png").convert("RGB")), dtype=torch.float32)
    batch = adapter.embed([f"{PROMPT} green"], [image.permute(2, 0, 1) / 255], [len(adapter.tokenizer(PROMPT)["input_ids"])])
    return adapter.decode(batch)[0]


@pytest.mark.parametrize("arch", LAVIS_PATH_ARCHS)
def test_serac_meta_trains_and_edits_with_the_shipped_yamls(world, tiny_model, tmp_path, arch):
    model = tiny_model(arch)
    classifier = scope_classifier_for(model, str(tmp_path / "scope-bert"))
    hp = _training_hparams(arch, model, world, tmp_path / "results", classifier)
    VQADataset = compat.module("dataset.vqa").VQADataset
    records = VQADataset(_vqa_json(world, tmp_path / "train.json", 4), config=hp)
    trainer = MultimodalTrainer(config=hp, train_set=records, val_set=records)
    assert isinstance(trainer.model, PluginSERAC)
    base = {k: v.detach().clone() for k, v in trainer.model.model.state_dict().items()}
    # the counterfactual model is the text side only (no copy of a vision tower or projector), and before
    # training it reads a row exactly as the base model does (MiniGPT-4's image prompt, LLaVA's chat format)
    base_model, counterfactual = trainer.model.model, trainer.model.replacement
    copied = sum(p.numel() for p in counterfactual.language_model.parameters())
    assert copied == _text_parameters(base_model)
    assert _row_logits(counterfactual, world).equal(_row_logits(base_model, world))
    trainer.run()
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer._odedit_logs.values())
    assert all(torch.equal(base[k], v) for k, v in trainer.model.model.state_dict().items())
    archive = tmp_path / "results" / "models" / "ODEdit" / hp.model_name  # {results_dir}/models/{alg}/{model_name}
    assert archive.is_file()

    editor = MultimodalEditor.from_hparams(_editing_hparams(arch, model, world, classifier, archive, tmp_path))
    before = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
    metrics, edited, _ = editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    assert isinstance(edited, PluginSERAC) and len(edited.cache_inputs) == 1
    assert edited.cache_inputs[0].endswith("green")
    assert all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())
    assert {"rewrite_acc", "rephrase_acc", "image_rephrase_acc"} <= set(metrics[0]["post"])


def test_text_side_copy_keeps_a_plain_language_model_whole(world, tiny_model):
    """A language model that is only decoder + head is copied as it is (its archive keys stay the model
    class's); LLaVA's loses the vision tower and projector, and the copy computes what the original does."""
    plain = load_adapter(str(world / "model")).language_model
    copy = text_side_copy(plain)
    assert type(copy) is type(plain) and list(copy.state_dict()) == list(plain.state_dict())
    llava = load_adapter(tiny_model("llava15")).language_model
    text = text_side_copy(llava)
    names = list(dict(text.named_parameters()))
    assert names and not any("vision" in n or "projector" in n for n in names)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        expected = llava.get_output_embeddings()(llava.get_decoder()(input_ids=ids).last_hidden_state)
        got = text.get_output_embeddings()(text.get_decoder()(input_ids=ids).last_hidden_state)
    assert torch.equal(expected, got)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(text.parameters(), llava.get_decoder().parameters()))
