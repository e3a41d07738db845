"""Meta-train MEND with the ODEdit objective through EasyEdit's own MultimodalTrainer, then edit
with the trained archive (EasyEdit's MEND executor makes the edit, ODEdit refines the same weights).

Run from the repository root (MiniMMEdit base model and records; a few minutes on 2 CPU cores):

    .venv/bin/python examples/train_mend.py [--iters 40] [--work results/examples/mend]

For a real model: point `name`/`tokenizer_name` of hparams/TRAINING/ODEdit/tiny-mend.yaml at it,
set the host's `inner_params` to its layer names, and pass EasyEdit's E-VQA train/eval JSONs.
"""
import argparse
import json
import os

import torch
import yaml

import easyedit_odedit  # noqa: F401  (registers ODEdit and ODEDIT in EasyEdit)
from easyedit_odedit import ODEditHyperParams, apply_odedit_to_multimodal_model, compat
from easyedit_odedit.benchmark.records import write_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "easyedit_odedit", "assets", "minimmedit-base")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=16, help="EasyEdit runs round(iters / 8) epochs of the 8 records")
    parser.add_argument("--work", default="results/examples/mend")
    args = parser.parse_args(argv)
    data = write_benchmark(MODEL, os.path.join(args.work, "data"), n_train=8, n_test=2, seed=0, pool_images=200)

    host = yaml.safe_load(open(os.path.join(ROOT, "hparams/TRAINING/MEND/tiny-host.yaml")))
    host.update(max_iters=args.iters, val_interval=max(args.iters // 2, 1), val_steps=2,
                inner_params=["language_model.model.layers.2.mlp.down_proj.weight"])
    config = {"host": "MEND", "host_hparams": host, "model_name": "blip2", "name": MODEL, "tokenizer_name": MODEL,
              "coco_image": data["image_root"], "rephrase_image": data["image_root"],
              "results_dir": os.path.join(args.work, "results"), "penalty": {"lambda_input": "edit_hidden"}}
    hp = ODEditHyperParams.from_dict(config)
    VQADataset = compat.module("dataset.vqa").VQADataset
    from easyeditor import MultimodalEditor, MultimodalTrainer

    trainer = MultimodalTrainer(config=hp, train_set=VQADataset(data["train"], config=hp),
                                val_set=VQADataset(data["test"], config=hp))
    trainer.run()
    print("ODEdit terms at the last step:", {k: round(v, 4) for k, v in trainer._odedit_logs.items()})

    archive = os.path.join(args.work, "results", "models", "ODEdit", "blip2")
    edit_host = {k: v for k, v in host.items() if k not in ("alg", "batch_size", "max_iters")}
    edit_host.update(archive=archive, lr_scale=1.0)
    hp_edit = ODEditHyperParams.from_dict(dict(config, host_hparams=edit_host, optimiser={"steps": 5},
                                               environments={"locality_pool": data["locality_pool"],
                                                             "locality_image_root": data["image_root"]}))
    editor = MultimodalEditor.from_hparams(hp_edit)
    with compat.host_scope():
        request = editor._prepare_requests(["Question: what color is the shape? Short answer:"], ["green"],
                                           [os.path.join(data["image_root"], json.load(open(data["test"]))[0]["image"])],
                                           locality_inputs={})[0]
    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    _, restore = apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp_edit, keep_original_weight=True)
    changed = [k for k, v in editor.model.state_dict().items() if not torch.equal(before[k], v)]
    print("MEND + ODEdit edit changed:", changed)
    restore()
    restored = all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())
    print("restored bit-identically:", restored)
    return {"odedit_logs": trainer._odedit_logs, "changed": changed, "restored": restored}


if __name__ == "__main__":
    main()
