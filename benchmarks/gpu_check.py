"""One prepared GPU check (run where a CUDA device exists; prints everything it measures).

    python benchmarks/gpu_check.py [--big] [--steps 10] [--preset paper|content] [--pool-index DIR|auto] [--json]

1. The same code on CUDA without the CPU redirect: an ODEdit edit through EasyEdit's own
   ``MultimodalEditor`` (``device: 0``) on a small model, EasyEdit's metrics, and bit-identical
   restore of the whole state dict after a single edit and after 5 sequential edits.
2. Per-edit time and peak GPU memory on the small MiniMMEdit model: host alone, a plain step over
   ODEdit's environment rows (mean NLL, what batching the environments costs by itself) and
   host + ODEdit, at equal steps; ODEdit's own terms are the last against the second.
3. With ``--big``: the same on a random-weight model with the shapes of a 7B-class LLaVA (CLIP
   ViT-L/14-336 + Llama-7B, bf16), for each host of ``overhead.LLAVA_HOSTS`` (FT-L on the top two layers' MLPs
   and on the top MLP alone, LoRA, FT-V on the projector).
On a machine without CUDA it runs on the CPU with a 2-layer stand-in for the big model (to test
the script itself). ``--preset content`` times the content preset; its pool index (every pool
image's features and probe answers) is built in the first run's warm-up edit, once per model and
process, and with ``--pool-index DIR`` kept there for the next run (a rerun on the same GPU, torch
and weights loads it instead of building it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import easyedit_odedit  # noqa: E402
from easyedit_odedit import compat, restore_all  # noqa: E402
from easyedit_odedit.odedit import odedit_main  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import (LLAVA_HOSTS, LLAVA_SHAPES, SHIPPED, batched_nll_steps, contents_judged_distinct,  # noqa: E402
                      edit_views, host_config, llava_shaped, minimmedit_world, time_edits,
                      world_hparams)  # (shared with overhead.py)

CUDA = torch.cuda.is_available()
DEVICE = "cuda:0" if CUDA else "cpu"


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_editor(config, data, records):
    from easyeditor import MultimodalEditor

    from easyedit_odedit.benchmark.evaluation import edit_arguments

    hp = world_hparams(config, data, SHIPPED, steps=20, device=0)
    redirect_installed = []
    with compat.cpu_redirect():
        redirect_installed.append(torch.Tensor.to is not compat.scopes._originals.get("tensor_to", torch.Tensor.to))
    editor = MultimodalEditor.from_hparams(hp)
    print(f"[1] model on {next(editor.model.parameters()).device}; CPU redirect active during EasyEdit calls: "
          f"{any(redirect_installed)}")
    before = state(editor.model)
    start = time.time()
    metrics, _, _ = editor.edit(**edit_arguments(records[:1], data["image_root"]), keep_original_weight=True,
                                verbose=False)
    post = {k: round(float(v), 3) for k, v in metrics[0]["post"].items() if k.endswith("_acc")}
    print(f"[1] MultimodalEditor.edit: {time.time() - start:.2f} s, post {post}")
    print(f"[1] whole state dict bit-identical after restore: {same(before, state(editor.model))}")
    with compat.host_scope():
        requests = editor._prepare_requests(**edit_arguments(records[:5], data["image_root"]))
    for request in requests:
        odedit_main.apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp)
    changed = not same(before, state(editor.model))
    restore_all(editor.model)
    print(f"[1] 5 sequential edits changed the weights: {changed}; restored bit-identically in one call: "
          f"{same(before, state(editor.model))}")


def measure(adapter, hp, views):
    """Median seconds, median set-up seconds, every timed edit's seconds and peak memory of the
    edits of ``views`` after the first, a warm-up (``overhead.time_edits``)."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = time_edits(adapter, hp, views)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if CUDA else float("nan")
    return statistics.median(timed.times), statistics.median(timed.setup) if timed.setup else 0.0, timed.times, peak


# (run, ODEdit settings, plain batched steps): the host alone with and without the prefix cache (a
# host implementation of its own runs the whole model each step), a plain step over ODEdit's rows,
# and host + ODEdit
RUNS = (("host", {"enabled": False}, False),
        ("host, whole model each step", {"enabled": False, "optimiser": {"cache_prefix": False}}, False),
        ("batched NLL", {"enabled": True}, True),
        ("host+ODEdit", {"enabled": True}, False))


