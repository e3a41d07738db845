"""MEND meta-training with the ODEdit objective through EasyEdit's own MultimodalTrainer."""
import gc
import json
import os
import weakref

import pytest
import torch
import yaml

from easyedit_odedit import ODEditHyperParams, compat
from easyedit_odedit.trainer import ODEditMultimodalTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vqa_json(world, path, n):
    records = [{"src": "what color is the shape ?", "pred": "red", "alt": ["green", "blue", "teal"][i % 3],
                "rephrase": "what is the color of the shape ?", "image": f"img/{i % 6}.png",
                "image_rephrase": f"img/{(i + 1) % 6}.png", "loc": "what is two plus two ?", "loc_ans": "four",
                "m_loc": f"img/{(i + 2) % 6}.png", "m_loc_q": "what shape is in the image ?", "m_loc_a": "circle"}
               for i in range(n)]
    path.write_text(json.dumps(records))
    return str(path)


def test_mend_meta_trains_with_the_odedit_objective(world, tmp_path):
    config = yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/ODEdit/tiny-mend.yaml")))
    config.update(name=str(world / "model"), tokenizer_name=str(world / "model"), coco_image=str(world),
                  rephrase_image=str(world), results_dir=str(tmp_path / "results"),
                  host_hparams=os.path.join(ROOT, "hparams/TRAINING/MEND/tiny-host.yaml"))
    (tmp_path / "mend.yaml").write_text(yaml.safe_dump(config))
    hp = ODEditHyperParams.from_hparams(str(tmp_path / "mend.yaml"))
    assert hp.alg == "ODEdit" and hp.host_params_alg == "MEND"
    VQADataset = compat.module("dataset.vqa").VQADataset
    train = VQADataset(_vqa_json(world, tmp_path / "train.json", 8), config=hp)
    val = VQADataset(_vqa_json(world, tmp_path / "val.json", 4), config=hp)
    from easyeditor import MultimodalTrainer

    trainer = MultimodalTrainer(config=hp, train_set=train, val_set=val)
    assert isinstance(trainer, ODEditMultimodalTrainer)
    assert type(trainer.model).__name__ == "MEND"
    before = {k: v.clone() for k, v in trainer.model.mend.state_dict().items()}
    trainer.run()
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.mend.state_dict().items())
    assert trainer._odedit_step > 0 and "odedit/tv" in trainer._odedit_logs
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer._odedit_logs.values())
    archive = tmp_path / "results" / "models" / "ODEdit" / "blip2"  # {results_dir}/models/{alg}/{model_name}
    assert archive.exists()


def _content_trainer(world, tmp_path, name):
    """A MEND+ODEdit trainer whose YAML names probes, on 8 records; ``name`` "content": with
    ``meta_training_rows``."""
    from tests.test_content_environments import CONTENT_ENV

    config = yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/ODEdit/tiny-mend.yaml")))
    host = yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/MEND/tiny-host.yaml")))
    host.update(batch_size=2, max_iters=8, val_interval=8, val_steps=1, final_eval=False)
    config.update(name=str(world / "model"), tokenizer_name=str(world / "model"), coco_image=str(world),
                  rephrase_image=str(world), results_dir=str(tmp_path / name), host_hparams=host, preset="content",
                  environments={"locality_pool": str(world / "pool.json"), "meta_training_rows": name == "content",
                                **CONTENT_ENV})
    hp = ODEditHyperParams.from_dict(config)
    VQADataset = compat.module("dataset.vqa").VQADataset
    data = VQADataset(_vqa_json(world, tmp_path / "train.json", 8), config=hp)
    from easyeditor import MultimodalTrainer

    torch.manual_seed(0)
    return MultimodalTrainer(config=hp, train_set=data, val_set=data)


