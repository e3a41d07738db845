"""EasyEdit's SERAC (SERAC_MULTI) on a plugin model: meta-training with EasyEdit's own objective and
with ODEdit's through EasyEdit's ``MultimodalTrainer``, editing through EasyEdit's own executor, and
the counterfactual path ``hosts/serac.py`` gives it (memory, mixture, answer alignment)."""
import os

import pytest
import torch
import yaml

from easyedit_odedit import ODEditError, ODEditFileNotFoundError, ODEditHyperParams, compat
from easyedit_odedit.hosts.easyedit_native import build_easyedit_hparams
from easyedit_odedit.hosts.serac import PluginSERAC, scope_classifier_for, write_scope_classifier
from easyedit_odedit.models.loading import load_adapter
from tests.conftest import PROMPT, edit_kwargs
from tests.test_trainer import _vqa_json, nan_mmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where EasyEdit puts a model with ``device: 0`` (and moves SERAC's classifier tokens to)
EASYEDIT_DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"
HOST = yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/SERAC/tiny-host.yaml")))


def _fields(world, results):
    return {"model_name": "blip2", "name": str(world / "model"), "tokenizer_name": str(world / "model"),
            "tokenizer_class": "PreTrainedTokenizerFast", "coco_image": str(world), "rephrase_image": str(world),
            "results_dir": str(results), "device": 0}


@pytest.fixture(scope="module")
def classifier(world, tmp_path_factory):
    return scope_classifier_for(str(world / "model"), str(tmp_path_factory.mktemp("serac") / "scope-bert"))


def _train(world, tmp_path, classifier, alg):
    from easyeditor import MultimodalTrainer

    host = dict(HOST, cls_name=classifier)
    if alg == "ODEdit":
        config = yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/ODEdit/tiny-serac.yaml")))
        config.update(_fields(world, tmp_path / "results"), host_hparams=host,
                      environments={"locality_pool": str(world / "pool.json")})
        hp = ODEditHyperParams.from_dict(config, source_path=os.path.join(ROOT, "hparams/TRAINING/ODEdit/x.yaml"))
    else:
        hp = build_easyedit_hparams("SERAC", host, _fields(world, tmp_path / "results"), "test")
    VQADataset = compat.module("dataset.vqa").VQADataset
    data = VQADataset(_vqa_json(world, tmp_path / "train.json", 4), config=hp)
    trainer = MultimodalTrainer(config=hp, train_set=data, val_set=data)
    base = {k: v.clone() for k, v in trainer.model.model.state_dict().items()}
    trainer.run()
    return trainer, base, tmp_path / "results" / "models" / alg / "blip2"


@pytest.mark.parametrize("alg", ["SERAC_MULTI", "ODEdit"])
def test_serac_meta_trains_on_a_plugin_model(world, tmp_path, classifier, alg):
    """EasyEdit's trainer builds the plugin's SERAC, trains its classifier and counterfactual model
    only (the base model stays bit-identical) and writes an archive; with ``alg: ODEdit`` ODEdit's
    terms ride on EasyEdit's losses."""
    trainer, base, archive = _train(world, tmp_path, classifier, alg)
    assert isinstance(trainer.model, PluginSERAC)
    assert archive.is_file()
    assert all(torch.equal(base[k], v) for k, v in trainer.model.model.state_dict().items())
    trained = {id(p) for p in trainer.model.outer_parameters()}
    assert trained and not trained & {id(p) for p in trainer.model.model.parameters()}
    if alg == "ODEdit":
        logs = trainer._odedit_logs
        assert set(logs) == {"odedit/rel_nll", "odedit/gen_mmd", "odedit/tv", "odedit/lambda"}
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())


def _serac(world, classifier):
    model = load_adapter(str(world / "model"))
    hp = build_easyedit_hparams("SERAC", dict(HOST, cls_name=classifier), _fields(world, "results"), "test")
    return PluginSERAC(model, hp, lambda: None).to(EASYEDIT_DEVICE).eval()


def _samples(world, text, target, image_index=0):
    from PIL import Image
    import numpy as np

    image = torch.tensor(np.asarray(Image.open(world / "img" / f"{image_index}.png").convert("RGB")),
                         dtype=torch.float32).permute(2, 0, 1)[None] / 255
    return {"image": image.to(EASYEDIT_DEVICE), "text_input": [f"{text} {target}"], "labels": [target],
            "prompts_len": [len(world_tokenizer(world)(text)["input_ids"])]}


