"""Spill found on the edited weights (``odedit/spill.py``) and the rounds it adds to an edit."""
import torch
from easyeditor import MultimodalEditor

from easyedit_odedit import ODEditHyperParams, restore_all
from easyedit_odedit.environments import Row
from easyedit_odedit.odedit import objective as objective_module
from easyedit_odedit.odedit import odedit_main, spill
from easyedit_odedit.odedit.odedit_hparams import EnvironmentSettings
from tests.conftest import edit_kwargs
from tests.test_content_environments import _content_yaml
from tests.test_edit import same, state


def _watched(values_and_answers):
    return [Row("OUT_spill", "q", answer, torch.full((3, 2, 2), float(v)), f"img{v}") for v, answer in values_and_answers]


def test_wrong_answers_are_taken_edit_target_and_shortfall_first_one_per_image_first(monkeypatch):
    # image value -> what the edited model now says (text questions: 9)
    now = {1: "red", 2: "green", 3: "green", 4: "blue", 5: "green", 6: "red", 7: "green", 9: "five"}
    monkeypatch.setattr(spill, "unedited_answers",
                        lambda adapter, rows, n: [now[int(r.image.mean()) if r.image is not None else 9] for r in rows])
    watched = _watched([(1, "red"), (2, "red"), (3, "blue"), (4, "red"), (5, "red"), (3, "circle")])
    watched += [Row("SE_content", "q", "green", torch.full((3, 2, 2), 6.0), "img6"),   # falls short of the target
                Row("SE_content", "q", "green", torch.full((3, 2, 2), 7.0), "img7"),   # carries it
                Row("OUT_text", "two plus two ?", "four")]                              # moved
    view = {"target": "green", "watched": list(watched)}
    settings = EnvironmentSettings(pool_factor=1, near_miss_rows=4, probe_batch=2)
    taken = spill.spilled(None, view, 1, settings)
    # 1 and 7 are right; 2, 3, 5 moved to the edit's target (3 twice: its second question waits), 6 fell
    # short of it; 4 and the text question moved elsewhere
    assert [(int(r.image.mean()), r.target) for r in taken] == [(2, "red"), (3, "blue"), (5, "red"), (6, "green")]
    assert view["watched"] == [watched[i] for i in (0, 3, 5, 7, 8)]  # what is taken is not asked again
    again = spill.spilled(None, view, 1, settings)
    # image 3's other question now gives the edit's target too: first; then 4 and the text question
    assert [(r.prompt, r.target) for r in again] == [("q", "circle"), ("q", "red"), ("two plus two ?", "four")]


def test_a_round_trains_on_the_spill_against_the_weights_before_the_edit(world, monkeypatch):
    hp = ODEditHyperParams.from_hparams(_content_yaml(world, preset="content",
                                                      constraints={"max_steps": 6, "reprobe_rounds": 2}))
    editor = MultimodalEditor.from_hparams(hp)
    before = state(editor.model)
    pool_image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    found = [[Row("OUT_spill", "question : what shape is in the image ? short answer :", "circle", pool_image)], []]
    monkeypatch.setattr(odedit_main, "spilled", lambda *a: found.pop(0))
    monkeypatch.setattr(odedit_main, "_reprobe_rounds", lambda *a: 2)
    built, logs = [], []
    real_rows, real_edit = objective_module.EditRows.__init__, odedit_main.edit_once

    def recording(self, adapter, rows, *args, **kwargs):
        real_rows(self, adapter, rows, *args, **kwargs)
        built.append((list(rows), self.pre_log_probs.clone()))

    monkeypatch.setattr(odedit_main.EditRows, "__init__", recording)
    monkeypatch.setattr(odedit_main, "edit_once", lambda *a, **k: logs.append(real_edit(*a, **k)) or logs[-1])
    editor.edit(**edit_kwargs(world), keep_original_weight=False, verbose=False)
    assert len(built) == 2 and not found  # the set-up, one round with the spill, then nothing more moved
    assert built[1][0][:-1] == built[0][0] and built[1][0][-1].env == "OUT_spill"
    assert logs[0]["reprobe_rounds"] == 1.0 and logs[0]["spill_rows"] == 1.0
    edited = state(editor.model)
    monkeypatch.setattr(odedit_main.EditRows, "__init__", real_rows)
    on_edited = objective_module.EditRows(editor.model, built[1][0], hp.risks.kl_positions).pre_log_probs
    restore_all(editor.model)
    assert same(before, state(editor.model)) and not same(before, edited)
    unedited = objective_module.EditRows(editor.model, built[1][0], hp.risks.kl_positions).pre_log_probs
    # the round's references are the unedited model's, not the edited one's (which differ far more
    # than the last-bit differences a pass after an edit can show in a long-running process)
    assert torch.allclose(unedited, built[1][1], rtol=0, atol=1e-5)
    assert not torch.allclose(on_edited, built[1][1], rtol=0, atol=1e-3)