def test_mend_meta_training_meets_each_edits_content_environments(world, tmp_path, monkeypatch):
    """With ``meta_training_rows``, each training edit's near misses (KL to the unedited model) and
    same-content images (the target's NLL) join the loss; a record's rows are mined once."""
    from easyedit_odedit import trainer as trainer_module

    built, risks_seen, mined = [], [], []
    real_build, real_risks = trainer_module.ContentRows._mine, ODEditMultimodalTrainer._content_risks

    def counting_build(self, view):
        built.append((view["prompt"], view["target"], view["image"].sum().item()))
        mined.append((view, real_build(self, view)))
        return mined[-1][1]

    def recording_risks(self, batch, edited, scale):
        found = real_risks(self, batch, edited, scale)
        risks_seen.append({k: v.item() for k, v in found.items()})
        return found

    monkeypatch.setattr(trainer_module.ContentRows, "_mine", counting_build)
    monkeypatch.setattr(ODEditMultimodalTrainer, "_content_risks", recording_risks)
    trainer = _content_trainer(world, tmp_path, "content")
    trainer.run()
    # every training step of 2 edits met content rows; 6 distinct (target, image) records, each mined once
    assert len(risks_seen) == trainer._odedit_step >= 6 and 1 <= len(built) <= 6 and len(set(built)) == len(built)
    assert all(set(r) == {"near_miss", "same_content"} and all(v == v and v >= 0 for v in r.values())
               for r in risks_seen)
    assert built[0][0] == "Question: what color is the shape ? Short answer:"  # as the model is asked it
    # kept as text and paths: the rows a later draw gets are the mined ones, images included
    for view, rows in mined:
        again = trainer._content_rows.rows([view])
        assert [(r.env, r.prompt, r.target) for r in again] == [(r.env, r.prompt, r.target) for r in rows]
        assert all(torch.equal(a.image, r.image) for a, r in zip(again, rows))
    assert any(r.source is not None for _, rows in mined for r in rows)
    trained = {k: v.clone() for k, v in trainer.model.mend.state_dict().items()}

    # the same run without them (the default) trains another gradient network: the terms reach the loss
    plain = _content_trainer(world, tmp_path, "plain")
    assert not hasattr(plain, "_content_rows")
    plain.run()
    assert any(not torch.equal(trained[k], v) for k, v in plain.model.mend.state_dict().items())


def _mend_archive(world, tmp_path):
    """Train a tiny MEND archive (alg: ODEdit); returns a function making hparams that edit with it."""
    from easyeditor import MultimodalTrainer

    host = yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/MEND/tiny-host.yaml")))
    host.update(max_iters=8, val_interval=4, val_steps=1)
    config = {"host": "MEND", "host_hparams": host, "model_name": "blip2", "name": str(world / "model"),
              "tokenizer_name": str(world / "model"), "coco_image": str(world), "rephrase_image": str(world),
              "results_dir": str(tmp_path / "results"), "penalty": {"lambda_input": "edit_hidden"}}
    hp = ODEditHyperParams.from_dict(config)
    VQADataset = compat.module("dataset.vqa").VQADataset
    train = VQADataset(_vqa_json(world, tmp_path / "train.json", 4), config=hp)
    MultimodalTrainer(config=hp, train_set=train, val_set=train).run()
    archive = tmp_path / "results" / "models" / "ODEdit" / "blip2"

    edit_host = {k: v for k, v in host.items() if k not in ("alg", "batch_size", "max_iters")}
    edit_host.update(archive=str(archive), lr_scale=1.0, alg_name="MEND")

    defaults = dict(optimiser={"steps": 3}, environments={"locality_pool": str(world / "pool.json")})

    def editing_hparams(**extra):
        return ODEditHyperParams.from_dict(dict(config, host_hparams=edit_host, **{**defaults, **extra}))

    return host, editing_hparams


