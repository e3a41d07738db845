"""Content-aware environments (``ContentMiner``) and edits that stop when their constraints hold."""
import random
import re

import pytest
import torch
from easyeditor import MultimodalEditor

from easyedit_odedit import ODEditError, ODEditHyperParams, pool_index, restore_all
from easyedit_odedit.environments import ContentMiner, EnvironmentSampler, Row, same_answer
from easyedit_odedit.odedit import objective as objective_module
from easyedit_odedit.odedit import odedit_main
from easyedit_odedit.odedit.odedit_hparams import EnvironmentSettings
from tests.conftest import edit_kwargs, write_yaml
from tests.test_edit import same, state

EDIT_Q = "what color is the shape ?"
COLOUR_PROBE = "which colour does the shape have ?"   # asks what the edit's question asks
SHAPE_PROBE = "what shape is in the image ?"          # asks something else


def _image(value):
    return torch.full((3, 4, 4), float(value))


# candidate index -> (colour, shape); the edit image (value 0) shows a red circle
CONTENT = {1: ("red", "circle"), 2: ("red", "square"), 3: ("blue", "circle"), 4: ("green", "square"),
           5: ("red", "triangle"), 6: ("gray", "circle"), 7: ("Red.", "Circle")}


def _answers(probes):
    def seen(image):
        value = int(image.mean().item())
        return ("red", "circle") if value == 0 else CONTENT[value]
    return [seen(p.image)[1] if p.prompt == SHAPE_PROBE else seen(p.image)[0] for p in probes]


def _mine(probes=(COLOUR_PROBE, SHAPE_PROBE), answers=_answers, named=None, **settings):
    settings = EnvironmentSettings(probes=list(probes), probe_pool=8, pool_factor=1, **settings)
    candidates = [Row("OUT_image", "own question", "x", _image(i)) for i in sorted(CONTENT)]
    distances = [float(i) for i in sorted(CONTENT)]  # nearer for smaller values
    view = {"prompt": EDIT_Q, "target": "green", "image": _image(0)}
    return ContentMiner(settings, random.Random(0), named).rows(view, candidates, distances, answers)


def _values(rows):
    return [int(r.image.mean().item()) for r in rows]


def test_answers_compare_without_case_punctuation_or_article():
    assert same_answer("Red.", "red") and same_answer("a circle", "Circle") and not same_answer("red", "blue")


def test_same_content_carries_the_edit_and_near_misses_share_half_the_edit_answer():
    rows = _mine(near_miss_rows=4, same_content_rows=4, protect_rows=4)
    # red circles (1, and 7 in other spelling) show the edit's content: they must give the new answer,
    # asked the edit's question and the probe that asks the same thing
    carry = rows["SE_content"]
    # (the edit's own question on the edit image is the IN row, not repeated here); 4 of the 5 are kept
    allowed = {(q, v) for q in (EDIT_Q, COLOUR_PROBE) for v in (1, 7)} | {(COLOUR_PROBE, 0)}
    pairs = [(r.prompt, v) for r, v in zip(carry, _values(carry))]
    assert len(pairs) == len(set(pairs)) == 4 and set(pairs) <= allowed
    assert all(r.target == "green" for r in carry)
    # near misses: half share the edit's answer (red, other shape: 2 and 5), half share only the shape (3, 6)
    near = rows["OUT_near"]
    assert sorted(_values(near)) == [2, 3, 5, 6]
    assert {r.target for r in near if int(r.image.mean().item()) in (2, 5)} == {"red"}  # the unedited answer
    assert {r.prompt for r in near} <= {EDIT_Q, COLOUR_PROBE}
    # the shape probe is protected on the edit image and the same-content images; the colour probe is not
    protect = rows["OUT_protect"]
    assert protect and all(r.prompt == SHAPE_PROBE for r in protect)
    assert {(v, r.target) for r, v in zip(protect, _values(protect))} <= {(0, "circle"), (1, "circle"), (7, "Circle")}
    # image 4 shares nothing with a red circle: asked the edit's question (its unedited answer) and its own
    far = rows["far"]
    assert _values(far) == [4, 4]
    assert {(r.env, r.prompt, r.target) for r in far} == {("OUT_far", EDIT_Q, "green"), ("OUT_far", "own question", "x")}


