"""Sequences with ``past_reference: sequence_start``: OUT rows keep the model from before the
sequence, earlier edits carry their own rows, and nothing about content another edit changes is
held to its old answer."""
import torch
from easyeditor import MultimodalEditor

from easyedit_odedit import ODEditHyperParams, restore_all
from easyedit_odedit.environments import Row, carried_rows, without_conflicts
from easyedit_odedit.odedit import objective as objective_module
from easyedit_odedit.odedit import odedit_main
from easyedit_odedit.odedit.odedit_main import apply_odedit_to_multimodal_model
from easyedit_odedit.odedit.restore import at_sequence_start
from easyedit_odedit import compat
from tests.conftest import PROMPT, edit_kwargs
from tests.test_content_environments import _content_yaml
from tests.test_edit import _sequence, same, sequences_with_other_evaluation_fields, state

OTHER_PROMPT = "question : what shape is in the image ? short answer :"

RED_CIRCLE, BLUE_SQUARE = ("red", "circle"), ("blue", "square")


def _row(env, content, prompt="q"):
    return Row(env, prompt, "a", None, content=content)


def test_reference_rows_about_content_another_edit_changes_are_dropped():
    rows = [_row("OUT_near", RED_CIRCLE), _row("OUT_protect", BLUE_SQUARE), _row("OUT_far", None),
            _row("SE_content", RED_CIRCLE), _row("OUT_text", None)]
    kept = without_conflicts(rows, [{"content": RED_CIRCLE}, {"content": None}])
    # the near miss showing an edited concept goes; rows that carry a target and rows of unknown content stay
    assert [(r.env, r.content) for r in kept] == [("OUT_protect", BLUE_SQUARE), ("OUT_far", None),
                                                   ("SE_content", RED_CIRCLE), ("OUT_text", None)]


def test_an_edit_carries_half_rows_that_keep_its_target_and_half_that_mark_where_it_stops():
    rows = ([_row("IN", None)] + [_row("SE_content", (i,)) for i in range(5)] + [_row("OUT_near", (10 + i,)) for i in range(2)]
            + [_row("OUT_protect", (20 + i,)) for i in range(3)] + [_row("SE_text", None), _row("OUT_far", None)])
    assert [r.content for r in carried_rows(rows, 6)] == [(0,), (1,), (2,), (10,), (11,), (20,)]
    # one side short: the other fills the rest
    assert [r.env for r in carried_rows(rows[:2] + rows[6:8], 4)] == ["SE_content", "OUT_near", "OUT_near"]


def test_the_sequence_start_is_put_back_exactly_for_the_block(world):
    hp = ODEditHyperParams.from_hparams(_content_yaml(world, preset="content", constraints={"max_steps": 6}))
    editor = MultimodalEditor.from_hparams(hp)
    before = state(editor.model)
    for request in _sequence(editor, ["green", "blue"], world=world):
        apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp, keep_original_weight=False)
    edited = state(editor.model)
    assert not same(before, edited)
    with at_sequence_start(editor.model, {}):
        assert same(before, state(editor.model))
    assert same(edited, state(editor.model))
    restore_all(editor.model)


def test_a_content_sequence_measures_against_the_model_before_it(world, monkeypatch):
    """Edit k's OUT references are the unedited model's, bit for bit; earlier edits come back as
    rows that must give their targets (and their own boundary rows)."""
    hp = ODEditHyperParams.from_hparams(_content_yaml(world, preset="content", constraints={"max_steps": 6}))
    editor = MultimodalEditor.from_hparams(hp)
    seen = []
    real = objective_module.EditRows.__init__

    def recording(self, adapter, rows, *args, **kwargs):
        real(self, adapter, rows, *args, **kwargs)
        seen.append((list(rows), self.pre_log_probs.clone()))

    monkeypatch.setattr(odedit_main.EditRows, "__init__", recording)
    prompts = [PROMPT, OTHER_PROMPT, PROMPT]
    for request in _requests(editor, world, prompts, ["green", "circle", "gray"]):
        apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp, keep_original_weight=False)
    rows, references = seen[-1]
    past = [(r.env, r.prompt, r.target) for r in rows if r.env.endswith("_past")]
    # the second edit asked something else; the first asked what the third asks again, of the same
    # content (the tiny model describes every image alike): the later edit decides, the earlier row goes
    assert ("IN_past", OTHER_PROMPT, "circle") in past and ("IN_past", PROMPT, "green") not in past
    assert any(env == "OUT_past" for env, *_ in past)
    restore_all(editor.model)
    monkeypatch.setattr(odedit_main.EditRows, "__init__", real)
    unedited = objective_module.EditRows(editor.model, rows, hp.risks.kl_positions)
    assert torch.equal(unedited.pre_log_probs, references)


def _requests(editor, world, prompts, targets):
    """One request a prompt, on the same image (EasyEdit's own request builder)."""
    kwargs = edit_kwargs(world)
    n = len(prompts)
    locality = {kind: {k: v * n for k, v in inputs.items()} for kind, inputs in kwargs["locality_inputs"].items()}
    with compat.host_scope():
        return editor._prepare_requests(prompts, targets, kwargs["image"] * n, kwargs["rephrase_prompts"] * n,
                                        kwargs["rephrase_image"] * n, locality)


def test_a_content_sequence_does_not_depend_on_earlier_records_evaluation_fields(world):
    hp = ODEditHyperParams.from_hparams(_content_yaml(world, preset="content", constraints={"max_steps": 6}))
    assert same(*sequences_with_other_evaluation_fields(world, hp))
