"""The MiniMMEdit bench runner end to end on a tiny config (shipped base model, FT-L alone and with
ODEdit, 2 test records, 1 seed, 3 steps; MEND and SERAC meta-trained for 6 iterations with each objective),
through the ``odedit bench`` command."""
import json
import math
import os

import numpy as np
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = ("rel", "t_gen", "i_gen", "t_loc", "i_loc", "gen", "near", "near_shape", "near_colour", "far",
        "other_family", "i_gen_all", "hm")


TINY_TRAINING = {"max_iters": 6, "val_interval": 3, "val_steps": 1, "batch_size": 2, "val_batch_size": 2}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from easyedit_odedit.cli import main

    root = tmp_path_factory.mktemp("bench")
    config = {"name": "tiny", "seeds": [3], "records": {"n_train": 6, "n_test": 2, "pool_images": 40},
              "settings": {"single": {"n": 2}, "sequential": {"T": [2], "chunks": 1}},
              "hosts": {"FT-L": os.path.join(ROOT, "hparams/ODEdit/minimmedit-ft-l.yaml")},
              "overrides": {"host_hparams": {"num_steps": 3, "lr": 3.0e-3}},
              "curve": {"hosts": ["FT-L"], "lrs": [1.0e-4, 3.0e-3], "n": 1},
              "mend": {"yaml": os.path.join(ROOT, "hparams/bench/minimmedit-mend-host.yaml"), "settings": ["single"],
                       "train": TINY_TRAINING, "val_records": 2},
              "serac": {"yaml": os.path.join(ROOT, "hparams/bench/minimmedit-serac-host.yaml"),
                        "train": TINY_TRAINING, "val_records": 2},  # single and seq2
              # a meta-trained host's variant edits from the same archive with other editing settings
              "variants": [{"name": "paper", "host": "MEND", "overrides": {"preset": "paper"}}],
              "not_run": {"IKE": "not in this test"}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / "out"
    cwd = os.getcwd()
    main(["bench", "--config", str(path), "--out", str(out)])
    assert os.getcwd() == cwd  # the runner's chdir (EasyEdit's logs/) is undone
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_outputs_and_fields(bench):
    from easyedit_odedit.benchmark.methods import SeracMethod

    out, res = bench
    for name in ("results.json", "results.md", "results.png", "edits.jsonl", "run.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    for key in ("meta", "base_model", "record_counts", "per_seed", "summary", "paired", "time_memory", "curve",
                "not_run", "per_edit"):
        assert key in res, key
    versions = res["meta"]["versions"]
    assert versions["easyeditor"] and versions["torch"] and versions["transformers"]
    assert set(res["base_model"]["accuracy"]) >= {"colour", "shape", "yesno", "text_heldout"}
    assert res["record_counts"]["per_seed"]["3"]["n_test"] == 2
    assert set(res["summary"]) == {"single", "seq2"}
    assert set(res["summary"]["single"]) == {"FT-L", "FT-L+ODEdit", "MEND", "MEND+ODEdit", "MEND+ODEdit[paper]",
                                             "SERAC", "SERAC+ODEdit"}
    assert set(res["summary"]["seq2"]) == {"FT-L", "FT-L+ODEdit", "SERAC", "SERAC+ODEdit"}  # MEND: [single]
    for host, algs in (("MEND", {"MEND", "ODEdit"}), ("SERAC", {"SERAC_MULTI", "ODEdit"})):
        training = res["meta_training"][host]["3"]
        assert set(training) == algs and all(os.path.isfile(t["archive"]) for t in training.values())
    assert res["record_counts"]["edits"]["single"]["FT-L+ODEdit"] == 2
    assert res["record_counts"]["edits"]["seq2"]["FT-L"] == 2
    assert res["not_run"] == {"IKE": "not in this test"}
    assert {(p["method"], p["lr"]) for p in res["curve"]} == {
        (m, lr) for m in ("FT-L", "FT-L+ODEdit") for lr in (1.0e-4, 3.0e-3)}
    md = (out / "results.md").read_text()
    assert "| FT-L+ODEdit |" in md and "Paired per-edit differences" in md
    # the no-leakage check ran for every method of the single-editing table (2 records each) and held
    weights_only = {"records": 2, "bit_identical": 2}
    assert res["leakage"] == {**{m: {"3": weights_only} for m in ("FT-L", "FT-L+ODEdit", "MEND", "MEND+ODEdit",
                                                                  "MEND+ODEdit[paper]")},
                              **{m: {"3": dict(weights_only, what=SeracMethod.edit_kind)}
                                 for m in ("SERAC", "SERAC+ODEdit")}}
    assert "## SERAC meta-training" in md
    assert "## No leakage" in md


def test_per_edit_values_are_fractions_with_time_and_memory(bench):
    _, res = bench
    rows = res["per_edit"]
    assert len(rows) == 2 * 2 + 2 * 2 + 2 * 2 * 1 + 2 * 3 + 2 * 2 * 2  # single, seq2, curve, MEND single (+paper), SERAC both
    for row in rows:
        for m in UNIT:
            assert row[m] is not None and 0.0 <= row[m] <= 1.0, (m, row[m])
        assert row["edit_s"] > 0 and row["peak_rss_mib"] > 0
        assert 0.0 <= row["pre_rel"] <= 1.0
        assert row["hm"] == pytest.approx(0.0 if row["i_gen_all"] + row["near"] == 0 else
                                          2 * row["i_gen_all"] * row["near"] / (row["i_gen_all"] + row["near"]))
        assert row["near"] == pytest.approx((row["near_shape"] + row["near_colour"]) / 2)  # 5 + 5 images


def test_summary_means_and_paired_differences_are_consistent(bench):
    _, res = bench
    rows = [r for r in res["per_edit"] if r["setting"] != "curve"]
    for setting, by_method in res["summary"].items():
        for method, entry in by_method.items():
            mine = [r for r in rows if r["setting"] == setting and r["method"] == method]
            for m in UNIT:
                assert entry[m]["mean"] == pytest.approx(np.mean([r[m] for r in mine]))
                assert entry[m]["std"] == 0.0 and entry[m]["n_seeds"] == 1
    assert res["paired"]["single"]["MEND+ODEdit"]["versus"] == "MEND"
    for setting, by_method in res["paired"].items():
        d = by_method["FT-L+ODEdit"]
        for m in ("t_gen", "i_gen", "near", "hm"):
            diffs = []
            for seed, chunk, record in d[m]["keys"]:
                pick = lambda odedit: next(r for r in rows if r["setting"] == setting and r["odedit"] is odedit  # noqa: E731
                                           and r["seed"] == seed and r["chunk"] == chunk and r["record"] == record)
                diffs.append(pick(True)[m] - pick(False)[m])
            assert d[m]["diffs"] == pytest.approx(diffs)
            assert d[m]["mean"] == pytest.approx(np.mean(diffs))
            lo, hi = d[m]["ci95"]
            assert lo - 1e-12 <= d[m]["mean"] <= hi + 1e-12 and -1.0 <= lo <= hi <= 1.0
            assert d[m]["n"] == 2
    for setting, by_method in res["time_memory"].items():
        for entry in by_method.values():
            assert entry["edit_s_median"] > 0 and math.isfinite(entry["peak_rss_mib_max"])


def test_steps_each_edit_took(bench):
    """FT-L alone takes the host's 3 steps; with ODEdit (content preset) 5 to 100, checked every 5;
    SERAC never runs ODEdit's loop and has no steps."""
    out, res = bench
    with open(out / "edits.jsonl") as f:
        rows = [json.loads(line) for line in f]
    steps = {}
    for r in rows:
        if r["setting"] == "single":
            steps.setdefault(r["method"], []).append(r["steps"])
    assert steps["FT-L"] == [3, 3]
    assert all(5 <= s <= 100 and s % 5 == 0 for s in steps["FT-L+ODEdit"])
    assert steps["SERAC"] == [None, None] and steps["SERAC+ODEdit"] == [None, None]
    assert res["time_memory"]["single"]["FT-L+ODEdit"]["steps_mean"] == pytest.approx(np.mean(steps["FT-L+ODEdit"]))
    assert "steps_mean" not in res["time_memory"]["single"]["SERAC"]


def test_bench_config_errors_name_the_problem(tmp_path):
    from easyedit_odedit.benchmark.config import BenchConfigError, load_config

    with pytest.raises(BenchConfigError, match="hosts"):
        load_config({"seeds": [0]})
    with pytest.raises(BenchConfigError, match="unknown key"):
        load_config({"hosts": {"FT-L": os.path.join(ROOT, "hparams/ODEdit/minimmedit-ft-l.yaml")}, "sedes": [0]})
    with pytest.raises(BenchConfigError, match="n_test"):
        load_config({"hosts": {"FT-L": os.path.join(ROOT, "hparams/ODEdit/minimmedit-ft-l.yaml")},
                     "records": {"n_test": 3}, "settings": {"single": {"n": 5}}})
    per_t = {"T": [5, 10], "chunks": {5: 2}}
    with pytest.raises(BenchConfigError, match="chunks names T = \\[5\\] but T is \\[5, 10\\]"):
        load_config({"hosts": {"FT-L": os.path.join(ROOT, "hparams/ODEdit/minimmedit-ft-l.yaml")},
                     "settings": {"sequential": per_t}})
    # MEND alone (a probe of MEND's settings) needs no `hosts`
    mend_only = load_config({"mend": {"yaml": os.path.join(ROOT, "hparams/bench/minimmedit-mend-host.yaml")}})
    assert mend_only["hosts"] == {} and mend_only["mend"]["yaml"].endswith("minimmedit-mend-host.yaml")


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "hparams", "bench"))
                                  if n.endswith(".yaml") and not n.startswith("minimmedit-")))