def test_mend_edit_then_odedit_refine_restores_exactly(world, tmp_path):
    """EasyEdit's MEND executor edits, ODEdit refines the same parameters, and the restore is
    bit-identical."""
    from easyeditor import MultimodalEditor

    from easyedit_odedit.odedit.odedit_main import apply_odedit_to_multimodal_model
    from tests.conftest import PROMPT

    host, editing_hparams = _mend_archive(world, tmp_path)
    hp_edit = editing_hparams()
    editor = MultimodalEditor.from_hparams(hp_edit)
    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    request = {"prompt": PROMPT, "target": "green", "image": torch.ones(3, 64, 64)}
    restore = apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp_edit, keep_original_weight=True)[1]
    changed = [k for k, v in editor.model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == host["inner_params"]
    restore()
    assert all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())
    model = weakref.ref(editor.model)  # the MEND executor ODEdit keeps does not keep the model alive
    del editor, restore
    gc.collect()
    assert model() is None


def test_mend_edits_do_not_depend_on_evaluation_fields(world, tmp_path):
    """No leakage, MEND alone and MEND+ODEdit: the same edit with real and with other evaluation
    fields gives bit-identical weights."""
    from easyeditor import MultimodalEditor

    from easyedit_odedit.odedit.odedit_main import apply_odedit_to_multimodal_model
    from tests.conftest import PROMPT

    _, editing_hparams = _mend_archive(world, tmp_path)
    for enabled in (False, True):
        hp = editing_hparams(enabled=enabled)
        editor = MultimodalEditor.from_hparams(hp)
        edited = []
        for rephrase, loc, seed in [("what is the color of the shape ?", "what is two plus two ?", 1),
                                    ("is there a circle ?", "what is one plus one ?", 2)]:
            other = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(seed))
            request = {"prompt": PROMPT, "target": "green", "image": torch.ones(3, 64, 64),
                       "rephrase_prompt": rephrase, "image_rephrase": other, "locality_prompt": loc,
                       "locality_ground_truth": "four", "multimodal_locality_image": other,
                       "multimodal_locality_prompt": rephrase, "multimodal_locality_ground_truth": "circle"}
            _, restore = apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp,
                                                          keep_original_weight=True)
            edited.append({k: v.clone() for k, v in editor.model.state_dict().items()})
            restore()
        assert any(not torch.equal(v, editor.model.state_dict()[k]) for k, v in edited[0].items())  # it edited
        assert [k for k in edited[0] if not torch.equal(edited[0][k], edited[1][k])] == [], enabled


def test_a_mend_archive_for_another_model_is_a_clear_error(world, tmp_path):
    """An archive trained for another model (different config / weight shapes) is rejected before
    EasyEdit's MEND loads it, with the weights untouched."""
    from easyedit_odedit import ODEditError
    from easyedit_odedit.hosts.easyedit_native import _check_archive_matches
    from easyedit_odedit.models.loading import load_adapter
    from easyedit_odedit.models.tiny import save_tiny_conv_llama

    other = load_adapter(save_tiny_conv_llama(str(tmp_path / "other"), hidden=32))
    archive = tmp_path / "archive"
    torch.save({"model": {"model_config": dict(other.config), "mend.(64, 32).u_mean": torch.zeros(1)}}, archive)
    model = load_adapter(str(world / "model"))
    inner = ["language_model.model.layers.0.mlp.down_proj.weight"]
    import pytest

    with pytest.raises(ODEditError, match="archive.*trained for another model"):
        _check_archive_matches(str(archive), model, inner)
    torch.save({"model": {"model_config": dict(model.config), "mend.(64, 32).u_mean": torch.zeros(1)}}, archive)
    with pytest.raises(ODEditError, match="weight shapes"):
        _check_archive_matches(str(archive), model, inner)
    (tmp_path / "junk").write_text("not an archive")
    with pytest.raises(ODEditError, match="could not be read"):
        _check_archive_matches(str(tmp_path / "junk"), model, inner)


