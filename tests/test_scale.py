"""``odedit edit`` / ``odedit train`` in one process and under ``torchrun --nproc_per_node 2`` (CPU,
gloo), on MiniMMEdit records written by the bench's own record writer and the shipped base model."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4  # records edited (--limit)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """MiniMMEdit records (8 train, 6 test), an FT-L+ODEdit YAML pointed at them, and the
    one-process reference run of the first N test records."""
    from easyedit_odedit.benchmark.records import write_benchmark
    from easyedit_odedit.benchmark.config import SHIPPED_MODEL
    from easyedit_odedit.benchmark.methods import _point_at_world

    root = tmp_path_factory.mktemp("scale")
    data = write_benchmark(SHIPPED_MODEL, str(root / "data"), n_train=8, n_test=6, seed=0, pool_images=40)
    with open(os.path.join(ROOT, "hparams/ODEdit/minimmedit-ft-l.yaml")) as f:
        config = yaml.safe_load(f)
    _point_at_world(config, data, SHIPPED_MODEL, 0, enabled=True)
    config["host_hparams"].update(num_steps=6, lr=3.0e-3)
    (root / "ftl.yaml").write_text(yaml.safe_dump(config))
    world = {"root": root, "data": data, "yaml": str(root / "ftl.yaml"), "model": SHIPPED_MODEL}
    world["reference"] = edit(world, root / "one")
    return world


def edit(world, out, *extra):
    from easyedit_odedit.cli import main

    main(["edit", "--hparams", world["yaml"], "--data", world["data"]["test"], "--out", str(out),
          "--limit", str(N), "--quiet", *extra])
    return results(out)


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "edits.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return summary, rows


def metrics(rows):
    """Everything but the wall time of each edit."""
    return [{k: v for k, v in row.items() if k != "edit_s"} for row in rows]


def torchrun(args, env=None, check=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "easyedit_odedit", *args]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]), **(env or {}))
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_one_process_edits_each_record_from_the_unedited_model_and_a_rerun_skips(mini):
    summary, rows = mini["reference"]
    assert [r["record"] for r in rows] == list(range(N))
    assert summary["n_edited"] == N and summary["this_run"] == dict(summary["this_run"], edited=N, skipped_finished=0)
    for row in rows:
        assert set(row["pre"]) == {"rewrite_acc", "rephrase_acc", "image_rephrase_acc"}
        assert set(row["post"]) >= {"rewrite_acc", "locality_acc", "multimodal_locality_acc"}
    # pre is measured on the unedited model (the base model answers `pred`, not the new `alt`): an
    # edit that took shows post above pre, which pre-after-the-edit (GitHub main's edit()) cannot
    assert any(r["post"]["rewrite_acc"] > r["pre"]["rewrite_acc"] for r in rows)
    assert summary["means"]["post"]["rewrite_acc"] == pytest.approx(sum(r["post"]["rewrite_acc"] for r in rows) / N)
    again, rows_again = edit(mini, mini["root"] / "one")
    assert again["this_run"]["edited"] == 0 and again["this_run"]["skipped_finished"] == N
    assert rows_again == rows


def test_torchrun_two_processes_give_the_one_process_rows(mini):
    out = mini["root"] / "two"
    torchrun(["edit", "--hparams", mini["yaml"], "--data", mini["data"]["test"], "--out", str(out),
              "--limit", str(N), "--quiet"])
    summary, rows = results(out)
    assert metrics(rows) == metrics(mini["reference"][1])
    assert summary["means"] == mini["reference"][0]["means"] and summary["processes"] == 2
    assert not [p for p in os.listdir(out) if p.startswith("edits.rank")]  # merged into edits.jsonl


def test_a_failed_process_names_its_records_and_a_rerun_edits_only_the_missing(mini):
    out = mini["root"] / "failed"
    done = torchrun(["edit", "--hparams", mini["yaml"], "--data", mini["data"]["test"], "--out", str(out),
                     "--limit", str(N), "--quiet"], env={"ODEDIT_TEST_FAIL_AFTER": "1:1"}, check=False)
    assert done.returncode != 0
    # process 1 edits records 1 and 3 (round-robin), finishes record 1, then fails on record 3
    assert "process 1 of 2 failed on record(s) [3]" in done.stderr and "Its records not edited: [3]" in done.stderr
    from easyedit_odedit.scale import shards

    kept = shards.finished(str(out))
    assert 1 in kept and 3 not in kept
    summary, rows = edit(mini, out)  # rerun (here in one process): only what is missing
    assert summary["this_run"]["skipped_finished"] == len(kept)
    assert summary["this_run"]["edited"] == N - len(kept)
    assert metrics(rows) == metrics(mini["reference"][1])


def test_sequences_are_restored_between_them(mini):
    summary, rows = edit(mini, mini["root"] / "seq", "--sequential", "2")
    assert [(r["sequence_start"], r["position"]) for r in rows] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert summary["fingerprint"]["sequential"] == 2  # the runner checked the weights came back after each


@pytest.mark.parametrize("args, option", [
    (["--data", "missing.json"], "--data"),
    (["--kind", "video"], "--kind"),
    (["--sequential", "0"], "--sequential"),
    (["--limit", "0"], "--limit"),
    (["--hparams", "missing.yaml"], "--hparams"),
])
def test_bad_options_fail_before_loading_a_model_and_name_the_option(mini, tmp_path, args, option):
    from easyedit_odedit.cli import main

    base = {"--hparams": mini["yaml"], "--data": mini["data"]["test"], "--out": str(tmp_path / "out")}
    base.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(SystemExit) as raised:
        main(["edit", *[x for kv in base.items() for x in kv], "--quiet"])
    assert str(raised.value).startswith("odedit edit: " + option)


def test_a_different_run_in_the_same_folder_is_refused(mini):
    from easyedit_odedit.cli import main

    with pytest.raises(SystemExit, match="--out holds the results of a different run.*--sequential"):
        main(["edit", "--hparams", mini["yaml"], "--data", mini["data"]["test"], "--out", str(mini["root"] / "one"),
              "--limit", str(N), "--sequential", "2", "--quiet"])


# -------------------------------------------------------------------------------------------------
# Meta-training
# -------------------------------------------------------------------------------------------------
def training_yaml(mini, path, accumulate, max_iters, val_interval, results_dir):
    with open(os.path.join(ROOT, "hparams/TRAINING/MEND/tiny-host.yaml")) as f:
        host = yaml.safe_load(f)
    host.update(max_iters=max_iters, val_interval=val_interval, val_steps=2, accumulate_bs=accumulate,
                batch_size=1, inner_params=["language_model.model.layers.2.mlp.down_proj.weight"])
    image_root = mini["data"]["image_root"]
    config = {"alg_name": "ODEdit", "host": "MEND", "host_hparams": host, "model_name": "blip2",
              "name": mini["model"], "tokenizer_name": mini["model"], "tokenizer_class": "PreTrainedTokenizerFast",
              "coco_image": image_root, "rephrase_image": image_root, "device": 0, "results_dir": str(results_dir),
              # the TV penalty stays in warm-up: its multiplier's dual step is per process (docs/scaling.md)
              "penalty": {"lambda_input": "edit_hidden", "warmup_steps": 1000}}
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def trained(mini):
    """The same MEND+ODEdit meta-training: 2 processes x (batch 1, accumulate 1) for 4 iterations,
    and 1 process x (batch 1, accumulate 2) for 8, over the same micro-batches."""
    root = mini["root"]
    with open(mini["data"]["train"]) as f:
        records = json.load(f)
    (root / "fit.json").write_text(json.dumps(records[:6]))
    (root / "val.json").write_text(json.dumps(records[6:]))
    data = ["--train", str(root / "fit.json"), "--val", str(root / "val.json")]
    from easyedit_odedit.cli import main

    main(["train", "--hparams", training_yaml(mini, root / "t1.yaml", 2, 9, 4, root / "t1"), *data])
    torchrun(["train", "--hparams", training_yaml(mini, root / "t2.yaml", 1, 5, 2, root / "t2"), *data])
    return {n: torch.load(root / n / "models" / "ODEdit" / "blip2", map_location="cpu", weights_only=False)
            for n in ("t1", "t2")}


def test_two_process_meta_training_matches_one_process_with_the_same_global_batch(trained):
    one, two = trained["t1"], trained["t2"]
    assert one["step"] == 8 and two["step"] == 4  # the same 4 optimiser steps
    tensors = {k for k, v in one["model"].items() if torch.is_tensor(v)}
    mend = [k for k in tensors if k.startswith("mend.")]
    assert mend and "edit_lrs" in tensors
    for key in tensors:
        assert torch.equal(one["model"][key], two["model"][key]), key  # bit-identical, statistics included
    assert {k: v for k, v in one["val_stats"].items() if "time" not in k} == \
           {k: v for k, v in two["val_stats"].items() if "time" not in k}


def test_an_easyedit_only_hparams_file_edits_through_the_same_runner(mini, trained, tmp_path):
    """EasyEdit's own MEND hparams (alg_name MEND, the archive just trained): the host alone."""
    from easyedit_odedit import compat

    cls = compat.import_easyeditor().MENDMultimodalHparams
    with open(os.path.join(ROOT, "hparams/TRAINING/MEND/tiny-host.yaml")) as f:
        host = yaml.safe_load(f)
    names = {f.name for f in dataclasses.fields(cls)}
    image_root = mini["data"]["image_root"]
    config = {k: v for k, v in host.items() if k in names}
    config.update(alg_name="MEND", archive=str(mini["root"] / "t1" / "models" / "ODEdit" / "blip2"), lr_scale=1.0,
                  inner_params=["language_model.model.layers.2.mlp.down_proj.weight"], model_name="blip2",
                  name=mini["model"], tokenizer_name=mini["model"], tokenizer_class="PreTrainedTokenizerFast",
                  coco_image=image_root, rephrase_image=image_root, device=0, results_dir=str(tmp_path))
    path = tmp_path / "mend.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if k in names}))
    summary, rows = edit(dict(mini, yaml=str(path)), tmp_path / "out")
    assert summary["n_edited"] == N and [r["record"] for r in rows] == list(range(N))
    assert all(0.0 <= r["post"]["rewrite_acc"] <= 1.0 for r in rows)
