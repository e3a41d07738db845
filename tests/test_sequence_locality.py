"""Fair sequence locality: an item another edit of the chunk changes (its image's shape and colour
and its question family are that edit's scope) is left out of Near/Far/Other-Q; nothing changes in
single editing. Hand-made records on real easy-vqa images, the bench's own records, and a small
bench end to end through ``odedit bench`` and ``odedit report``."""
import json
import os
import shutil

import pytest
import yaml

from easyedit_odedit.benchmark import world
from easyedit_odedit.benchmark.evaluation import (KEEP_METRICS, Evaluation, changed_by_sequence, extra_entries,
                                                  extra_metrics)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOUR_Q, SHAPE_Q = world.TEMPLATE_BY_ID["c3"], world.TEMPLATE_BY_ID["s1"]  # "what color is the {shape}?", ...


def _image(shape, colour, k=0):
    return world.images_with("test", shape, colour)[k]


def _item(shape, colour, template, k=0):
    image = _image(shape, colour, k)
    return {"image": f"test/{image.id}.png", "question": world.question_for(template, shape, colour),
            "answer": world.answer(template, None, shape, colour)}


def _record(shape, colour, family, alt, **lists):
    """A record editing (shape, colour, family) to ``alt``, with the extra lists given."""
    template = COLOUR_Q if family == "colour" else SHAPE_Q
    record = {"edit": {"shape": shape, "colour": colour, "family": family}, "alt": alt,
              "eval_gen": [dict(_item(shape, colour, template, 1), answer=alt)]}
    record.update({f"eval_{name}": items for name, items in lists.items()})
    return record


def _flags_by_list(record, chunk):
    flags = {}
    for (metric, _, _), flag in zip(extra_entries(record), changed_by_sequence(record, chunk)):
        flags.setdefault(metric, []).append(flag)
    return flags


# A edits the colour of red circles; C the shape of red circles; B the shape of red triangles.
A = _record("circle", "red", "colour", "blue")
C = _record("circle", "red", "shape", "triangle")
# B's near misses (same colour, other shape): a red circle asked its colour (A changes it), the
# same red circle asked its shape (C changes it), a red rectangle asked its colour (no edit does)
B = _record("triangle", "red", "shape", "rectangle",
            near_colour=[_item("circle", "red", COLOUR_Q), _item("circle", "red", SHAPE_Q),
                         _item("rectangle", "red", COLOUR_Q)],
            near_shape=[_item("triangle", "blue", SHAPE_Q)],
            far=[_item("circle", "green", COLOUR_Q), _item("circle", "red", COLOUR_Q, 2)],
            other_family=[_item("triangle", "red", COLOUR_Q)])


def test_an_item_is_left_out_exactly_when_another_edit_of_the_chunk_edits_its_concept_under_its_family():
    assert _flags_by_list(B, [A, B]) == {"gen": [False], "near_colour": [True, False, False],
                                         "near_shape": [False], "far": [False, True], "other_family": [False]}
    assert _flags_by_list(B, [C, B])["near_colour"] == [False, True, False]  # the shape family now
    assert _flags_by_list(B, [A, C, B])["near_colour"] == [True, True, False]
    assert _flags_by_list(B, [A, C, B])["far"] == [False, True]
    # the edit's own scope never holds for its own near, far and other-family items
    assert not any(changed_by_sequence(B, [B]))
    # an "edit" to the answer the item already has changes nothing
    assert not any(changed_by_sequence(B, [_record("circle", "red", "colour", "red"), B]))


def test_fair_metrics_leave_out_the_changed_items_the_unedited_model_answered_right():
    items = Evaluation.extra_items(B)
    chunk = [A, C, B]
    changed = changed_by_sequence(B, chunk)
    pre = [((i,), (i,)) for i in range(len(items))]  # the unedited model gives every true answer
    post = [((-1,) if flag else (i,), (i,)) for i, flag in enumerate(changed)]  # a perfect editor
    metrics = extra_metrics(items, post, pre, changed)
    assert metrics["near"] == pytest.approx(2 / 4) and metrics["near_kept"] == 1.0
    assert metrics["near_colour"] == pytest.approx(1 / 3) and metrics["near_colour_kept"] == 1.0
    assert metrics["far"] == 0.5 and metrics["far_kept"] == 1.0
    assert metrics["other_family_kept"] == metrics["other_family"] == 1.0
    assert metrics["excluded"] == {"near_shape": 0, "near_colour": 2, "far": 1, "other_family": 0, "near": 2}
    assert metrics["items"] == {"near_shape": 1, "near_colour": 3, "far": 2, "other_family": 1, "near": 4}
    assert "gen" not in metrics["excluded"] and metrics["gen"] == 1.0
    # where the unedited model was already wrong on a changed item (the first red circle), the item
    # stays in: it may have given the new answer already
    first_red_circle = 2  # gen, near_shape, then near_colour
    assert changed[first_red_circle]
    pre[first_red_circle] = ((100,), (first_red_circle,))
    metrics = extra_metrics(items, post, pre, changed)
    assert metrics["excluded"]["near_colour"] == 1 and metrics["near_colour_kept"] == 0.5


