"""``odedit``: command-line entry point.

``odedit demo --out DIR``: the quick MiniMMEdit benchmark (``hparams/bench/demo.yaml``: the shipped
base model, one seed, FT-L and LoRA each alone and with ODEdit, single and T = 5 sequential
editing, a small learning-rate curve), through EasyEdit's own ``MultimodalEditor`` and evaluation.
Prints the table and writes ``DIR/results.json``, ``results.md`` and ``results.png``.

``odedit bench --config hparams/bench/full.yaml --out DIR``: the same for any bench config.

``odedit report DIR``: rebuild the table, JSON and figure from ``DIR/edits.jsonl``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
BENCH_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "hparams", "bench")
HOST_YAMLS = {"FT-L": "minimmedit-ft-l.yaml", "FT-V": "minimmedit-ft-v.yaml", "LoRA": "minimmedit-lora.yaml"}


def _demo_config(host=None) -> dict:
    import yaml

    from .benchmark.config import load_config

    path = os.path.join(BENCH_DIR, "demo.yaml")
    if not os.path.isfile(path):
        raise SystemExit(f"odedit demo: {path} not found; run from a checkout of easyedit-odedit "
                         "(pip install -e .) or pass a config to `odedit bench --config`")
    if not host:
        return load_config(path)
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw["hosts"] = {host: os.path.join(os.path.dirname(BENCH_DIR), "ODEdit", HOST_YAMLS[host])}
    if raw.get("curve"):
        raw["curve"]["hosts"] = [host]
    raw["variants"] = [v for v in raw.get("variants", []) if v["host"] == host]
    raw.setdefault("not_run", {}).pop(host, None)
    config = load_config(dict(raw, not_run=raw.get("not_run", {})))
    config["source"] = path
    return config


def _run(config, out: str) -> None:
    from .benchmark.runner import run_bench

    start = time.time()
    run_bench(config, out)
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
    report = sub.add_parser("report", help="rebuild results.{json,md,png} from DIR/edits.jsonl")
    report.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "demo":
        _run(_demo_config(args.host), args.out)
    elif args.command == "bench":
        from .benchmark.config import BenchConfigError, load_config

        try:
            config = load_config(args.config)
        except BenchConfigError as err:
            raise SystemExit(f"odedit bench: {err}") from None
        _run(config, args.out)
    elif args.command == "report":
        from .benchmark.report import build

        build(args.dir)


if __name__ == "__main__":
    main(sys.argv[1:])