def world_tokenizer(world):
    return load_adapter(str(world / "model")).tokenizer


def test_serac_memory_and_mixture(world, classifier):
    """Without memory SERAC is the base model; an edit adds its text to the memory and changes no
    weight; then the output is (1 - s) p_base + s p_counterfactual, where the counterfactual model
    reads the edit's context before the input and its answer positions line up with the base's."""
    serac = _serac(world, classifier)
    weights = {k: v.clone() for k, v in serac.state_dict().items() if isinstance(v, torch.Tensor)}
    query = _samples(world, PROMPT, "green")
    with torch.no_grad():
        base = serac.model(dict(query))
        assert torch.equal(serac(dict(query)).logits, base.logits)
        edited, _ = serac.edit(_samples(world, PROMPT, "blue"))
        assert isinstance(edited, PluginSERAC)
        assert edited.cache_inputs == [f"{PROMPT} blue"] and [s.strip() for s in edited.cache_labels] == ["blue"]
        assert all(torch.equal(weights[k], v) for k, v in serac.state_dict().items() if k in weights)

        out = edited(dict(query))
        with compat.cpu_redirect():  # EasyEdit moves the classifier's tokens to config.device (0)
            sims, idxs, _ = edited.run_classifier(dict(query))
        rows = edited.counterfactual_samples(dict(query), idxs)
        assert rows["text_input"] == [edited.build_rep_cache_contexts()[int(idxs[0])] + query["text_input"][0]]
        assert rows["text_input"][0].startswith(f"{PROMPT} blue")
        rep = edited.replacement(rows)
    width = base.logits.shape[1]
    assert torch.equal(rep.labels[:, -width:], base.labels)  # the answer at the same positions
    s = float(sims[0])
    expected = (1 - s) * base.logits.float().softmax(-1) + s * rep.logits[:, -width:].float().softmax(-1)
    assert torch.allclose(out.logits.exp(), expected, atol=1e-5)
    assert 0.0 < s <= 1.0


def test_serac_edits_through_easyedit_executor(world, tmp_path, classifier):
    """EasyEdit's SERAC executor with an archive trained here: the model it returns holds the edit
    in memory, the editor's model is unchanged, and EasyEdit's evaluation runs on it."""
    from easyeditor import MultimodalEditor

    _, _, archive = _train(world, tmp_path, classifier, "SERAC_MULTI")
    host = {k: v for k, v in HOST.items() if k not in ("alg",)}
    host.update(archive=str(archive), cls_name=classifier, alg_name="SERAC_MULTI")
    editor = MultimodalEditor.from_hparams(build_easyedit_hparams("SERAC", host, _fields(world, tmp_path), "test"))
    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    metrics, edited, _ = editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    assert isinstance(edited, PluginSERAC) and edited.cache_inputs == [f"{PROMPT} green"]
    assert all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())
    post = metrics[0]["post"]
    assert {"rewrite_acc", "rephrase_acc", "image_rephrase_acc"} <= set(post)
    assert all(0.0 <= float(post[k]) <= 1.0 for k in ("rewrite_acc", "rephrase_acc", "image_rephrase_acc"))


def test_serac_configuration_errors(world, classifier, tmp_path):
    model = load_adapter(str(world / "model"))
    hp = build_easyedit_hparams("SERAC", dict(HOST, cls_name=classifier, freeze_cntr=True),
                                _fields(world, "results"), "test")
    with pytest.raises(ODEditError, match="freeze_cntr"):
        PluginSERAC(model, hp, lambda: None)
    hp.freeze_cntr, hp.model_name = False, "llava"
    with pytest.raises(ODEditError, match="model_name"):
        PluginSERAC(model, hp, lambda: None)
    with pytest.raises(ODEditError, match="bert"):
        write_scope_classifier(str(tmp_path / "scope"), ["a", "b"])


