"""Sequential editing (the paper's T = 5 / T = 10 setting): T ODEdit edits one after another without
restoring, then EasyEdit's own evaluation of *all* T edits on the final model, then
``easyedit_odedit.restore_all`` undoes every edit at once (checked bit for bit).

Run from the repository root:

    .venv/bin/python examples/sequential_edit.py                    # tiny random model, T = 5
    .venv/bin/python examples/sequential_edit.py -T 10 --hparams hparams/ODEdit/blip2-lora.yaml \\
        --data /path/to/MMEdit/vqa_eval.json --image-root /path/to/MMEdit/   # a real model (paths replaced)

Works with the PyPI release and GitHub main (on main also with the HF-model YAMLs, e.g.
``hparams/ODEdit/qwen2vl-lora.yaml``). Metrics: rewrite / rephrase / image_rephrase accuracy of each
edit after all T edits (EasyEdit's teacher-forced target-token accuracy, before -> after), and
locality as the share of positions whose top-1 token is unchanged (computed here from EasyEdit's
locality outputs, which the two EasyEdit versions return in different forms).
"""
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from easyedit_odedit import apply_odedit_to_multimodal_model, compat, restore_all  # noqa: E402
from easyedit_odedit.models import hf_native  # noqa: E402


def evaluator(editor):
    """EasyEdit's per-record evaluation function for this editor's model."""
    mod = compat.multimodal_evaluation()
    if hf_native.is_native(editor.model):  # GitHub main's HF models
        return mod.compute_multimodal_hf_edit_results
    return mod.compute_multimodal_edit_results


def top1(output) -> np.ndarray:
    """Locality output -> top-1 token ids (main returns logits, the PyPI release token ids)."""
    output = output.detach().cpu() if isinstance(output, torch.Tensor) else torch.as_tensor(np.asarray(output))
    return (output.argmax(-1) if output.dim() == 3 else output).reshape(-1).numpy()


def evaluate_all(editor, requests):
    fn = evaluator(editor)
    with compat.host_scope():  # the PyPI release's evaluation moves tensors to f"cuda:{device}"
        return [fn(editor.model, editor.model_name, editor.hparams, editor.tok, r, editor.hparams.device)
                for r in requests]


def main(argv=None):
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("-T", type=int, default=5, help="number of sequential edits (the paper uses 5 and 10)")
    args = p.parse_args(argv)
    world, hp, editor = C.set_up(args, n_records=args.T)
    recs = C.records(args, world)[: args.T]
    kw = C.edit_arguments(hp, recs, args)
    with compat.host_scope():
        requests = editor._prepare_requests(kw["prompts"], kw["targets"], kw["image"], kw["rephrase_prompts"],
                                            kw["rephrase_image"], kw["locality_inputs"])
    model = editor.model
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pre = evaluate_all(editor, requests)

    start = time.time()
    for i, request in enumerate(requests):  # keep_original_weight=False: nothing is restored in between
        apply_odedit_to_multimodal_model(model, editor.tok, [request], hp, keep_original_weight=False)
        print(f"edit {i + 1}/{len(requests)}: {request['prompt']!r} -> {request['target']!r}")
    edit_time = time.time() - start
    post = evaluate_all(editor, requests)

    rows = []
    for i, (a, b) in enumerate(zip(pre, post)):
        row = {"edit": i, **{k: f"{float(a[k]):.2f} -> {float(b[k]):.2f}" for k in b if k.endswith("_acc")}}
        for key in ("locality_output", "multimodal_locality_output"):
            if key in a and key in b:
                x, y = top1(a[key]), top1(b[key])
                n = min(len(x), len(y))
                row[key.replace("_output", "_top1_kept")] = round(float(np.mean(x[-n:] == y[-n:])), 4)
        rows.append(row)
        print(json.dumps(row))
    means = {k: round(float(np.mean([float(b[k]) for b in post])), 4) for k in post[0] if k.endswith("_acc")}
    print(f"T = {len(requests)} sequential edits in {edit_time:.1f}s ({C.flavour()} EasyEdit); "
          f"mean accuracy after all edits: {means}")

    restored = restore_all(C.unwrap(model))
    identical = all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    print(f"restore_all: {restored} tensors restored; model bit-identical to the original: {identical}")
    with open("sequential_edit_metrics.json", "w") as f:
        json.dump({"T": len(requests), "per_edit": rows, "mean_after_all": means,
                   "restored_identical": identical}, f, indent=1)
    if not identical:
        raise SystemExit("restore_all did not restore the original weights")
    return rows


if __name__ == "__main__":
    main()