def test_mend_executor_gives_each_weight_its_own_learned_edit_lr(world, tmp_path):
    """MEND learns one edit lr per inner parameter, paired by the order the config lists them.
    EasyEdit's PyPI executor paired them by the model's parameter order instead, so with
    ``down_proj`` listed before ``up_proj`` (as EasyEdit's own YAMLs do) each weight got the other's
    lr. Here the archive's lr for ``up_proj`` is 0: the edit must change ``down_proj`` only."""
    from easyeditor import MultimodalEditor, MultimodalTrainer

    from easyedit_odedit.hosts.easyedit_native import build_easyedit_hparams
    from easyedit_odedit.odedit.odedit_main import apply_odedit_to_multimodal_model
    from tests.conftest import PROMPT

    down, up = "language_model.model.layers.0.mlp.down_proj.weight", "language_model.model.layers.0.mlp.up_proj.weight"
    host = yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/MEND/tiny-host.yaml")))
    host.update(inner_params=[down, up], max_iters=4, val_interval=2, val_steps=1)
    fields = {"model_name": "blip2", "name": str(world / "model"), "tokenizer_name": str(world / "model"),
              "tokenizer_class": "PreTrainedTokenizerFast", "coco_image": str(world), "rephrase_image": str(world),
              "results_dir": str(tmp_path / "results"), "device": 0}
    hp = build_easyedit_hparams("MEND", dict(host, alg="MEND"), fields, "test")
    VQADataset = compat.module("dataset.vqa").VQADataset
    train = VQADataset(_vqa_json(world, tmp_path / "train.json", 4), config=hp)
    MultimodalTrainer(config=hp, train_set=train, val_set=train).run()
    archive = tmp_path / "results" / "models" / "MEND" / "blip2"
    with compat.host_scope():
        state = torch.load(archive, map_location="cpu", weights_only=False)
    state["model"]["edit_lrs"] = torch.tensor([1e-2, 0.0])  # [down_proj, up_proj], as listed
    torch.save(state, archive)

    edit_host = {k: v for k, v in host.items() if k not in ("alg", "batch_size", "max_iters")}
    edit_host.update(archive=str(archive), lr_scale=1.0, alg_name="MEND")
    config = {"host": "MEND", "host_hparams": edit_host, "enabled": False, "optimiser": {"steps": 0},
              "environments": {"locality_pool": str(world / "pool.json")}, **fields}
    hp_edit = ODEditHyperParams.from_dict(config)
    editor = MultimodalEditor.from_hparams(hp_edit)
    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    request = {"prompt": PROMPT, "target": "green", "image": torch.ones(3, 64, 64)}
    restore = apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp_edit, keep_original_weight=True)[1]
    changed = [k for k, v in editor.model.state_dict().items() if not torch.equal(before[k], v)]
    restore()
    assert changed == [down]


def test_a_negative_mend_edit_lr_refines_at_its_size(world):
    """MEND's ``edit_lr`` may be negative (EasyEdit adds edit_lr * grad); ODEdit's refinement after
    MEND is a descent, so its default step is the size of it (Adam rejected the negative lr)."""
    from easyedit_odedit.hosts import build_host

    host = yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/MEND/tiny-host.yaml")))
    host = {k: v for k, v in host.items() if k not in ("alg", "batch_size", "max_iters")}
    host.update(edit_lr=-1e-2, archive=str(world / "no-archive"), alg_name="MEND", lr_scale=1.0)
    hp = ODEditHyperParams.from_dict({"host": "MEND", "host_hparams": host, "model_name": "blip2",
                                      "name": str(world / "model"), "optimiser": {"steps": 0}})
    refine = build_host(hp)
    assert refine.lr == 1e-2
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=refine.lr)  # what ODEdit builds with it