def test_each_editor_edits_with_its_own_archive(world, tmp_path, classifier):
    """EasyEdit keeps one SERAC executor for the whole process and it keeps the first archive it
    loaded: without the plugin's fix a second editor edited with the first editor's archive."""
    from easyeditor import MultimodalEditor

    _, _, archive = _train(world, tmp_path, classifier, "SERAC_MULTI")
    with compat.host_scope():
        state = torch.load(archive, map_location="cpu", weights_only=False)
    state["model"]["scale"] = torch.tensor(2.0)
    other = tmp_path / "other-archive"
    torch.save(state, other)
    scales = []
    for path in (archive, other):
        host = {k: v for k, v in HOST.items() if k != "alg"}
        host.update(archive=str(path), cls_name=classifier, alg_name="SERAC_MULTI")
        editor = MultimodalEditor.from_hparams(build_easyedit_hparams("SERAC", host, _fields(world, tmp_path), "t"))
        _, edited, _ = editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
        scales.append(float(edited.scale))
    assert scales == [1.0, 2.0]


def test_a_sequence_grows_serac_memory_and_ends_clean(world, tmp_path, classifier):
    """The bench's SERAC sequence: each edit continues from the SERAC the last one returned (EasyEdit's
    executor would start from its unedited SERAC each time); its end resets to the archive's SERAC."""
    from easyeditor import MultimodalEditor

    from easyedit_odedit.benchmark.methods import SeracMethod

    _, _, archive = _train(world, tmp_path, classifier, "SERAC_MULTI")
    host = {k: v for k, v in HOST.items() if k != "alg"}
    host.update(archive=str(archive), cls_name=classifier, alg_name="SERAC_MULTI")
    hp = build_easyedit_hparams("SERAC", host, _fields(world, tmp_path), "t")
    editor = MultimodalEditor.from_hparams(hp)
    with compat.host_scope():
        requests = editor._prepare_requests([PROMPT, PROMPT], ["green", "blue"],
                                            [str(world / "img" / "0.png"), str(world / "img" / "1.png")],
                                            locality_inputs={})
    memories = [SeracMethod.edit_in_sequence(editor, hp, r).cache_inputs for r in requests]
    assert memories == [[f"{PROMPT} green"], [f"{PROMPT} green", f"{PROMPT} blue"]]
    SeracMethod.end_sequence(editor)
    assert SeracMethod.edit_in_sequence(editor, hp, requests[1]).cache_inputs == [f"{PROMPT} blue"]


def test_without_a_generality_weight_the_mmd_only_logs(world, tmp_path, classifier, monkeypatch):
    """SERAC trains with ``gen_weight: 0``: the MMD is logged but kept out of the loss and its graph, so
    a MMD that comes out NaN (0 * NaN is NaN) cannot stop training: EasyEdit's trainer skips every step
    whose gradient holds a NaN, and the counterfactual model would never move from its copy."""
    from easyedit_odedit import trainer as odedit_trainer

    monkeypatch.setattr(odedit_trainer.risks, "generality_mmd", nan_mmd)
    trainer, _, _ = _train(world, tmp_path, classifier, "ODEdit")
    assert trainer.config.risks.gen_weight == 0.0 and torch.isnan(torch.tensor(trainer._odedit_logs["odedit/gen_mmd"]))
    assert all(torch.isfinite(p).all() for p in trainer.model.outer_parameters())
    base = dict(trainer.model.model.language_model.named_parameters())
    trained = dict(trainer.model.replacement.language_model.named_parameters())
    assert any(not torch.equal(base[k], v) for k, v in trained.items())  # it trained (a copy of the base at first)


def test_a_scope_classifier_left_as_a_placeholder_is_a_clear_error(world, tmp_path):
    """The shipped real-model YAMLs carry cls_name: /path/to/distilbert-base-cased; left in place it
    failed inside transformers as a malformed hub id. The error names the field and how to get a BERT
    folder, and that command writes one."""
    import subprocess
    import sys

    model = load_adapter(str(world / "model"))
    for value, error in [("/path/to/distilbert-base-cased", ODEditFileNotFoundError), ("", ODEditError)]:
        hp = build_easyedit_hparams("SERAC", dict(HOST, cls_name=value), _fields(world, "results"), "test")
        with pytest.raises(error, match="host_hparams.cls_name") as raised:
            PluginSERAC(model, hp, lambda: None)
        assert "--classifier" in str(raised.value)
    folder = tmp_path / "scope-bert"
    done = subprocess.run([sys.executable, "-m", "easyedit_odedit.hosts.serac", "--classifier", str(world / "model"),
                           str(folder)], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == str(folder) and (folder / "config.json").is_file()
    hp = build_easyedit_hparams("SERAC", dict(HOST, cls_name=str(folder)), _fields(world, "results"), "test")
    assert isinstance(PluginSERAC(model, hp, lambda: None), PluginSERAC)
