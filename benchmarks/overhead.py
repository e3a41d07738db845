"""Per-edit cost of ODEdit against its host, at equal optimisation steps and default settings.

    python benchmarks/overhead.py [--model DIR | --shape medium] [--host FT-L] [--steps 20] [--edits 5] [--device cpu]
                                  [--preset paper|content] [--pool-index DIR|auto] [--modes ...] [--json]

``--shape medium``: instead of the shipped 1 M-parameter model, a random-weight LLaVA (transformers'
``LlavaForConditionalGeneration``: CLIP + Llama, a 32k vocabulary) of ~50 M parameters, small
enough for a CPU: what the ratios become once arithmetic, not per-operation overhead, dominates.

The edits are MiniMMEdit test records (their edit fields) against the benchmark's train-split
locality pool, as ``odedit bench`` writes them; the shipped model runs ``hparams/ODEdit/minimmedit-*.yaml``.

Modes, each in its own process (so peak memory is its own):
  host          the host alone: the edit prompt, NLL, ``steps`` steps
  batched_nll   a plain step over the same environment rows ODEdit uses (mean NLL of every row):
                what "batching the environments" costs by itself
  odedit        host + ODEdit (environments, KL, MMD, TV penalty, lambda), prefix cache on
  odedit_nocache  the same without caching the activations below the edited layers
Prints a table (median seconds per edit, the set-up share, milliseconds per step, peak memory) and
the ratios the method issue sets targets for: odedit/host time and memory, odedit/batched_nll time
per step and per whole edit.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, NamedTuple

MODES = ("host", "batched_nll", "odedit", "odedit_nocache")


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "easyedit_odedit", "assets", "minimmedit-base")
HPARAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "hparams", "ODEdit")
YAMLS = {"FT-L": "minimmedit-ft-l.yaml", "FT-V": "minimmedit-ft-v.yaml", "LoRA": "minimmedit-lora.yaml"}


def minimmedit_world(root: str, n_edits: int) -> tuple:
    """MiniMMEdit as ``odedit bench`` writes it: ``n_edits`` test records and the train-split
    locality pool (2,000 images and the text questions), so an edit builds the near-miss, far and
    text rows it builds in the bench. (data paths, the records, their edits: prompt, target, image
    path - the edit fields only)."""
    from easyedit_odedit.benchmark import records
    from easyedit_odedit.benchmark.evaluation import edit_arguments

    data = records.write_benchmark(SHIPPED, root, n_train=0, n_test=n_edits, seed=0)
    with open(data["test"]) as f:
        test = json.load(f)
    args = edit_arguments(test, data["image_root"])
    edits = [{"prompt": p, "target": t, "image": i} for p, t, i in zip(args["prompts"], args["targets"], args["image"])]
    return data, test, edits


def edit_views(edits, device, dtype=None) -> list:
    """The edits with their images processed as EasyEdit processes request images."""
    from easyedit_odedit import compat
    from easyedit_odedit.odedit.rows import image_processor

    processor = image_processor(None)
    return [dict(e, image=compat.process_image_file(processor, e["image"]).to(device=device, dtype=dtype))
            for e in edits]


def host_config(host: str, llava: bool = False) -> dict:
    """The ODEdit config a run starts from: the shipped model's ``hparams/ODEdit/minimmedit-*.yaml``
    (default settings), or with ``llava`` the host of the real-model YAMLs (``LLAVA_HOSTS``) with
    the shipped YAMLs' probes (``preset: content`` needs them; the random shapes read the same
    MiniMMEdit world through a word tokenizer)."""
    import yaml

    if llava:
        probes = host_config("FT-L")["environments"]["probes"]
        return {"alg_name": "ODEdit", "host": host.split()[0], "host_hparams": LLAVA_HOSTS[host],
                "environments": {"probes": probes}}
    with open(os.path.join(HPARAMS, YAMLS[host])) as f:
        return yaml.safe_load(f)


def world_hparams(config: dict, data: dict, model_dir: str, steps: int, enabled: bool = True, **settings):
    """``config`` pointed at the world as the bench points it, with ``steps`` host steps and
    ``settings`` merged in section by section (the bench's own merge)."""
    from easyedit_odedit import ODEditHyperParams
    from easyedit_odedit.benchmark.config import _merge
    from easyedit_odedit.benchmark.methods import _point_at_world

    config = _merge(config, {"host_hparams": {"num_steps": steps}, **settings})
    _point_at_world(config, data, model_dir, seed=0, enabled=enabled)
    return ODEditHyperParams.from_dict(config)


def mode_hparams(mode: str, args, data: dict):
    preset = {"preset": args.preset} if getattr(args, "preset", "") else {}
    index = {"environments": {"pool_index": args.pool_index}} if getattr(args, "pool_index", "") else {}
    return world_hparams(host_config(args.host, llava=bool(args.shape)), data, args.model or SHIPPED, args.steps,
                         enabled=mode != "host", optimiser={"cache_prefix": mode != "odedit_nocache"}, **preset,
                         **index)


# random-weight LLaVA shapes: CLIP vision tower + projector + Llama, 32k vocabulary
LLAVA_SHAPES = {
    "medium": dict(vision_hidden=256, vision_layers=2, image_size=112, patch_size=14,
                   hidden=512, intermediate=1376, layers=4, heads=8),
    "7b": dict(vision_hidden=1024, vision_layers=24, image_size=336, patch_size=14,
               hidden=4096, intermediate=11008, layers=32, heads=32),
}
# the hosts of the YAMLs for real models (hparams/ODEdit/llava15-*.yaml), at their default sizes
LLAVA_HOSTS = {
    "FT-L": {"layers": [-1], "modules": ["mlp"], "lr": 1e-4},  # top MLP only: LastModuleCache
    "FT-L top-2": {"layers": [-2, -1], "modules": ["mlp.up_proj", "mlp.down_proj"], "lr": 1e-4},  # layer cache
    "LoRA": {"layers": [-2, -1], "target_modules": ["up_proj", "down_proj"], "rank": 8, "lr": 1e-3},
    "FT-V": {"modules": ["multi_modal_projector"], "lr": 1e-4},  # every row re-embedded each step
}


def llava_shaped(vision_hidden: int, vision_layers: int, image_size: int, patch_size: int, hidden: int,
                 intermediate: int, layers: int, heads: int, dtype=None, device="cpu", seed: int = 0):
    """A random-weight LLaVA of the given shape behind the plugin's adapter (word tokenizer)."""
    import torch
    import transformers

    from easyedit_odedit.models.adapter import MultimodalLMAdapter
    from easyedit_odedit.models.encoders import LlavaImageEncoder
    from easyedit_odedit.models.tiny import tiny_tokenizer

    vision = transformers.CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                                           num_hidden_layers=vision_layers, num_attention_heads=max(vision_hidden // 64, 1),
                                           image_size=image_size, patch_size=patch_size, projection_dim=768)
    text = transformers.LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=intermediate,
                                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                                      vision_feature_layer=-2 if vision_layers > 1 else -1)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlavaForConditionalGeneration._from_config(config, dtype=dtype or torch.float32)
    model.eval()
    return MultimodalLMAdapter(LlavaImageEncoder(model), model, tiny_tokenizer(), image_size, {"architecture": "hf-llava"})


