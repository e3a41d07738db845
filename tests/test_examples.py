"""The example scripts run as they are (tiny random model or the shipped MiniMMEdit model)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *argv):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))


def test_edit_one(tmp_path):
    result = run_example("edit_one", "--work", str(tmp_path))
    assert result["post"]["rewrite_acc"] == 1.0 and "rewrite_acc" in result["pre"]
    assert result["restored"]


def test_edit_dataset(tmp_path):
    summary = run_example("edit_dataset", "--work", str(tmp_path))
    assert len(summary) == 3 and all(set(row["post"]) >= {"rewrite_acc", "locality_acc"} for row in summary)
    assert (tmp_path / "edit_dataset_metrics.json").is_file()


def test_sequential_edit(tmp_path):
    rows = run_example("sequential_edit", "--work", str(tmp_path), "-T", "3")
    assert [row["edit"] for row in rows] == [0, 1, 2]  # raises SystemExit itself unless restored bit for bit


def test_train_mend(tmp_path):
    result = run_example("train_mend", "--iters", "8", "--work", str(tmp_path))
    assert result["changed"] == ["language_model.model.layers.2.mlp.down_proj.weight"] and result["restored"]
    assert "odedit/tv" in result["odedit_logs"]


def test_train_serac(tmp_path):
    result = run_example("train_serac", "--iters", "8", "--work", str(tmp_path))
    assert len(result["memory"]) == 1 and result["unchanged"]
    assert "odedit/gen_mmd" in result["odedit_logs"]