def test_every_shipped_bench_config_loads_and_plans(name):
    from easyedit_odedit.benchmark.config import load_config
    from easyedit_odedit.benchmark.runner import plan

    config = load_config(os.path.join(ROOT, "hparams", "bench", name))
    assert all(os.path.isfile(path) for path in config["hosts"].values())
    assert plan(config)


def test_a_chunk_count_per_sequence_length_plans_that_many_chunks():
    from easyedit_odedit.benchmark.config import load_config
    from easyedit_odedit.benchmark.runner import plan

    config = load_config({"hosts": {"FT-L": os.path.join(ROOT, "hparams/ODEdit/minimmedit-ft-l.yaml")},
                          "records": {"n_test": 40},
                          "settings": {"single": {"n": 0}, "sequential": {"T": [5, 10], "chunks": {5: 2, 10: 4}}}})
    counted = {}
    for seed, method, setting, chunk in plan(config):
        counted[(method.name, setting)] = counted.get((method.name, setting), 0) + 1
    assert counted == {(m, s): n for m in ("FT-L", "FT-L+ODEdit") for s, n in (("seq5", 2), ("seq10", 4))}


def test_mend_meta_training_is_reproducible(bench, tmp_path):
    """EasyEdit's trainer draws MEND's initial weights and the batch order from the global torch
    generator and ignores ``seed``: the runner seeds it for the training (and leaves it as it was),
    so the same seed gives the same archive whatever ran before."""
    import torch

    from easyedit_odedit.benchmark.config import SHIPPED_MODEL
    from easyedit_odedit.benchmark.meta_training import train_meta
    from easyedit_odedit.benchmark.methods import MendMethod

    out, _ = bench
    with open(out / "data" / "seed3" / "manifest.json") as f:
        data = json.load(f)
    mend = {"yaml": os.path.join(ROOT, "hparams/bench/minimmedit-mend-host.yaml"), "val_records": 2,
            "train": {"max_iters": 6, "val_interval": 3, "val_steps": 1, "batch_size": 2, "val_batch_size": 2}}
    archives = []
    for i in range(2):
        torch.rand(7 + i)  # whatever ran before moves the global generator
        state = torch.get_rng_state()
        training = train_meta(MendMethod, mend, "MEND", data, SHIPPED_MODEL, 3, str(tmp_path / f"run{i}"),
                              progress=False)
        assert torch.equal(torch.get_rng_state(), state)
        archives.append(torch.load(training["archive"], map_location="cpu", weights_only=False)["model"])
    tensors = [k for k, v in archives[0].items() if torch.is_tensor(v)]
    assert tensors and all(torch.equal(archives[0][k], archives[1][k]) for k in tensors)


