"""Many consecutive single edits in one process: does anything grow?

Runs ``--n`` edits through EasyEdit's own ``MultimodalEditor.edit(..., keep_original_weight=True)``
on the tiny random model (built in a temporary folder) and prints, every ``--every`` edits: resident
memory (VmRSS from /proc/self/status), open file descriptors, logging handlers over all loggers,
live tensors, and the mean seconds per edit of the block. Ends with the table and a verdict.

    python benchmarks/many_edits.py --n 500 --steps 2

Linux only (reads /proc/self). EasyEdit's INFO log lines go to its run.log in the temporary folder;
console handlers are raised to WARNING so the table stays readable (the handler count is what is
measured, and it is unchanged by that). The first row is the baseline of the verdict: caches (the
processed locality-pool images, lazy imports) fill during the first block.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

import easyedit_odedit  # noqa: E402,F401  (registers ODEdit)
from easyedit_odedit import ODEditHyperParams  # noqa: E402
from easyedit_odedit.models.tiny import save_tiny_conv_llama  # noqa: E402

PROMPT = "question : what color is the shape ? short answer :"
TARGETS = ["green", "red", "blue", "yellow", "black"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def handler_count() -> int:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return sum(len(lg.handlers) for lg in loggers)


def live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def build_world(root: str, host: str, steps: int, full_environments: bool) -> str:
    save_tiny_conv_llama(os.path.join(root, "model"))
    os.makedirs(os.path.join(root, "img"))
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = (rng.random((64, 64, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(os.path.join(root, "img", f"{i}.png"))
    pool = [{"image": f"img/{i}.png", "src": "what color is the shape ?", "pred": "red",
             "loc": "what is two plus two ?", "loc_ans": "four", "m_loc": f"img/{(i + 1) % 8}.png",
             "m_loc_q": "what shape is in the image ?", "m_loc_a": "circle"} for i in range(6)]
    with open(os.path.join(root, "pool.json"), "w") as f:
        json.dump(pool, f)
    host_hparams = {"FT-L": {"layers": [-1], "num_steps": steps, "lr": 0.1},
                    "FT-V": {"num_steps": steps, "lr": 0.05, "modules": ["projector"]},
                    "LoRA": {"layers": [-1], "num_steps": steps, "lr": 0.1, "rank": 2}}[host]
    environments = {"locality_pool": os.path.join(root, "pool.json")}
    if not full_environments:
        environments.update(pool_factor=1, se_image=1, out_image=1)
    config = {"alg_name": "ODEdit", "host": host, "host_hparams": host_hparams, "model_name": "blip2",
              "name": os.path.join(root, "model"), "tokenizer_class": "PreTrainedTokenizerFast",
              "tokenizer_name": os.path.join(root, "model"), "device": 0, "coco_image": root,
              "rephrase_image": root, "environments": environments}
    path = os.path.join(root, "odedit.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def edit_kwargs(root: str, i: int) -> dict:
    img = lambda k: os.path.join(root, "img", f"{k % 8}.png")  # noqa: E731
    return dict(prompts=[PROMPT], targets=[TARGETS[i % len(TARGETS)]], image=[img(i)],
                rephrase_prompts=["what is the color of the shape ?"], rephrase_image=[img(i + 1)],
                locality_inputs={"text": {"prompt": ["what is two plus three ?"], "ground_truth": ["five"]},
                                 "vision": {"image": [img(i + 2)], "prompt": ["what shape is in the image ?"],
                                            "ground_truth": ["circle"]}})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="number of edits")
    parser.add_argument("--every", type=int, default=50, help="print a row every this many edits")
    parser.add_argument("--steps", type=int, default=2, help="host optimisation steps per edit")
    parser.add_argument("--host", default="FT-L", choices=["FT-L", "FT-V", "LoRA"])
    parser.add_argument("--full-environments", action="store_true",
                        help="the default environment counts (slower) instead of one of each per step")
    parser.add_argument("--rss-tolerance-mib", type=float, default=64.0,
                        help="RSS change between the first and the last row still called noise")
    args = parser.parse_args(argv)
    from easyeditor import MultimodalEditor

    with tempfile.TemporaryDirectory(prefix="odedit-many-edits-") as root:
        cwd = os.getcwd()
        os.chdir(root)  # EasyEdit writes logs/run.log into the current directory
        try:
            hparams = ODEditHyperParams.from_hparams(build_world(root, args.host, args.steps, args.full_environments))
            editor = MultimodalEditor.from_hparams(hparams)
            for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
                for handler in getattr(logger, "handlers", []):  # console only; run.log keeps INFO
                    if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                        handler.setLevel(logging.WARNING)
            before = {k: v.detach().clone() for k, v in editor.model.state_dict().items()}
            rows, block = [], []
            gc.collect()
            start = dict(edit=0, rss=rss_mib(), fds=open_fds(), handlers=handler_count(), tensors=live_tensors(),
                         secs=float("nan"))
            print(f"{args.n} edits, host {args.host}, {args.steps} steps, torch threads {torch.get_num_threads()}")
            header = f"{'edit':>5} {'RSS MiB':>8} {'fds':>4} {'handlers':>8} {'tensors':>7} {'s/edit':>7}"
            print(header)
            print(_row(start))
            for i in range(1, args.n + 1):
                t0 = time.perf_counter()
                editor.edit(**edit_kwargs(root, i), keep_original_weight=True, verbose=False)
                block.append(time.perf_counter() - t0)
                if i % args.every == 0 or i == args.n:
                    gc.collect()
                    row = dict(edit=i, rss=rss_mib(), fds=open_fds(), handlers=handler_count(),
                               tensors=live_tensors(), secs=statistics.mean(block))
                    rows.append(row)
                    block = []
                    print(_row(row), flush=True)
            restored = all(torch.equal(v, editor.model.state_dict()[k]) for k, v in before.items())
        finally:
            os.chdir(cwd)
    print("\nfinal table")
    print(header)
    for row in [start, *rows]:
        print(_row(row))
    return _verdict(start, rows, restored, args.rss_tolerance_mib)


def _row(r: dict) -> str:
    return f"{r['edit']:>5} {r['rss']:>8.1f} {r['fds']:>4} {r['handlers']:>8} {r['tensors']:>7} {r['secs']:>7.2f}"


def _verdict(start: dict, rows: list, restored: bool, rss_tolerance: float) -> int:
    """Compared from the first row (the first block warms caches up) to the last."""
    first, last = rows[0], rows[-1]
    grew = []
    for key, name in (("fds", "open fds"), ("handlers", "logging handlers"), ("tensors", "live tensors")):
        if last[key] > first[key]:
            grew.append(f"{name} {first[key]} -> {last[key]}")
    rss_change = last["rss"] - first["rss"]
    if rss_change > rss_tolerance:
        grew.append(f"RSS +{rss_change:.1f} MiB (tolerance {rss_tolerance:.0f})")
    slope = _slope([r["edit"] for r in rows], [r["rss"] for r in rows]) * 100
    secs = [r["secs"] for r in rows]
    print(f"\nRSS: {start['rss']:.1f} MiB before the first edit, {first['rss']:.1f} after edit {first['edit']}, "
          f"{last['rss']:.1f} after edit {last['edit']} (fitted slope {slope:+.2f} MiB per 100 edits)")
    print(f"s/edit per block: first {secs[0]:.2f}, last {secs[-1]:.2f}, min {min(secs):.2f}, max {max(secs):.2f} "
          "(wall clock: other load on the machine shows up here)")
    print(f"weights after all edits {'bit-identical' if restored else 'CHANGED'} to before the first")
    if grew or not restored:
        print("VERDICT: GREW - " + "; ".join(grew + ([] if restored else ["weights not restored"])))
        return 1
    print("VERDICT: nothing grew (fds, handlers and live tensors constant; RSS within tolerance)")
    return 0


def _slope(xs, ys) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.mean(xs), statistics.mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


if __name__ == "__main__":
    sys.exit(main())