def test_rephrasings_that_name_the_shown_content_carry_the_edit_on_same_content_images_only():
    named_q = "what color is the circle ?"

    def named(prompt, described):
        # the edit image's other attributes, not the edited one (its old answer would be wrong)
        assert prompt == EDIT_Q and described == {SHAPE_PROBE: "circle"}
        return [named_q]

    rows = _mine(named=named, near_miss_rows=4, same_content_rows=8, protect_rows=4)
    asked_named = [(r.target, v) for r, v in zip(rows["SE_content"], _values(rows["SE_content"])) if r.prompt == named_q]
    assert sorted(asked_named) == [("green", 0), ("green", 1), ("green", 7)]  # the edit image and the red circles
    assert all(r.prompt != named_q for group in ("OUT_near", "OUT_protect") for r in rows[group])


def test_a_paraphrase_source_that_takes_a_description_gives_named_rephrasings():
    from easyedit_odedit.environments import TextAugmenter

    def source(prompt, described=None):
        return ["plain"] + ([f"named {described['shape?']}"] if described else [])

    settings = EnvironmentSettings(paraphrases=source)
    assert TextAugmenter(settings, random.Random(0)).named("q", {"shape?": "circle"}) == ["named circle"]
    assert TextAugmenter(EnvironmentSettings(paraphrases=lambda p: ["plain"]), random.Random(0)).named("q", {}) == []


def test_answer_sharing_near_misses_come_first_when_short_of_the_other_kind():
    rows = _mine(probes=(SHAPE_PROBE,), near_miss_rows=3)
    assert sorted(_values(rows["OUT_near"])) == [2, 3, 5]  # two of the answer-sharing kind, one other


def test_probes_that_only_ask_the_edits_question_give_no_content():
    assert _mine(probes=(COLOUR_PROBE,)) is None


def _rows_compared(rows):
    return {group: [(r.env, r.prompt, r.target, int(r.image.mean().item())) for r in found]
            for group, found in rows.items() if group not in ("edit", "far")}


@pytest.mark.parametrize("probes, asked_on", [((COLOUR_PROBE, SHAPE_PROBE), 1 + 3), ((SHAPE_PROBE,), 1 + 7)])
def test_the_edit_question_is_asked_on_the_nearest_candidates_when_a_probe_asks_the_same(monkeypatch, probes,
                                                                                        asked_on):
    """A probe that asks what the edit's question asks stands in for it beyond the nearest candidates;
    with none, the question is asked on every candidate. The rows are those of asking it everywhere."""
    everywhere = _mine(probes=probes, near_miss_rows=4, same_content_rows=4, protect_rows=4)
    asked = []

    def counting(rows):
        asked.extend(int(r.image.mean().item()) for r in rows if r.prompt == EDIT_Q)
        return _answers(rows)

    monkeypatch.setattr(ContentMiner, "EDIT_QUESTION_SAMPLE", 3)
    sampled = _mine(probes=probes, answers=counting, near_miss_rows=4, same_content_rows=4, protect_rows=4)
    assert sorted(asked) == list(range(asked_on))  # the edit image and the nearest (smallest values)
    assert _rows_compared(sampled) == _rows_compared(everywhere)


def test_the_sampler_draws_the_content_groups_by_their_own_counts():
    settings = EnvironmentSettings(probes=[SHAPE_PROBE], probe_pool=8, near_miss_rows=3, same_content_rows=1,
                                   protect_rows=2, se_text=0, se_image=0, se_joint=0, out_text=0)
    rows = ([Row("IN", "p", "t")] + [Row("OUT_near", "p", "a")] * 6 + [Row("SE_content", "p", "t")] * 4
            + [Row("OUT_protect", "p", "a")] * 4)
    drawn = [rows[i].env for i in EnvironmentSampler(rows, settings, seed=0).sample()]
    assert (drawn.count("OUT_near"), drawn.count("SE_content"), drawn.count("OUT_protect")) == (3, 1, 2)


# ------------------------------------------------------------------------------------------------
# Through EasyEdit's editor, on the tiny model
# ------------------------------------------------------------------------------------------------
CONTENT_ENV = {"probes": ["what shape is in the image ?", "is there a circle ?"], "probe_pool": 6,
               "near_miss_rows": 2, "same_content_rows": 1, "protect_rows": 1}


def _content_yaml(world, **extra):
    env = {"locality_pool": str(world / "pool.json"), **CONTENT_ENV}
    return write_yaml(world, "FT-L", {"layers": [-1], "num_steps": 6, "lr": 0.1}, environments=env, **extra)