def test_extra_items_are_scored_on_the_answer_positions(world):
    """The protocol's extra metrics read EasyEdit's ``compute_multimodal_edit_quality`` predictions;
    the PyPI release returns the answer positions, main the whole row. Either way the bench must
    compare the answer's predictions: the model's own argmax there, worked out here directly."""
    import torch
    from easyeditor import MultimodalEditor

    from easyedit_odedit import ODEditHyperParams
    from easyedit_odedit.benchmark.evaluation import Evaluation
    from tests.conftest import write_yaml

    editor = MultimodalEditor.from_hparams(ODEditHyperParams.from_hparams(write_yaml(world)))
    evaluation = Evaluation(editor, str(world))
    prompt = "question : what color is the shape ? short answer :"
    items = [("gen", "edit", "img/0.png", prompt, "red"), ("gen", "edit", "img/1.png", prompt, "blue green")]
    adapter = editor.model
    for (_, _, image, _, target), (pred, labels) in zip(items, evaluation.argmax(items)):
        target_ids = adapter.tokenizer(target, add_special_tokens=False)["input_ids"]
        assert list(labels) == target_ids and len(pred) == len(target_ids)
        batch = adapter.embed([f"{prompt} {target}"], [evaluation.image(image)], [len(adapter.tokenizer(prompt)["input_ids"])])
        with torch.no_grad():
            logits, _ = adapter.decode(batch)
        expected = logits[0, -len(target_ids) - 1:-1].argmax(-1).tolist()
        assert list(pred) == expected