def test_refinement_starts_from_the_weights_before_a_host_proposal_that_makes_the_objective_worse(
        world, tmp_path, monkeypatch):
    """``optimiser.refine_start: better``: a MEND proposal that makes the edit's objective worse (here
    the opposite of where refining from the unedited weights goes) is dropped and ODEdit refines from
    the weights before it, landing exactly where a host that proposed nothing lands; ``host`` keeps
    the paper's start (the host's solution) and lands elsewhere."""
    from easyeditor import MultimodalEditor

    from easyedit_odedit.benchmark.runner import logged_by_edit
    from easyedit_odedit.hosts.easyedit_native import EasyEditRefineHost
    from easyedit_odedit.odedit import objective
    from easyedit_odedit.odedit.odedit_main import apply_odedit_to_multimodal_model
    from tests.conftest import PROMPT

    host, editing_hparams = _mend_archive(world, tmp_path)
    request = {"prompt": PROMPT, "target": "green", "image": torch.ones(3, 64, 64)}
    started = []
    original_start = objective.ODEditObjective.start_from_better
    monkeypatch.setattr(objective.ODEditObjective, "start_from_better",
                        lambda self, before: started.append(original_start(self, before)) or started[-1])

    def edit(run_host, start):
        monkeypatch.setattr(EasyEditRefineHost, "run_host", run_host)
        hp = editing_hparams(optimiser={"steps": 3, "refine_start": start})
        editor = MultimodalEditor.from_hparams(hp)
        unedited = {n: editor.model.get_parameter(n).detach().clone() for n in host["inner_params"]}
        _, restore = apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp, keep_original_weight=True)
        edited = {n: editor.model.get_parameter(n).detach().clone() for n in host["inner_params"]}
        logged.append(logged_by_edit(editor.model).get("refined_from_unedited"))  # what the bench records
        restore()
        return unedited, edited

    logged = []
    unedited, refined = edit(lambda *a, **k: None, "better")  # a host that proposes nothing

    def backwards(self, model, tok, view, rows=(), undo=None):  # three times the refinement, reversed
        with torch.no_grad():
            for name in self.hparams.inner_params:
                model.get_parameter(name).add_(unedited[name] - refined[name], alpha=3.0)

    _, from_better = edit(backwards, "better")
    _, from_host = edit(backwards, "host")
    assert all(torch.equal(from_better[n], v) for n, v in refined.items())
    assert any(not torch.equal(from_host[n], v) for n, v in refined.items())
    assert started == [False, True]  # nothing proposed: the same start either way; dropped; `host` never asks
    assert logged == [0.0, 1.0, None]


def nan_mmd(z_e, z_r, multipliers):
    """A generality MMD that comes out NaN, still attached to the features' graph."""
    return (z_e.sum() + z_r.sum()) * float("nan")


def test_odedit_terms_that_are_not_finite_warn_once(world, tmp_path, monkeypatch):
    """EasyEdit's trainer skips every step whose gradient is not finite and says so only at INFO level:
    ODEdit terms that stay NaN would leave MEND untrained without a word. The first one warns."""
    from easyeditor import MultimodalTrainer

    from easyedit_odedit import trainer as odedit_trainer

    monkeypatch.setattr(odedit_trainer.risks, "generality_mmd", nan_mmd)
    config = yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/ODEdit/tiny-mend.yaml")))
    host = dict(yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/MEND/tiny-host.yaml"))), max_iters=4,
                val_interval=2, val_steps=1)
    config.update(name=str(world / "model"), tokenizer_name=str(world / "model"), coco_image=str(world),
                  rephrase_image=str(world), results_dir=str(tmp_path / "results"), host_hparams=host)
    hp = ODEditHyperParams.from_dict(config)
    assert hp.risks.gen_weight > 0
    VQADataset = compat.module("dataset.vqa").VQADataset
    records = VQADataset(_vqa_json(world, tmp_path / "train.json", 4), config=hp)
    with pytest.warns(RuntimeWarning, match="not finite") as caught:
        MultimodalTrainer(config=hp, train_set=records, val_set=records).run()
    assert sum("not finite" in str(w.message) for w in caught) == 1
