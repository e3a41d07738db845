"""What a new user runs first: the README's quick start as written, the package installed without
the repository (``pip install --target``) running the demo from another folder, the shipped YAMLs'
``minimmedit:train`` pool (the train split only), and the error for a pool that is not there."""
import ast
import json
import os
import re
import subprocess
import sys

import pytest

from easyedit_odedit import shipped
from easyedit_odedit.benchmark import world
from easyedit_odedit.environments import EnvironmentBuilder
from easyedit_odedit.errors import ODEditError, ODEditFileNotFoundError
from easyedit_odedit.odedit.odedit_hparams import EnvironmentSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pool_cache(tmp_path_factory):
    """A cache folder with the ``minimmedit:train`` pool built in it, as on a user's first edit."""
    cache = str(tmp_path_factory.mktemp("odedit-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(shipped.CACHE_ENV, cache)
        shipped.minimmedit_pool()
    return cache


def _env(PYTHONPATH: str, **extra):
    """This environment with ``PYTHONPATH`` first on the import path, followed by the paths this run
    already had except this checkout (EasyEdit's GitHub main is used from a folder on the path)."""
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.abspath(p) != os.path.abspath(ROOT)]
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([PYTHONPATH, *kept]), **extra)


def _first_python_block(markdown: str) -> str:
    match = re.search(r"```python\n(.*?)```", markdown, re.S)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_readme_quick_start_runs_as_written_and_prints_post_metrics(pool_cache, tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        script = tmp_path / "quick_start.py"
        script.write_text(_first_python_block(f.read()))
    # saved in the repository root and run there, the script would import this checkout: PYTHONPATH says so
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_env(ODEDIT_CACHE=pool_cache, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    post = [line for line in done.stdout.splitlines() if line.startswith("post")]
    assert post, done.stdout[-2000:]
    metrics = ast.literal_eval(post[-1][len("post"):].strip())
    assert metrics["rewrite_acc"] == 1.0 and {"locality_acc", "multimodal_locality_acc"} <= set(metrics)


def test_installed_package_runs_the_demo_from_another_folder(tmp_path):
    """``pip install --target`` (no editable link to this checkout), then the demo's own config,
    read from the installed package data, on fewer records (4 train / 3 test, 50 pool images,
    FT-L alone and with ODEdit, 3 single edits and one sequence of 2; no curve, no IKE)."""
    pytest.importorskip("setuptools")  # the wheel is built with this environment's setuptools (no download)
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), ROOT], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    demo = ("import easyedit_odedit, json; from easyedit_odedit import cli\n"
            "config = cli._demo_config('FT-L')\n"
            "config['records'].update(n_train=4, n_test=3, pool_images=50)\n"
            "config['settings'] = {'single': {'n': 3}, 'sequential': {'T': [2], 'chunks': 1}}\n"
            "config.update(curve=None, ike=None, leakage_check=1)\n"
            "cli._run(config, 'out')\n"
            "print(json.dumps({'package': easyedit_odedit.__file__}))\n")
    env = _env(PYTHONPATH=str(target))
    done = subprocess.run([sys.executable, "-c", demo], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["package"].startswith(str(target))
    results = json.loads((elsewhere / "out" / "results.json").read_text())
    assert results["config"]["source"] == str(target / "easyedit_odedit" / "hparams" / "bench" / "demo.yaml")
    assert {row["method"] for row in results["per_edit"]} == {"FT-L", "FT-L+ODEdit"}
    script = subprocess.run([sys.executable, str(target / "bin" / "odedit"), "demo", "--help"], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "--out" in script.stdout, script.stderr[-2000:]


def test_minimmedit_pool_is_the_train_split_only(pool_cache, monkeypatch):
    monkeypatch.setenv(shipped.CACHE_ENV, pool_cache)
    path, image_root = shipped.resolve_locality_pool("minimmedit:train", None)
    with open(path) as f:
        pool = json.load(f)
    train_text = {q.text for q in world.text_questions("train")}
    image_entries = [e for e in pool if "image" in e]
    assert image_entries and all(e["image"].startswith("train/") for e in image_entries)
    assert all(os.path.isfile(os.path.join(image_root, e["image"])) for e in image_entries)
    assert {e["prompt"] for e in pool if "image" not in e} == train_text
    questions = [e["prompt"][len("Question: "):-len(" Short answer:")] for e in image_entries]
    assert not any(world.is_rephrase_template(world.parse_question(q)[0].id) for q in questions)

def test_a_missing_pool_names_the_command_that_writes_it():
    settings = EnvironmentSettings(locality_pool="data/minimmedit/locality_pool.json")
    with pytest.raises(ODEditFileNotFoundError, match="environments.locality_pool") as err:
        EnvironmentBuilder(settings, None, "", seed=0)
    assert "python -m easyedit_odedit.benchmark.records --model" in str(err.value)
    assert "minimmedit:train" in str(err.value)


@pytest.mark.parametrize("pool, root, field", [("minimmedit:test", None, "environments.locality_pool"),
                                               ("minimmedit:train", "data/images", "environments.locality_image_root")])
def test_a_pool_name_other_than_the_train_split_is_refused(pool, root, field):
    with pytest.raises(ODEditError, match=field):
        shipped.resolve_locality_pool(pool, root)