@pytest.mark.parametrize("edit_odedit", [False, True])
def test_mend_edit_time_refinement_has_the_same_steps_with_and_without_odedit(bench, edit_odedit):
    """``mend.edit_steps`` refines every MEND edit; ``edit_odedit`` puts MEND+ODEdit's refinement
    under the ODEdit objective (MEND alone: the NLL), never a different number of steps or step
    size (``mend.edit_lr``, default |edit_lr|)."""
    from easyedit_odedit.benchmark.config import SHIPPED_MODEL
    from easyedit_odedit.benchmark.methods import MendMethod
    from easyedit_odedit.hosts import build_host

    out, _ = bench
    with open(out / "data" / "seed3" / "manifest.json") as f:
        data = json.load(f)
    mend = {"yaml": os.path.join(ROOT, "hparams/bench/minimmedit-mend-host.yaml"), "edit_steps": 4,
            "edit_odedit": edit_odedit}

    def both_rows(section):
        return [MendMethod(section, odedit, trained=lambda seed, alg: {"archive": f"/archives/{alg}"})
                .hparams(data, SHIPPED_MODEL, 3) for odedit in (False, True)]

    hps = both_rows(mend)
    assert [hp.optimiser.steps for hp in hps] == [4, 4]
    assert [build_host(hp).lr for hp in hps] == [1e-3, 1e-3]  # the host YAML's edit_lr
    assert [build_host(hp).lr for hp in both_rows(dict(mend, edit_lr=2e-3))] == [2e-3, 2e-3]
    assert [bool(hp.enabled) for hp in hps] == [False, edit_odedit]
    assert [hp.host_params.archive for hp in hps] == ["/archives/MEND", "/archives/ODEdit"]


def test_the_figure_shows_the_hosts_and_only_the_variants_the_config_names():
    from easyedit_odedit.benchmark.report import plotted_methods

    methods = ["FT-L+ODEdit[content]", "LoRA", "FT-L", "FT-L+ODEdit[kl=pre_post]", "FT-L+ODEdit", "LoRA+ODEdit"]
    config = {"hosts": {"FT-L": "a.yaml", "LoRA": "b.yaml"}}
    assert plotted_methods(methods, config) == ["FT-L", "FT-L+ODEdit", "LoRA", "LoRA+ODEdit"]
    assert plotted_methods(methods, dict(config, plot_variants=["content"])) == [
        "FT-L", "FT-L+ODEdit", "FT-L+ODEdit[content]", "LoRA", "LoRA+ODEdit"]
