"""The prepared GPU check runs as one command when a GPU session comes; on a CPU it runs the same
code with small stand-ins. Run it here so it cannot rot between GPU sessions."""
import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_runs_every_host_on_the_cpu_stand_in():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--big", "--steps", "1"],
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
