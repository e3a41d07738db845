"""``odedit``: command-line entry point.

``odedit demo --out DIR``: the quick MiniMMEdit benchmark (``hparams/bench/demo.yaml``, installed
with the package: the shipped base model, one seed, FT-L and LoRA each alone and with ODEdit,
single and T = 5 sequential editing, a small learning-rate curve), through EasyEdit's own ``MultimodalEditor`` and evaluation.
Prints the table and writes ``DIR/results.json``, ``results.md`` and ``results.png``.

``odedit bench --config hparams/bench/full.yaml --out DIR``: the same for any bench config.

``odedit report DIR``: rebuild the table, JSON and figure from ``DIR/edits.jsonl``.

``odedit edit --hparams Y.yaml --data FILE.json --out DIR``: every record of a dataset edited on its
own (or in sequences of T), EasyEdit's pre/post metrics per record in ``DIR/edits.jsonl``; under
``torchrun --nproc_per_node N -m easyedit_odedit edit ...`` each process edits a shard.

``odedit train --hparams Y.yaml --train TRAIN.json --val VAL.json``: MEND/SERAC meta-training with
EasyEdit's ``MultimodalTrainer``, alone or under torchrun (gradients averaged over the processes).

Several processes: ``odedit bench --workers N``; see docs/scaling.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HOST_YAMLS = {"FT-L": "minimmedit-ft-l.yaml", "FT-V": "minimmedit-ft-v.yaml", "LoRA": "minimmedit-lora.yaml"}


def _demo_config(host=None) -> dict:
    import yaml

    from .benchmark.config import load_config
    from .shipped import hparams_path

    path = hparams_path("bench/demo.yaml")  # package data when installed (setup.py), else the checkout's
    if not os.path.isfile(path):
        raise SystemExit(f"odedit demo: {path} not found; reinstall easyedit-odedit "
                         "or pass a config to `odedit bench --config`")
    if not host:
        return load_config(path)
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["hosts"] = {host: hparams_path(f"ODEdit/{HOST_YAMLS[host]}")}
    if raw.get("curve"):
        raw["curve"]["hosts"] = [host]
    raw["variants"] = [v for v in raw.get("variants", []) if v["host"] == host]
    raw.setdefault("not_run", {}).pop(host, None)
    config = load_config(dict(raw, not_run=raw.get("not_run", {})))
    config["source"] = path
    return config


def _run(config, out: str, workers: int = 1) -> None:
    from .benchmark.runner import run_bench

    start = time.time()
    run_bench(config, out, workers=workers)
    print(f"\nbench finished in {time.time() - start:.0f} s; results in {os.path.abspath(out)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="odedit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the quick MiniMMEdit benchmark (hparams/bench/demo.yaml)")
    demo.add_argument("--out", default="results/demo")
    demo.add_argument("--host", choices=sorted(HOST_YAMLS),
                      help="only this host (alone and with ODEdit); default: the demo config's hosts")
    bench = sub.add_parser("bench", help="a MiniMMEdit benchmark from a bench config")
    bench.add_argument("--config", required=True, help="e.g. hparams/bench/full.yaml")
    bench.add_argument("--out", required=True, help="output folder (results.json, results.md, results.png)")
    bench.add_argument("--workers", type=int, default=1,
                       help="processes the bench's independent units are spread over (default 1)")
    bench.add_argument("--seeds", type=int, nargs="+", help="only these of the config's seeds (part of a run)")
    report = sub.add_parser("report", help="rebuild results.{json,md,png} from DIR/edits.jsonl")
    report.add_argument("dir")
    _add_edit(sub)
    _add_train(sub)
    args = parser.parse_args(argv)
    if args.command in ("edit", "train"):
        _run_scaled(args)
    elif args.command == "demo":
        _run(_demo_config(args.host), args.out)
    elif args.command == "bench":
        from .benchmark.config import BenchConfigError, load_config

        try:
            config = load_config(args.config)
        except BenchConfigError as err:
            raise SystemExit(f"odedit bench: {err}") from None
        if args.workers < 1:
            raise SystemExit(f"odedit bench: --workers must be >= 1 (got {args.workers})")
        if args.seeds:
            unknown = sorted(set(args.seeds) - set(config["seeds"]))
            if unknown:
                raise SystemExit(f"odedit bench: --seeds {unknown} are not among the config's seeds {config['seeds']}")
            config["seeds"] = list(args.seeds)
        _run(config, args.out, args.workers)
    elif args.command == "report":
        from .benchmark.report import build

        build(args.dir)


def _common_options(parser, hparams_help: str) -> None:
    """What ``edit`` and ``train`` both take: the YAML, the dataset kind, the image folder."""
    parser.add_argument("--hparams", required=True, help=hparams_help)
    parser.add_argument("--kind", default="vqa", help="vqa (EasyEdit's VQADataset) or caption (CaptionDataset)")
    parser.add_argument("--image-root", help="folder the records' image paths are relative to (default: the YAML's coco_image)")


def _add_edit(sub) -> None:
    edit = sub.add_parser("edit", help="edit every record of an E-VQA/E-IC file, one at a time (torchrun: sharded)")
    _common_options(edit, "an ODEdit YAML, or EasyEdit's own hparams YAML (the host alone)")
    edit.add_argument("--data", required=True, help="the records: an E-VQA / E-IC JSON list")
    edit.add_argument("--out", required=True, help="folder for edits.jsonl, results.json, results.md (a rerun resumes)")
    edit.add_argument("--sequential", type=int, default=1, metavar="T",
                      help="edit T consecutive records on top of each other, evaluate, restore (default 1)")
    edit.add_argument("--limit", type=int, metavar="N", help="only the first N editable records")
    edit.add_argument("--template", help="prompt template for the questions (default for vqa: "
                                         "'Question: {} Short answer:'; caption: none)")
    edit.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="MEND/SERAC meta-training with EasyEdit's MultimodalTrainer (torchrun: DDP)")
    _common_options(train, "a training YAML, e.g. hparams/TRAINING/ODEdit/tiny-mend.yaml")
    train.add_argument("--train", required=True, help="training records (E-VQA / E-IC JSON)")
    train.add_argument("--val", required=True, help="validation records")
    train.add_argument("--results-dir", help="where EasyEdit writes models/<alg>/<model> (default: the YAML's results_dir)")


def _run_scaled(args) -> None:
    """``edit`` / ``train``, on this process's share when torchrun started it."""
    from .errors import ODEditError
    from .scale import distributed

    workers = distributed.from_environment(gradients=args.command == "train")
    try:
        if args.command == "edit":
            from .scale.edit_runner import EditOptions, ShardFailed, run

            options = EditOptions(args.hparams, args.data, args.out, args.kind, args.sequential, args.limit,
                                  args.image_root, args.template)
            try:
                summary = run(options, workers, progress=not args.quiet)
            except ShardFailed as err:
                raise SystemExit(str(err)) from None
            if summary is not None:
                print(f"{summary['n_edited']} of {summary['n_editable']} records edited; "
                      f"results in {os.path.abspath(args.out)}")
        else:
            from .scale.training import TrainOptions, train

            archive = train(TrainOptions(args.hparams, args.train, args.val, args.kind, args.image_root,
                                         args.results_dir), workers)
            if archive:
                print(f"archive: {archive}")
    except ODEditError as err:
        raise SystemExit(f"odedit {args.command}: {err}") from None
    finally:
        distributed.finish(workers)


if __name__ == "__main__":
    main(sys.argv[1:])