def test_content_rows_and_weights_do_not_depend_on_evaluation_fields(world, monkeypatch):
    """No leakage with probes: the probe answers, the mined rows and the edited weights are identical
    whatever the request's evaluation fields hold."""
    hp = ODEditHyperParams.from_hparams(_content_yaml(world, preset="content"))
    editor = MultimodalEditor.from_hparams(hp)
    built, probed = [], []
    real_build, real_answers = odedit_main.build_rows, pool_index.Probes.answers

    def recording_build(*args, **kwargs):
        rows = real_build(*args, **kwargs)
        built.append([(r.env, r.prompt, r.target, None if r.image is None else r.image.sum().item()) for r in rows])
        return rows

    def recording_answers(self, probes):
        answers = real_answers(self, probes)
        probed.append(answers)
        return answers

    monkeypatch.setattr(odedit_main, "build_rows", recording_build)
    monkeypatch.setattr(pool_index.Probes, "answers", recording_answers)
    weights = []
    for rephrase, loc in [("what is the color of the shape ?", "what is two plus three ?"),
                          ("is there a circle ?", "what is one plus one ?")]:
        probed.clear()
        editor.edit(**edit_kwargs(world, rephrase=rephrase, loc_prompt=loc), keep_original_weight=False,
                    verbose=False)
        weights.append((state(editor.model), list(probed)))
        restore_all(editor.model)
    assert len(built) == 2 and built[0] == built[1]
    assert {env for env, *_ in built[0]} & {"SE_content", "OUT_protect"}  # the miner ran
    assert weights[0][1] == weights[1][1]  # the probe answers
    assert same(weights[0][0], weights[1][0])


def test_an_edit_with_constraints_stops_at_a_check_and_never_runs_past_the_limit(world, monkeypatch):
    steps, checks = [], []
    real_update, real_check = objective_module.ODEditObjective.update, objective_module.ODEditObjective.constraints_hold

    def counting_update(self, idx):
        steps.append(self.step)
        return real_update(self, idx)

    def recording_check(self):
        held = real_check(self)
        checks.append((self.step, held, dict(self.group_weight)))
        return held

    monkeypatch.setattr(objective_module.ODEditObjective, "update", counting_update)
    monkeypatch.setattr(objective_module.ODEditObjective, "constraints_hold", recording_check)
    hp = ODEditHyperParams.from_hparams(_content_yaml(
        world, constraints={"enabled": True, "max_steps": 12, "check_every": 3, "out_share": 1.0, "out_kl": 0.0}))
    editor = MultimodalEditor.from_hparams(hp)
    editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    assert 3 <= len(steps) <= 12 and [s for s, _, _ in checks] == [3 * (i + 1) for i in range(len(checks))]
    # out_kl 0 cannot hold once anything moved: every check fails, and the OUT weight grows at each one
    assert not any(held for _, held, _ in checks) and len(steps) == 12
    out_weights = [w["OUT"] for _, _, w in checks]
    assert out_weights == sorted(out_weights) and out_weights[-1] > 1.0


def test_a_check_that_holds_ends_the_edit_with_that_iterate(world, monkeypatch):
    steps = []
    real_update = objective_module.ODEditObjective.update

    def counting_update(self, idx):
        steps.append(self.step)
        return real_update(self, idx)

    monkeypatch.setattr(objective_module.ODEditObjective, "update", counting_update)
    monkeypatch.setattr(objective_module.ODEditObjective, "constraints_hold", lambda self: self.step >= 4)
    hp = ODEditHyperParams.from_hparams(_content_yaml(world, constraints={"enabled": True, "check_every": 2}))
    MultimodalEditor.from_hparams(hp).edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    assert len(steps) == 4


@pytest.mark.parametrize("section, values, field", [
    ("constraints", {"max_steps": 0}, "constraints.max_steps"),
    ("environments", {"meta_training_rows": True}, "environments.meta_training_rows"),  # FT-L: MEND only
    ("constraints", {"se_share": 1.5}, "constraints.se_share"),
    ("constraints", {"growth": 0.5}, "constraints.out_kl/growth/max_weight"),
    ("environments", {"probes": ["what is it?", ""]}, "environments.probes"),
    ("environments", {"probe_batch": 0}, "environments.probe_batch"),
])
def test_bad_settings_name_the_field(world, section, values, field):
    with pytest.raises(ODEditError, match=re.escape(field)):
        ODEditHyperParams.from_hparams(write_yaml(world, **{section: values}))