@contextlib.contextmanager
def batched_nll_steps():
    """Inside: ODEdit's edit loop takes plain steps over the same environment rows (the mean NLL of
    every row, one forward and backward): the baseline ODEdit's own terms (KL, MMD, TV, lambda) are
    measured against."""
    import torch

    from easyedit_odedit import risks
    from easyedit_odedit.odedit import odedit_main
    from easyedit_odedit.odedit.objective import ODEditObjective

    class BatchedNLL(ODEditObjective):
        def update(self, idx):
            labels, hidden = self.forward(idx)
            at = risks.answer_positions(labels)  # as ODEdit's step, the LM head where a label is read
            logits = self.adapter.lm_head()(hidden[at])
            loss = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][at[:, :-1]])
            self._descend(loss)
            self.step += 1
            return {"objective": loss.item()}

    original = odedit_main.ODEditObjective
    odedit_main.ODEditObjective = BatchedNLL
    try:
        yield
    finally:
        odedit_main.ODEditObjective = original


@contextlib.contextmanager
def contents_judged_distinct():
    """Inside: the near-miss search's probes run, but every candidate counts as showing other
    content. For random-weight shapes only: such a model answers alike on every image, so every
    candidate would count as the edit's own content and be dropped - no image OUT rows, 15 rows an
    edit instead of the trained model's 23, and the rows' cost understated."""
    from easyedit_odedit.environments import EnvironmentBuilder

    original = EnvironmentBuilder.__dict__["same_content"]

    def distinct(view, candidates, answers):
        return [(False, answer) for _, answer in original.__func__(view, candidates, answers)]

    EnvironmentBuilder.same_content = staticmethod(distinct)
    try:
        yield
    finally:
        EnvironmentBuilder.same_content = original


