"""EasyEdit's own multimodal WISE, GRACE and LoRA as ODEdit refine hosts (GitHub main only).

For each, one edit through ``MultimodalEditor.from_hparams(ODEditHyperParams...)`` + ``edit(...)`` on a
tiny random Qwen2-VL (the shipped YAML, paths and step counts replaced): EasyEdit's own apply function
runs; every parameter the model had stays bit-identical (these hosts add modules, they change no
existing weight); what the host added and ODEdit refines differs from the host-alone result at the
same seed (``optimiser.steps: 0``); and EasyEdit's restore path (``keep_original_weight``) returns
the model bit-identical, module for module. On the PyPI release the host names fail at load.
Run on main with ``/tmp/ee-main/run-plugin-tests.sh /work/main -k adapter_hosts``.
"""
import os

import pytest
import torch
import yaml
from easyeditor import MultimodalEditor

from easyedit_odedit import ODEditHyperParams, compat, restore_all
from easyedit_odedit.errors import ODEditError
from tests.conftest import edit_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# host -> (shipped YAML, EasyEdit's key in ALG_MULTIMODAL_DICT, what ODEdit refines, host step field)
HOSTS = {"WISE": ("qwen2vl-wise", "WISE", "new_weight", "n_iter"),
         "GRACE": ("qwen2vl-grace", "GRACE", "values", "n_iter"),
         "EasyEdit-LoRA": ("qwen2vl-easyedit-lora", "LoRA", "lora_", "num_steps")}
HAS_HOSTS = compat.has_multimodal_alg("WISE")
needs_main = pytest.mark.skipif(not HAS_HOSTS, reason="the installed EasyEdit (PyPI release) has no multimodal "
                                                      "WISE/GRACE/LoRA; GitHub main has")


@pytest.fixture(scope="module")
def tiny_qwen(tiny_model):
    return tiny_model("qwen2vl")


def hparams(host: str, model_dir: str, world, steps: int, **host_hparams) -> ODEditHyperParams:
    """The shipped YAML with the paths, the device, the layer (the tiny model has 4) and steps replaced."""
    name, _, _, host_steps = HOSTS[host]
    path = os.path.join(ROOT, "hparams", "ODEdit", f"{name}.yaml")
    config = yaml.safe_load(open(path))
    config.update(model_name=model_dir, name=model_dir, device="cpu", coco_image=str(world), rephrase_image=str(world))
    config["environments"].update(locality_pool=str(world / "pool.json"), locality_image_root=str(world))
    config["optimiser"].update(steps=steps, lr=0.05)
    config["host_hparams"].update({host_steps: 2, **host_hparams})
    if "inner_params" in config["host_hparams"]:
        config["host_hparams"]["inner_params"] = ["model.language_model.layers[-1].mlp.down_proj.weight"]
    return ODEditHyperParams.from_dict(config, source_path=path)


def refined(model, marker: str) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if marker in n}


def edit(host: str, model_dir: str, world, steps: int, monkeypatch):
    """One ODEdit edit through main's editor; returns what the edit left in the model (seen before
    EasyEdit restores it), the host calls, and the model's state before and after."""
    from easyedit_odedit.models.hf_native import prepare_editor

    _, alg, marker, _ = HOSTS[host]
    editor = prepare_editor(MultimodalEditor.from_hparams(hparams(host, model_dir, world, steps)))
    model = editor.model
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    modules = {n: type(m) for n, m in model.named_modules()}
    calls, seen, table = [], {}, compat.alg_multimodal_dict()
    easyedit_apply, odedit_apply = table[alg], editor.apply_algo

    def host_apply(*args, **kwargs):
        calls.append(alg)
        return easyedit_apply(*args, **kwargs)

    def spied(*args, **kwargs):
        result = odedit_apply(*args, **kwargs)
        seen.update(refined=refined(model, marker),
                    kept=all(any(p is q for q in model.parameters()) and torch.equal(p, v) for p, v in before.values()))
        return result

    editor.apply_algo = spied
    with monkeypatch.context() as patch:
        patch.setitem(table, alg, host_apply)
        metrics, _, _ = editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    restored = {n: p.detach().clone() for n, p in model.named_parameters()}
    same = restored.keys() == before.keys() and all(torch.equal(restored[n], v) for n, (_, v) in before.items())
    return dict(metrics=metrics, calls=calls, same=same and {n: type(m) for n, m in model.named_modules()} == modules,
                **seen)


@needs_main
@pytest.mark.parametrize("host", list(HOSTS))
def test_odedit_refines_what_the_easyedit_host_added_and_restores(world, tiny_qwen, host, monkeypatch):
    alone = edit(host, tiny_qwen, world, steps=0, monkeypatch=monkeypatch)
    odedit = edit(host, tiny_qwen, world, steps=3, monkeypatch=monkeypatch)
    for run in (alone, odedit):
        assert run["calls"] == [HOSTS[host][1]]  # EasyEdit's own apply function made the edit
        assert run["kept"], "a parameter the model had before the edit changed or was replaced"
        assert run["refined"], f"{host} added nothing named {HOSTS[host][2]}"
        assert run["same"], "restore did not return the model bit-identical"
        assert 0.0 <= float(run["metrics"][0]["post"]["rewrite_acc"]) <= 1.0
    assert alone["refined"].keys() == odedit["refined"].keys()
    moved = [n for n in alone["refined"] if not torch.equal(alone["refined"][n], odedit["refined"][n])]
    assert moved, f"ODEdit did not move {host}'s {HOSTS[host][2]}"


