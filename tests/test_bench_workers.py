"""``odedit bench --workers 2``: the same rows as one process (times and memory aside), on a tiny
config with FT-L (single, sequential, learning-rate curve) and MEND meta-trained per seed."""
import json
import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURED = ("edit_s", "peak_rss_mib", "rss_delta_mib")
CONFIG = {"name": "tiny", "seeds": [3], "records": {"n_train": 6, "n_test": 2, "pool_images": 40},
          "settings": {"single": {"n": 2}, "sequential": {"T": [2], "chunks": 1}},
          "hosts": {"FT-L": os.path.join(ROOT, "hparams/ODEdit/minimmedit-ft-l.yaml")},
          "overrides": {"host_hparams": {"num_steps": 3, "lr": 3.0e-3}},
          "curve": {"hosts": ["FT-L"], "lrs": [1.0e-4, 3.0e-3], "n": 1},
          "mend": {"yaml": os.path.join(ROOT, "hparams/bench/minimmedit-mend-host.yaml"), "settings": ["single"],
                   "train": {"max_iters": 6, "val_interval": 3, "val_steps": 1, "batch_size": 2, "val_batch_size": 2},
                   "val_records": 2},
          "not_run": {"IKE": "not in this test"}}


def rows(out):
    with open(os.path.join(out, "edits.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in MEASURED} for line in f]


def test_jobs_sharing_a_meta_training_stay_together_and_every_job_is_dealt_once():
    from easyedit_odedit.benchmark import parallel
    from easyedit_odedit.benchmark.config import load_config
    from easyedit_odedit.benchmark.methods import MetaTrainedMethod
    from easyedit_odedit.benchmark.runner import plan

    config = load_config(dict(CONFIG, seeds=[3, 4]))
    jobs = plan(config)
    shares = parallel.deal(config, jobs, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(jobs)))
    for seed in (3, 4):
        mend = {i for i, job in enumerate(jobs) if job[0] == seed and isinstance(job[1], MetaTrainedMethod)}
        assert len(mend) == 2 and sum(bool(mend & set(share)) for share in shares) == 1
    assert shares == parallel.deal(config, plan(config), 3)  # deterministic


def test_two_workers_give_the_one_process_rows(tmp_path):
    from easyedit_odedit.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    for workers in (1, 2):
        main(["bench", "--config", str(config), "--out", str(tmp_path / f"w{workers}"), "--workers", str(workers)])
    one, two = rows(tmp_path / "w1"), rows(tmp_path / "w2")
    assert len(one) == 2 * 2 + 2 * 2 + 2 * 2 * 1 + 2 * 2  # single, seq2, curve, MEND single
    assert two == one
    results = {w: json.loads((tmp_path / f"w{w}" / "results.json").read_text()) for w in (1, 2)}
    assert results[2]["summary"] == results[1]["summary"] and results[2]["paired"] == results[1]["paired"]
    assert results[2]["leakage"] == results[1]["leakage"]
    run = json.loads((tmp_path / "w2" / "run.json").read_text())
    assert run["workers"] == 2 and sorted(i for s in run["shares"] for i in s) == list(range(run["jobs"]))
    assert not (tmp_path / "w2" / ".workers").exists()