def run_mode(mode: str, args) -> dict:
    """One process, one mode: ``edits`` edits, each timed; peak memory at the end."""
    import resource

    import torch

    import easyedit_odedit  # noqa: F401
    from easyedit_odedit.models.loading import load_adapter

    torch.set_num_threads(args.threads)
    data, _, edits = minimmedit_world(tempfile.mkdtemp(), args.edits + 1)
    hp = mode_hparams(mode, args, data)
    adapter = (llava_shaped(**LLAVA_SHAPES[args.shape], device=args.device) if args.shape
               else load_adapter(args.model or SHIPPED).to(args.device))
    views = edit_views(edits, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with (batched_nll_steps() if mode == "batched_nll" else contextlib.nullcontext(),
          contents_judged_distinct() if args.shape else contextlib.nullcontext()):
        timed = time_edits(adapter, hp, views)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    times, setup, steps = timed.times, timed.setup, timed.steps
    return {"mode": mode, "seconds": statistics.median(times), "setup": statistics.median(setup) if setup else 0.0,
            "step": statistics.median((t - s) / max(n, 1) for t, s, n in zip(times, setup, steps)),
            "steps": statistics.mean(steps), "each_steps": steps, "first_edit": timed.first, "rows": timed.rows,
            "peak_mb": peak, "params": sum(p.numel() for p in adapter.parameters())}


class TimedEdits(NamedTuple):
    times: List[float]   # seconds of each timed edit
    setup: List[float]   # of which set-up (``_timed_setup``)
    steps: List[int]     # steps each took
    first: float         # seconds of the warm-up edit (a pool index is built or loaded there)
    rows: Dict[str, int]  # the last edit's rows by environment


def time_edits(adapter, hp, views) -> TimedEdits:
    """Seconds and set-up seconds of each edit of ``views`` after the first (a warm-up, timed on
    its own, that builds or loads a pool index). Each edit is restored, also after an error such as
    running out of GPU memory, so the next starts from the same weights. The timed edits run after
    the index is built (``process_pool_images``)."""
    from easyedit_odedit.hosts import build_host
    from easyedit_odedit.odedit import odedit_main
    from easyedit_odedit.odedit.restore import RestorePoint

    times, setup, steps, first, rows = [], [], [], 0.0, {}
    for i, view in enumerate(views):
        originals = {}
        start = time.perf_counter()
        timed = _timed_setup(setup, record=i > 0)
        try:
            logs = odedit_main.edit_once(adapter, view, hp, build_host(hp), originals)
            _synchronize()
            elapsed = time.perf_counter() - start
        finally:
            timed.restore()
            RestorePoint(adapter, originals)()
        rows = timed.rows
        if i == 0:
            first = elapsed
            process_pool_images(adapter, hp)
        else:
            times.append(elapsed)
            steps.append(int(logs.get("steps", hp.host_params.num_steps)))
    return TimedEdits(times, setup, steps, first, rows)


def process_pool_images(adapter, hp) -> None:
    """With a pool index (``preset: content``): every pool image processed, as building the index
    in memory leaves them (an index loaded from disk leaves the edits to process the images they
    draw, each once: 2-4 ms an image on a CPU, a cost that fades as a run goes on)."""
    from easyedit_odedit.environments import EnvironmentBuilder, content_aware
    from easyedit_odedit.odedit.rows import image_processor

    if not (hp.enabled and content_aware(hp.environments)):
        return
    builder = EnvironmentBuilder(hp.environments, image_processor(hp), hp.coco_image, 0, view_size=adapter.image_size)
    for entry in builder.pool:
        if entry.image_path is not None:
            builder.load_image(entry.image_path)


class _timed_setup:
    """Times ``build_rows`` + ``EditRows`` (environment construction, once per edit)."""

    def __init__(self, sink, record):
        from easyedit_odedit.odedit import odedit_main

        self.module, self.sink, self.record = odedit_main, sink, record
        self.originals = (odedit_main.build_rows, odedit_main.EditRows)
        self.total = 0.0

        def timed(fn):
            def wrapper(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    _synchronize()  # on a GPU the set-up's kernels may still be running
                    self.total += time.perf_counter() - t
            return wrapper

        def counted(fn):
            def wrapper(*a, **k):
                made = fn(*a, **k)
                self.rows = dict(collections.Counter(made.envs))
                return made
            return wrapper

        self.rows = {}
        odedit_main.build_rows, odedit_main.EditRows = timed(self.originals[0]), counted(timed(self.originals[1]))

    def restore(self):
        self.module.build_rows, self.module.EditRows = self.originals
        if self.record:
            self.sink.append(self.total)


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="")
    parser.add_argument("--shape", default="", choices=["", "medium"], help="a random-weight LLaVA shape")
    parser.add_argument("--host", default="FT-L", choices=["FT-L", "FT-V", "LoRA"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--modes", default=",".join(MODES), help="the modes to run, comma-separated (host, batched_nll "
                        "and odedit give the ratios; odedit_nocache is the slowest)")
    parser.add_argument("--preset", default="", choices=["", "paper", "content"], help="ODEdit's preset (default: the YAML's)")
    parser.add_argument("--pool-index", default="", help="environments.pool_index (default: the YAML's, memory): "
                        "a folder or auto, so that the modes' processes build the content preset's index once")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the figures below) instead of tables")
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return
    results = {}
    from tqdm import tqdm

    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not {"host", "batched_nll", "odedit"} <= set(modes):
        parser.error(f"--modes: {', '.join(unknown) or args.modes}: use host,batched_nll,odedit[,odedit_nocache]")
    for mode in tqdm(modes, desc="modes"):
        cmd = [sys.executable, __file__, "--mode", mode, "--host", args.host, "--steps", str(args.steps),
               "--edits", str(args.edits), "--threads", str(args.threads), "--device", args.device]
        if args.model:
            cmd += ["--model", args.model]
        if args.shape:
            cmd += ["--shape", args.shape]
        if args.preset:
            cmd += ["--preset", args.preset]
        if args.pool_index:
            cmd += ["--pool-index", args.pool_index]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    summary = ratios(results)
    if args.json:
        print(json.dumps({"model": args.shape or "shipped", "host": args.host, "preset": args.preset or "yaml",
                          "host_steps": args.steps, "edits": args.edits, "device": args.device, **summary,
                          "modes": results}))
        return
    settings = LLAVA_HOSTS[args.host] if args.shape else f"hparams/ODEdit/{YAMLS[args.host]}"
    print(f"\n{args.shape or 'shipped'} model, host {args.host} ({settings}), {args.steps} steps, "
          f"{results['host']['params']:,} parameters, device {args.device}, {args.threads} thread(s), "
          f"median of {args.edits} MiniMMEdit edits\n")
    print("| mode | s / edit | of which set-up | steps | ms / step (the rest / steps) | x host time | peak MB | x host memory |")
    print("|---|---|---|---|---|---|---|---|")
    host = results["host"]
    for mode, r in results.items():
        print(f"| {mode} | {r['seconds']:.3f} | {r['setup']:.3f} | {r['steps']:.1f} | {r['step'] * 1e3:.2f} | "
              f"{r['seconds'] / host['seconds']:.2f} | {r['peak_mb']:.0f} | {r['peak_mb'] / host['peak_mb']:.2f} |")
    print(f"\nODEdit's own terms (KL, MMD, TV, lambda) vs a plain batched step over the same rows: "
          f"x{summary['own_terms_edit']:.2f} a whole edit, x{summary['own_terms_step']:.2f} a step; "
          f"set-up {summary['setup_share']:.0%} of an ODEdit edit; {sum(summary['rows'].values())} rows an edit "
          f"({summary['rows']}); the warm-up edit (builds or loads a pool index) {summary['first_edit']:.2f} s")


def ratios(results: dict) -> dict:
    """The figures the cost targets are stated in: ODEdit against the host (time, memory), its own
    terms against a plain batched step over the same rows, and the set-up's share of its edit."""
    host, odedit, plain = results["host"], results["odedit"], results["batched_nll"]
    return {"x_time": odedit["seconds"] / host["seconds"], "x_memory": odedit["peak_mb"] / host["peak_mb"],
            "own_terms_step": odedit["step"] / plain["step"], "own_terms_edit": odedit["seconds"] / plain["seconds"],
            "setup_share": odedit["setup"] / odedit["seconds"], "steps": odedit["steps"],
            "each_steps": odedit["each_steps"], "rows": odedit["rows"], "first_edit": odedit["first_edit"]}


if __name__ == "__main__":
    main()