@needs_main
def test_sequential_wise_edits_restore_in_one_call(world, tiny_qwen):
    """Two un-restored edits stack two WISE adapters; ``restore_all`` takes both out, newest first."""
    from easyedit_odedit.models.hf_native import TensorImageLoader, prepare_editor
    from easyedit_odedit.odedit.odedit_main import apply_odedit_to_multimodal_model

    hp = hparams("WISE", tiny_qwen, world, steps=1)
    editor = prepare_editor(MultimodalEditor.from_hparams(hp))
    model = editor.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    image = TensorImageLoader()(str(world / "img" / "0.png"))
    for target in ["green", "blue"]:
        request = {"prompt": "what color is the shape ?", "target": target, "image": image}
        apply_odedit_to_multimodal_model(model, editor.tok, [request], hp, keep_original_weight=False)
    assert any("new_weight" in n for n, _ in model.named_parameters())
    restore_all(model)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


@needs_main
def test_without_keep_original_weight_the_edit_stays_until_restore_all(world, tiny_qwen):
    """Main calls a callable restore after every edit; ODEdit's is a no-op when told to keep the edit."""
    from easyedit_odedit.models.hf_native import prepare_editor

    editor = prepare_editor(MultimodalEditor.from_hparams(hparams("GRACE", tiny_qwen, world, steps=1)))
    before = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    editor.edit(**edit_kwargs(world), keep_original_weight=False, verbose=False)
    assert any(n.endswith(".values") for n, _ in editor.model.named_parameters())
    restore_all(editor.model)
    after = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.skipif(HAS_HOSTS, reason="the installed EasyEdit has multimodal WISE/GRACE/LoRA")
@pytest.mark.parametrize("host", list(HOSTS))
def test_pypi_release_names_the_fix_at_load(host):
    path = os.path.join(ROOT, "hparams", "ODEdit", f"{HOSTS[host][0]}.yaml")
    with pytest.raises(ODEditError, match=r"host .*GitHub main.*built-in hosts `LoRA`"):
        ODEditHyperParams.from_hparams(path)


def _wise_edit(world, tiny_qwen, monkeypatch, seen=None, **host_hparams):
    """One un-restored WISE+ODEdit edit; returns the model, its WISE adapter and WISE's own tokenised batch."""
    from easyeditor.models.wise import wise_main
    from easyedit_odedit.models.hf_native import TensorImageLoader, prepare_editor
    from easyedit_odedit.odedit.odedit_main import apply_odedit_to_multimodal_model

    batches, tokenize = [], wise_main.multimodal_tokenize
    monkeypatch.setattr(wise_main, "multimodal_tokenize", lambda *a, **k: batches.append(tokenize(*a, **k)) or batches[-1])
    hp = hparams("WISE", tiny_qwen, world, steps=3, **host_hparams)
    editor = prepare_editor(MultimodalEditor.from_hparams(hp))
    model = editor.model
    if seen is not None:
        seen.update(model=model, before={n: p.detach().clone() for n, p in model.named_parameters()})
    request = {"prompt": "what color is the shape ?", "target": "green",
               "image": TensorImageLoader()(str(world / "img" / "0.png"))}
    apply_odedit_to_multimodal_model(model, editor.tok, [request], hp, keep_original_weight=False)
    return model, model.get_submodule("model.language_model.layers.3.mlp.down_proj"), batches[0][0]


@needs_main
def test_wise_routing_threshold_is_recorded_for_the_refined_side_memory(world, tiny_qwen, monkeypatch):
    """WISE's inference routes by act_ratio x the in-scope distance it recorded at its own last step;
    after ODEdit moved new_weight, the record must be the distance at the final weights (WISE's own
    save_editing_activation on WISE's own batch), else the threshold belongs to weights that are gone."""
    from easyeditor.models.wise.WISE import euc

    model, wise, inputs = _wise_edit(world, tiny_qwen, monkeypatch)
    try:
        wise.editing = True
        with torch.no_grad():
            model(**inputs)
        final = euc(wise.original_layer_output[:-1], wise.new_weight_layer_output[:-1], wise.config).mean().item()
        assert wise.editing_mean_act.count == 1  # replaced, not added
        assert wise.editing_mean_act.min_act() == pytest.approx(final, rel=1e-4)
    finally:
        wise.editing = False
        restore_all(model)


@needs_main
def test_wise_saving_its_side_memory_at_the_edit_is_refused_and_undone(world, tiny_qwen, monkeypatch):
    """save_freq 1: WISE moves new_weight into its memory bank and leaves a blank copy; refining that
    would be lost, so ODEdit says so (it failed on a gradient hook before) and the model is restored."""
    seen = {}
    with pytest.raises(ODEditError, match="save_freq"):
        _wise_edit(world, tiny_qwen, monkeypatch, seen, save_freq=1, merge_freq=2)
    after = dict(seen["model"].named_parameters())
    assert after.keys() == seen["before"].keys() and all(torch.equal(after[n], v) for n, v in seen["before"].items())
