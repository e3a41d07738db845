"""The prepared GPU check runs as one command when a GPU session comes; on a CPU it runs the same
code with small stand-ins. Run it here so it cannot rot between GPU sessions."""
import json
import math
import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_every_host_on_the_cpu_stand_in():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # the paper preset: the host's fixed steps (content's edits run until their rows hold)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--big", "--steps", "1",
                          "--preset", "paper", "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    # EasyEdit's editor on the small model: bit-identical restore after one edit and after five
    assert "whole state dict bit-identical after restore: True" in text
    assert "restored bit-identically in one call: True" in text
    for name in ("FT-L", "FT-L top-2", "LoRA", "FT-V"):
        assert f"[big {name}]" in text, name
    # every comparison timed each run and printed finite ratios (time twice, memory, own terms)
    for run in ("host", "host, whole model each step", "batched NLL", "host+ODEdit"):
        assert sum(line.startswith(f"| {run} | ") for line in text.splitlines()) == 5, run
    ratios = [line for line in text.splitlines() if line.startswith("ratios: time x")]
    assert len(ratios) == 5  # the small model + four big hosts
    for line in ratios:
        ratios_printed = [float(x) for x in re.findall(r"x(\d+\.\d+)", line)]
        # time, time against the whole-model host, own terms; memory too on a GPU (nan on a CPU)
        assert len(ratios_printed) == (4 if torch.cuda.is_available() else 3), line
        assert all(r > 0 for r in ratios_printed), line
    figures = json.loads(text.strip().splitlines()[-1])["comparisons"]  # --json: the same figures, one line
    assert set(figures) == {"small", "big FT-L", "big FT-L top-2", "big LoRA", "big FT-V"}
    assert all(f["x_time"] > 0 and 0 < f["setup_share"] < 1 for f in figures.values())


def test_overhead_runs_every_mode_and_prints_the_figures_as_json():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "overhead.py"), "--edits", "1", "--steps", "2",
                          "--preset", "paper", "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(figures["modes"]) == {"host", "batched_nll", "odedit", "odedit_nocache"}
    for key in ("x_time", "x_memory", "own_terms_step", "own_terms_edit", "setup_share"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["steps"] == 2 and figures["modes"]["host"]["steps"] == 2  # fixed steps: the host's


def test_overhead_edits_build_the_rows_they_build_in_the_bench(tmp_path):
    """The timed edits draw near misses, far images and text rows from MiniMMEdit's train pool
    (a pool of look-alike images once gave no image OUT rows at all, and cheaper edits)."""
    import argparse
    import collections

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import overhead

    from easyedit_odedit.models.loading import load_adapter
    from easyedit_odedit.odedit import odedit_main

    data, records, edits = overhead.minimmedit_world(str(tmp_path), 2)
    assert [e["prompt"] for e in edits] == [f"Question: {r['src']} Short answer:" for r in records]
    hp = overhead.mode_hparams("odedit", argparse.Namespace(shape="", host="FT-L", model="", steps=2), data)
    adapter = load_adapter(overhead.SHIPPED)
    view = overhead.edit_views(edits, "cpu")[0]
    with adapter.reusing_image_encodings():
        rows = odedit_main.build_rows(adapter, view, hp, seed=0)
    counts = collections.Counter(r.env for r in rows)
    env = hp.environments
    assert hp.preset == "content"  # the shipped YAML names probes: the default formulation describes the pool
    assert counts["OUT_near"] == env.pool_factor * env.near_miss_rows and counts["OUT_far"] > 0
    assert counts["SE_content"] > 0 and counts["OUT_protect"] > 0
    assert counts["OUT_text"] == env.pool_factor * env.out_text
