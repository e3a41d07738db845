"""Meta-train SERAC with the ODEdit objective through EasyEdit's own MultimodalTrainer, then edit
with the trained archive through EasyEdit's own SERAC executor (the edit goes into SERAC's memory;
no weight changes).

Run from the repository root (MiniMMEdit base model and records; about a minute on 2 CPU cores):

    .venv/bin/python examples/train_serac.py [--iters 40] [--work results/examples/serac]

SERAC needs a scope classifier to start from (`cls_name`): for a real model EasyEdit's
distilbert-base-cased; here a small BERT over the MiniMMEdit vocabulary, written by
`easyedit_odedit.hosts.serac.scope_classifier_for`. For BLIP-2, LLaVA-1.5 or MiniGPT-4: the same two
steps with hparams/TRAINING/ODEdit/{blip2,llava15,minigpt4}-serac.yaml and hparams/SERAC/<model>.yaml
(EasyEdit's SERACMultimodalHparams), on EasyEdit's E-VQA train/eval JSONs.
"""
import argparse
import json
import os

import torch
import yaml

import easyedit_odedit  # noqa: F401  (registers ODEdit and ODEDIT in EasyEdit)
from easyedit_odedit import ODEditHyperParams, compat
from easyedit_odedit.benchmark.records import write_benchmark
from easyedit_odedit.benchmark.evaluation import Evaluation
from easyedit_odedit.hosts.easyedit_native import build_easyedit_hparams
from easyedit_odedit.hosts.serac import scope_classifier_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "easyedit_odedit", "assets", "minimmedit-base")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=16)
    parser.add_argument("--work", default="results/examples/serac")
    args = parser.parse_args(argv)
    data = write_benchmark(MODEL, os.path.join(args.work, "data"), n_train=8, n_test=2, seed=0, pool_images=200)

    host = yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/SERAC/tiny-host.yaml")))
    host.update(max_iters=args.iters, val_interval=max(args.iters // 2, 1), val_steps=2,
                cls_name=scope_classifier_for(MODEL, os.path.join(args.work, "scope-bert")))
    model = {"model_name": "blip2", "name": MODEL, "tokenizer_name": MODEL, "tokenizer_class": "PreTrainedTokenizerFast",
             "coco_image": data["image_root"], "rephrase_image": data["image_root"],
             "results_dir": os.path.join(args.work, "results"), "device": 0}
    # no generality MMD for SERAC (it stopped SERAC learning to answer from memory; see the README)
    hp = ODEditHyperParams.from_dict({"host": "SERAC", "host_hparams": host, "penalty": {"lambda_input": "edit_hidden"},
                                      "risks": {"gen_weight": 0.0}, **model})
    VQADataset = compat.module("dataset.vqa").VQADataset
    from easyeditor import MultimodalEditor, MultimodalTrainer

    trainer = MultimodalTrainer(config=hp, train_set=VQADataset(data["train"], config=hp),
                                val_set=VQADataset(data["test"], config=hp))
    trainer.run()
    print("ODEdit terms at the last step:", {k: round(v, 4) for k, v in trainer._odedit_logs.items()})

    # editing: EasyEdit's own SERAC hparams with the archive ODEdit's objective trained
    edit_host = {k: v for k, v in host.items() if k != "alg"}
    edit_host.update(archive=os.path.join(args.work, "results", "models", "ODEdit", "blip2"), alg_name="SERAC_MULTI")
    editor = MultimodalEditor.from_hparams(build_easyedit_hparams("SERAC", edit_host, model, "examples/train_serac"))
    record = json.load(open(data["test"]))[0]
    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    # the record's edit and evaluation fields, as MultimodalEditor.edit takes them (the bench's helper)
    metrics, edited, _ = editor.edit(**Evaluation(editor, data["image_root"]).edit_arguments([record]),
                                     keep_original_weight=True, verbose=False)
    print("SERAC memory after the edit:", edited.cache_inputs)
    print("EasyEdit's metrics:", {k: float(v) for k, v in metrics[0]["post"].items() if k.endswith("_acc")})
    unchanged = all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())
    print("base model weights unchanged:", unchanged)
    return {"odedit_logs": trainer._odedit_logs, "memory": list(edited.cache_inputs), "unchanged": unchanged}


if __name__ == "__main__":
    main()
