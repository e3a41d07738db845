"""``odedit``: command-line entry point.

``odedit demo --out DIR``: one ODEdit edit end to end through EasyEdit's own ``MultimodalEditor``,
on a small model built here (random weights; until the MiniMMEdit base model ships), printing
EasyEdit's pre/post metrics as a table and writing them to ``DIR/demo.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def _demo(out: str, host: str) -> dict:
    import numpy as np
    import yaml
    from PIL import Image

    import easyedit_odedit  # noqa: F401
    from easyeditor import MultimodalEditor

    from easyedit_odedit import ODEditHyperParams
    from easyedit_odedit.models.tiny import save_tiny_conv_llama

    os.makedirs(out, exist_ok=True)
    model_dir = os.path.join(out, "model")
    save_tiny_conv_llama(model_dir)
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        path = os.path.abspath(os.path.join(out, f"image{i}.png"))
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(path)
        images.append(path)
    pool = os.path.join(out, "pool.json")
    with open(pool, "w") as f:
        json.dump([{"loc": "what is two plus two ?", "loc_ans": "four"},
                   {"loc": "what is one plus one ?", "loc_ans": "two"}], f)
    config = {"alg_name": "ODEdit", "host": host, "enabled": True,
              "host_hparams": {"layers": [0, 1], "modules": ["mlp", "self_attn"], "num_steps": 40, "lr": 0.01},
              "model_name": "blip2", "name": model_dir, "tokenizer_class": "PreTrainedTokenizerFast",
              "tokenizer_name": model_dir, "device": 0, "coco_image": "", "rephrase_image": "",
              "environments": {"locality_pool": pool, "out_image": 0}}
    yaml_path = os.path.join(out, "demo.yaml")
    with open(yaml_path, "w") as f:
        yaml.safe_dump(config, f)
    editor = MultimodalEditor.from_hparams(ODEditHyperParams.from_hparams(yaml_path))
    start = time.time()
    metrics, _, _ = editor.edit(
        prompts=["question : what color is the shape ? short answer :"], targets=["green"], image=[images[0]],
        rephrase_prompts=["what color is the shape ?"], rephrase_image=[images[1]],
        locality_inputs={"text": {"prompt": ["what is two plus three ?"], "ground_truth": ["five"]},
                         "vision": {"image": [images[2]], "prompt": ["what shape is in the image ?"],
                                    "ground_truth": ["circle"]}},
        keep_original_weight=True, verbose=False)
    result = {"host": host, "seconds": round(time.time() - start, 2),
              **{phase: {k: float(v) for k, v in metrics[0][phase].items() if k.endswith("_acc")}
                 for phase in ("pre", "post")}}
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(result, f, indent=2)
    keys = sorted(result["post"])
    print(f"\n| metric | pre | post |\n|---|---|---|")
    for k in keys:
        pre = result["pre"].get(k)
        print(f"| {k} | {'' if pre is None else f'{pre:.3f}'} | {result['post'][k]:.3f} |")
    print(f"\nedit took {result['seconds']} s; written to {os.path.join(out, 'demo.json')}")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="odedit")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="one ODEdit edit end to end through EasyEdit's MultimodalEditor")
    demo.add_argument("--out", default="results/demo")
    demo.add_argument("--host", default="FT-L", choices=["FT-L", "FT-V", "LoRA"])
    args = parser.parse_args(argv)
    if args.command == "demo":
        _demo(args.out, args.host)


if __name__ == "__main__":
    main()