def test_single_editing_figures_are_unchanged_on_the_bench_records():
    """In single editing the chunk is the record itself: on the bench's own records no item is left
    out, and every fair figure equals today's; in T = 10 chunks some are."""
    from easyedit_odedit.benchmark.records import build_records

    records = build_records("test", 20, seed=0)
    for record in records:
        changed = changed_by_sequence(record, [record])
        assert not any(changed)
        items = Evaluation.extra_items(record)
        pre = [((k % 3,), (k % 3,)) for k in range(len(items))]
        post = [((k % 2,), (k % 3,)) for k in range(len(items))]
        metrics = extra_metrics(items, post, pre, changed)
        for m in KEEP_METRICS:
            assert metrics[f"{m}_kept"] == metrics[m]
            assert metrics["excluded"][m] == 0
    in_chunks = sum(sum(changed_by_sequence(r, records[c:c + 10])) for c in (0, 10) for r in records[c:c + 10])
    assert in_chunks > 0


# -- end to end: a small bench, then its report rebuilt from an edits.jsonl without the new fields --
@pytest.fixture(scope="module")
def small_bench(tmp_path_factory):
    from easyedit_odedit.cli import main

    root = tmp_path_factory.mktemp("seqbench")
    config = {"name": "seq-locality", "seeds": [0], "records": {"n_train": 2, "n_test": 10, "pool_images": 40},
              "settings": {"single": {"n": 2}, "sequential": {"T": [10], "chunks": 1}},
              "hosts": {"FT-L": os.path.join(ROOT, "hparams/ODEdit/minimmedit-ft-l.yaml")},
              "overrides": {"host_hparams": {"num_steps": 3}}, "leakage_check": 0}
    path = root / "seq.yaml"
    path.write_text(yaml.safe_dump(config))
    out = root / "out"
    main(["bench", "--config", str(path), "--out", str(out)])
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_sequence_rows_carry_the_fair_figures_and_the_report_shows_them(small_bench):
    out, res = small_bench
    rows = res["per_edit"]
    seq = [r for r in rows if r["setting"] == "seq10"]
    assert len(seq) == 20 and {r["method"] for r in seq} == {"FT-L", "FT-L+ODEdit"}
    for row in rows:
        assert set(row["excluded"]) == set(row["items"]) == set(KEEP_METRICS)
        for m in KEEP_METRICS:
            kept = row[f"{m}_kept"]
            assert kept is None or 0.0 <= kept <= 1.0
        if row["setting"] == "single":
            assert all(row[f"{m}_kept"] == row[m] for m in KEEP_METRICS)
            assert not any(row["excluded"].values())
    host_rows = [r for r in seq if r["method"] == "FT-L"]
    share = res["excluded"]["seq10"]["FT-L"]["near"]
    assert share["excluded"] == sum(r["excluded"]["near"] for r in host_rows) > 0
    assert share["items"] == sum(r["items"]["near"] for r in host_rows)
    assert res["excluded"]["seq10"]["FT-L+ODEdit"] == res["excluded"]["seq10"]["FT-L"]  # the same chunk and items
    assert res["excluded"]["single"]["FT-L"]["near"]["excluded"] == 0
    for m in ("near_kept", "far_kept", "hm_kept"):
        assert m in res["paired"]["seq10"]["FT-L+ODEdit"]
    md = (out / "results.md").read_text()
    seq_section = md[md.index("## seq10"):]
    assert ("| Near | Far | Other-Q | HM(I-Gen6,Near) | Near (all items) | Far (all items) | Other-Q (all items) |"
            in seq_section)
    assert f"Near {100 * share['share']:.1f}% ({share['excluded']} of {share['items']} per method)" in seq_section
    assert "ΔNear (all items)" in seq_section
    single_section = md[md.index("## single"):md.index("## seq10")]
    assert "(all items)" not in single_section


def test_an_old_edits_jsonl_still_reports_and_says_the_fair_figures_are_missing(small_bench, tmp_path):
    from easyedit_odedit.benchmark.report import build

    out, res = small_bench
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(out / "run.json", old / "run.json")
    new_fields = {f"{m}_kept" for m in KEEP_METRICS} | {"hm_kept", "excluded", "items"}
    with open(old / "edits.jsonl", "w") as f:
        for row in res["per_edit"]:
            f.write(json.dumps({k: v for k, v in row.items() if k not in new_fields}) + "\n")
    rebuilt = build(str(old), show=False)
    assert rebuilt["fair_fallback_rows"] == {"single": 4, "seq10": 20}
    seq = rebuilt["summary"]["seq10"]["FT-L"]
    assert seq["near_kept"]["mean"] == seq["near"]["mean"]  # the all-items figure stands in
    md = (old / "results.md").read_text()
    assert "**Fair locality not recorded**: 20 rows" in md and "Near (all items)" not in md


def test_a_perfect_editor_scores_100_on_the_fair_figures_and_less_on_all_items(capsys):
    """benchmarks/sequence_ceiling.py puts a perfect editor's answers (each chunk's new answers on
    their scopes, the unedited model's answers elsewhere) through the bench's scoring."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from sequence_ceiling import main

    assert main(["--seeds", "0", "--n-test", "20", "--T", "10", "--chunks", "2", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seq10"]
    for m in ("near", "far", "other_family"):
        assert figures[f"perfect_{m}_kept"] == 1.0
        assert figures[f"ceiling_{m}"] <= 1.0 - figures[f"excluded_{m}"] + 1e-9
    assert figures["ceiling_near"] < 1.0 and figures["excluded_near"] > 0