def compare(name, adapter, base_config, data, steps, views, method=None):
    """Per-edit time and peak memory of each of ``RUNS`` at the same host settings and steps
    (``method``: ODEdit settings for every run, e.g. a preset and where its pool index lives)."""
    rows = {}
    for run, settings, batched in RUNS:
        hp = world_hparams(base_config, data, SHIPPED, steps, **settings, **(method or {}))
        try:
            with batched_nll_steps() if batched else contextlib.nullcontext():
                rows[run] = measure(adapter, hp, views)
        except torch.cuda.OutOfMemoryError as err:  # say so and go on: the other hosts' figures still count
            print(f"[{name}] {run}: out of GPU memory: {str(err)[:200]}")
            torch.cuda.empty_cache()
            rows[run] = (float("nan"), float("nan"), [], float("nan"))
    print(f"\n[{name}] {sum(p.numel() for p in adapter.parameters()):,} parameters, "
          f"{base_config['host']} {dict(base_config['host_hparams'], num_steps=steps)}")
    print("| run | s / edit | of which set-up | each timed edit (s) | peak GPU GiB |\n|---|---|---|---|---|")
    for run, (seconds, setup, each, peak) in rows.items():
        print(f"| {run} | {seconds:.3f} | {setup:.3f} | {' '.join(f'{t:.3f}' for t in each)} | {peak:.2f} |")
    (host_s, _, _, host_mem), (whole_s, _, _, _), (plain_s, _, _, _), (odedit_s, _, _, odedit_mem) = rows.values()
    print(f"ratios: time x{odedit_s / host_s:.2f} (x{odedit_s / whole_s:.2f} against the host running the whole "
          f"model each step), memory x{odedit_mem / host_mem:.2f}, ODEdit's own terms x{odedit_s / plain_s:.2f} "
          "(against the batched NLL step)")
    odedit_setup = rows["host+ODEdit"][1]
    return {"s_edit": odedit_s, "host_s_edit": host_s, "x_time": odedit_s / host_s, "x_time_whole_model": odedit_s / whole_s,
            "x_memory": odedit_mem / host_mem, "own_terms_edit": odedit_s / plain_s, "peak_gib": odedit_mem,
            "setup_share": odedit_setup / odedit_s}


def big_llava(layers: int):
    """The 7B-class LLaVA shape in bf16 on CUDA; on a CPU a small stand-in that runs the same code."""
    shape = LLAVA_SHAPES["7b"] if CUDA else dict(LLAVA_SHAPES["medium"], hidden=256, intermediate=512, heads=4,
                                                  vision_layers=1)
    return llava_shaped(**dict(shape, layers=layers), dtype=torch.bfloat16 if CUDA else torch.float32, device=DEVICE)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="end with one JSON line: the figures of every comparison")
    parser.add_argument("--preset", default="", choices=["", "paper", "content"], help="ODEdit's preset (default: the YAML's)")
    parser.add_argument("--pool-index", default="", help="environments.pool_index: a folder or auto keeps the content "
                        "preset's index for the next run (default: memory)")
    args = parser.parse_args()
    method = {**({"preset": args.preset} if args.preset else {}),
              **({"environments": {"pool_index": args.pool_index}} if args.pool_index else {})}
    figures = {}
    print(f"torch {torch.__version__}, CUDA {CUDA} ({torch.cuda.get_device_name(0) if CUDA else 'cpu'}), "
          f"easyeditor flavour {compat.flavour()}")
    data, records, edits = minimmedit_world(tempfile.mkdtemp(), 5)
    edits = edits[:4]  # a warm-up and 3 timed edits
    from easyedit_odedit.models.loading import load_adapter

    small_ft_l = host_config("FT-L")
    check_editor(small_ft_l, data, records)
    small = load_adapter(SHIPPED).to(DEVICE)
    figures["small"] = compare("small", small, small_ft_l, data, args.steps, edit_views(edits, DEVICE), method)
    if args.big:
        del small
        start = time.time()
        big = big_llava(32 if CUDA else 2)
        print(f"\n[big] built in {time.time() - start:.1f} s")
        views = edit_views(edits, DEVICE, torch.bfloat16 if CUDA else torch.float32)
        with contents_judged_distinct():  # random weights: the trained model's rows (overhead.py)
            for name in LLAVA_HOSTS:
                figures[f"big {name}"] = compare(f"big {name}", big, host_config(name, llava=True), data, args.steps, views,
                                                 method)
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(0) if CUDA else "cpu", "steps": args.steps,
                          "comparisons": figures}))


if __name__ == "__main__":
    main()