def test_presets_set_the_formulation_and_the_yaml_overrides_them(world):
    paper = ODEditHyperParams.from_hparams(write_yaml(world, preset="paper"))
    assert not paper.constraints.enabled and paper.environments.probe_pool == 0 and paper.risks.loc_weight == 1.0
    content = ODEditHyperParams.from_hparams(_content_yaml(world, preset="content", risks={"loc_weight": 5.0}))
    assert content.constraints.enabled and content.environments.probe_pool == 6 and content.risks.loc_weight == 5.0
    with pytest.raises(ODEditError, match="environments.probes"):
        ODEditHyperParams.from_hparams(write_yaml(world, preset="content"))
    with pytest.raises(ODEditError, match="preset"):
        ODEditHyperParams.from_hparams(write_yaml(world, preset="fast"))


# ------------------------------------------------------------------------------------------------
# The pool index
# ------------------------------------------------------------------------------------------------
class _Adapter(torch.nn.Module):
    """Stands in for the model: one weight, features = image means, answers counted."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.asked = []

    def image_features(self, images):
        return torch.stack([im.mean().view(1) for im in images])

    def ask(self, rows, n_tokens):
        self.asked.append(len(rows))
        return [f"{r.prompt}:{int(r.image.mean().item())}" for r in rows]


def test_the_index_computes_the_whole_pool_once_in_fixed_slices_and_answers_from_it():
    adapter = _Adapter()
    paths = [f"img{i}" for i in range(7)]
    load = lambda p: _image(int(p[3:]))  # noqa: E731
    index = pool_index.PoolIndex(adapter, paths, load, batch=3)
    assert index.answers("q", ["img5", "img1"], 1, adapter.ask) == ["q:5", "q:1"]
    assert adapter.asked == [3, 3, 1]  # the whole pool, in pool order, slices of 3
    assert index.answers("q", ["img2"], 1, adapter.ask) == ["q:2"] and adapter.asked == [3, 3, 1]  # from the index
    assert index.features(["img4", "img0"]).flatten().tolist() == [4.0, 0.0]


def test_probes_ask_live_what_the_index_cannot_know():
    adapter = _Adapter()
    index = pool_index.PoolIndex(adapter, ["img1", "img2"], lambda p: _image(int(p[3:])), batch=8)
    probes = pool_index.Probes(adapter, adapter.ask, 1, batch=8, fixed_prompts=["fixed"], index=index)
    rows = [Row("probe", "fixed", None, _image(1), "img1"),     # fixed probe, pool image: the index
            Row("probe", "edit q", None, _image(2), "img2"),    # the edit's own question: live
            Row("probe", "fixed", None, _image(9), None)]       # the edit image: live
    assert probes.answers(rows) == ["fixed:1", "edit q:2", "fixed:9"]
    assert adapter.asked == [2, 2]  # the index's pass over the pool, then the two live rows


def test_an_index_answers_only_for_the_weights_it_was_built_on():
    adapter = _Adapter()
    key, load = ("pool",), (lambda p: _image(1))
    first = pool_index.index_for(adapter, key, ["img1"], load, 4, unedited=True)
    assert pool_index.index_for(adapter, key, ["img1"], load, 4, unedited=True) is first
    with torch.no_grad():
        adapter.w.add_(1.0)
    assert pool_index.index_for(adapter, key, ["img1"], load, 4, unedited=False) is None  # mid-sequence: live
    rebuilt = pool_index.index_for(adapter, key, ["img1"], load, 4, unedited=True)  # changed outside ODEdit
    assert rebuilt is not first and rebuilt.holds()
    with torch.no_grad():
        adapter.w.sub_(1.0)
    assert pool_index.index_for(adapter, key, ["img1"], load, 4, unedited=True) is not rebuilt


def test_a_content_edit_does_not_depend_on_the_edits_before_it(world):
    """The index is built during the first edit; the same edit after another one gives the same weights."""
    hp = ODEditHyperParams.from_hparams(_content_yaml(world, preset="content", constraints={"max_steps": 6}))
    editor = MultimodalEditor.from_hparams(hp)
    results = []
    for targets in (["green"], ["blue"], ["green"]):
        kwargs = dict(edit_kwargs(world), targets=targets)
        editor.edit(**kwargs, keep_original_weight=False, verbose=False)
        results.append(state(editor.model))
        restore_all(editor.model)
    assert same(results[0], results[2]) and not same(results[0], results[1])
