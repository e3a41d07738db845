"""What the pool index costs to build, to keep and to load, for the MiniMMEdit pool.

    python benchmarks/index_build.py [--shape medium] [--device cpu] [--pool-index DIR] [--json]

Builds the index the content preset uses (``easyedit_odedit/pool_index.py``: every pool image's
features and the answers to each fixed probe) into a folder (``environments.pool_index``: by default
a temporary one; ``--pool-index DIR`` keeps it for ``overhead.py --pool-index DIR``),
then loads it as a new process would (in-memory indexes cleared). Prints the seconds of each part -
the weights' SHA-256 (the store's key), processing the pool's images (cached for the edits anyway),
the features, each probe's answers - the files' size, the load, and per-image figures to scale by.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import LLAVA_SHAPES, SHIPPED, host_config, llava_shaped, minimmedit_world, world_hparams  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def build_and_load(adapter, hp, n_tokens: int) -> dict:
    """Builds the index of ``hp``'s pool on ``adapter`` into its store, then loads it back."""
    from easyedit_odedit import pool_index, pool_index_store
    from easyedit_odedit.environments import EnvironmentBuilder
    from easyedit_odedit.odedit.rows import image_processor, pool_index_for, unedited_answers

    env = hp.environments
    builder = EnvironmentBuilder(env, image_processor(hp), hp.coco_image, 0, view_size=adapter.image_size)
    index, opened = timed(lambda: pool_index_for(adapter, builder, env, unedited=True))
    paths = index.paths
    _, images = timed(lambda: [builder.load_image(p) for p in paths])
    _, features = timed(lambda: index.features(paths))

    def ask(rows, n):
        return unedited_answers(adapter, rows, n)

    answers = {probe: timed(lambda: index.answers(probe, paths, n_tokens, ask))[1] for probe in env.probes}
    folder = index.store.folder
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    pool_index._INDEXES.clear()  # as a new process: nothing in memory, the processed images cached

    def load():
        loaded = pool_index_for(adapter, builder, env, unedited=True)
        loaded.features(paths)
        for probe in env.probes:
            loaded.answers(probe, paths, n_tokens, ask)

    _, load_s = timed(load)
    digests = [timed(lambda: pool_index_store.weights_digest(adapter))[1] for _ in range(3)]
    weight_bytes = sum(t.numel() * t.element_size() for t in list(adapter.parameters()) + list(adapter.buffers()))
    build = opened + features + sum(answers.values())
    return {"images": len(paths), "probes": len(env.probes), "n_tokens": n_tokens,
            "weights_bytes": weight_bytes, "digest_s": statistics.median(digests),
            "digest_gb_s": weight_bytes / statistics.median(digests) / 1e9,
            "key_s": opened, "process_images_s": images, "features_s": features, "answers_s": answers,
            "build_s": build, "build_ms_per_image": 1e3 * build / len(paths),
            "bytes": size, "bytes_per_image": size / len(paths), "load_s": load_s}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="", choices=["", "medium"], help="a random-weight LLaVA shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pool-index", default="", help="the folder to build it in (default: a temporary one; an index already there is loaded, not built)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from easyedit_odedit.models.loading import load_adapter

    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp()
    data, _, edits = minimmedit_world(root, 1)
    hp = world_hparams(host_config("FT-L", llava=bool(args.shape)), data, SHIPPED, 20, preset="content",
                       environments={"pool_index": args.pool_index or os.path.join(root, "index")})
    adapter = (llava_shaped(**LLAVA_SHAPES[args.shape], device=args.device) if args.shape
               else load_adapter(SHIPPED).to(args.device))
    n_tokens = len(adapter.tokenizer(edits[0]["target"])["input_ids"])  # an edit's answer length
    figures = {"model": args.shape or "shipped", "device": args.device,
               "params": sum(p.numel() for p in adapter.parameters()), **build_and_load(adapter, hp, n_tokens)}
    if args.json:
        print(json.dumps(figures))
        return
    answers = ", ".join(f"{s:.1f}" for s in figures["answers_s"].values())
    print(f"{figures['model']} model ({figures['params']:,} parameters), {figures['images']} pool images, "
          f"{figures['probes']} probes at {n_tokens} token(s), device {args.device}\n"
          f"weights SHA-256: {figures['digest_s']:.2f} s ({figures['digest_gb_s']:.2f} GB/s)\n"
          f"processing the images: {figures['process_images_s']:.1f} s (cached for the edits anyway)\n"
          f"build: {figures['build_s']:.1f} s ({figures['build_ms_per_image']:.1f} ms an image): key "
          f"{figures['key_s']:.2f} s, features {figures['features_s']:.1f} s, answers {answers} s\n"
          f"on disk: {figures['bytes'] / 2 ** 20:.2f} MiB ({figures['bytes_per_image']:.0f} bytes an image); "
          f"loaded in {figures['load_s']:.2f} s")


if __name__ == "__main__":
    main()
