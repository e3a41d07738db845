"""End-to-end edits through EasyEdit's own MultimodalEditor, evaluation and restore."""
import pytest
import torch
from easyeditor import MultimodalEditor

from easyedit_odedit import compat
from easyedit_odedit import ODEditError, ODEditHyperParams, ODEditNumericalError, restore_all
from easyedit_odedit.odedit.odedit_main import apply_odedit_to_multimodal_model
from tests.conftest import PROMPT, edit_kwargs, write_yaml

HOSTS = {"FT-L": {"layers": [-1], "num_steps": 8, "lr": 0.1},
         "FT-V": {"num_steps": 8, "lr": 0.05, "modules": ["projector"]},
         "LoRA": {"layers": [-1], "num_steps": 8, "lr": 0.1, "rank": 2}}


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def numeric(section):
    """EasyEdit's metrics as floats (main adds non-numeric entries such as metric_meta)."""
    return {k: float(v) for k, v in section.items() if k.endswith("_acc")}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_edit_returns_easyedit_metrics_and_restores_bit_identically(world, host):
    editor = MultimodalEditor.from_hparams(ODEditHyperParams.from_hparams(write_yaml(world, host, HOSTS[host])))
    before = state(editor.model)
    metrics, edited, restore = editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    post = numeric(metrics[0]["post"])
    assert set(post) >= {"rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc"}
    assert all(0.0 <= v <= 1.0 for v in post.values())
    assert same(before, state(editor.model))  # EasyEdit restored through the returned weights


@pytest.mark.parametrize("enabled", [False, True])
def test_the_edit_takes_on_a_trained_small_model(world, enabled):
    """Post rewrite_acc 1.0 via EasyEdit's own evaluation. The test world's images are all noise,
    so image near misses are indistinguishable from the edit image and would (rightly) fight the
    edit; only text locality is used here."""
    hp = ODEditHyperParams.from_hparams(write_yaml(world, "FT-L", {"layers": [0, 1], "num_steps": 40, "lr": 0.01,
                                                                   "modules": ["mlp", "self_attn"]},
                                                   environments={"locality_pool": str(world / "pool.json"),
                                                                 "out_image": 0}, enabled=enabled))
    editor = MultimodalEditor.from_hparams(hp)
    metrics, _, _ = editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    assert float(metrics[0]["post"]["rewrite_acc"]) == 1.0


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_edited_weights_do_not_depend_on_evaluation_fields(world, host):
    """No leakage: the same edit with real and with other evaluation fields gives identical weights."""
    hp = ODEditHyperParams.from_hparams(write_yaml(world, host, HOSTS[host]))
    editor = MultimodalEditor.from_hparams(hp)
    results = []
    for rephrase, loc in [("what is the color of the shape ?", "what is two plus three ?"),
                          ("is there a circle ?", "what is one plus one ?")]:
        kwargs = edit_kwargs(world, rephrase=rephrase, loc_prompt=loc)
        with compat.host_scope():
            requests = editor._prepare_requests(kwargs["prompts"], kwargs["targets"], kwargs["image"],
                                                kwargs["rephrase_prompts"], kwargs["rephrase_image"],
                                                kwargs["locality_inputs"])
        if rephrase.startswith("is"):
            requests[0]["image_rephrase"] = torch.zeros_like(requests[0]["image_rephrase"])
        _, restore = apply_odedit_to_multimodal_model(editor.model, editor.tok, requests, hp, keep_original_weight=True)
        results.append(state(editor.model))
        restore()
    assert same(*results)


def test_sequential_edits_accumulate_and_restore_in_one_call(world):
    hp = ODEditHyperParams.from_hparams(write_yaml(world, "LoRA", HOSTS["LoRA"]))
    editor = MultimodalEditor.from_hparams(hp)
    before = state(editor.model)
    kwargs = edit_kwargs(world)
    with compat.host_scope():
        requests = editor._prepare_requests(kwargs["prompts"] * 3, ["green", "blue", "red"], kwargs["image"] * 3,
                                            locality_inputs={})
    snapshots = []
    for request in requests:
        apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp, keep_original_weight=False)
        snapshots.append(state(editor.model))
    assert not same(snapshots[0], snapshots[2])  # each edit moved the weights further
    assert restore_all(editor.model) > 0
    assert same(before, state(editor.model))


def _sequence(editor, targets, **fields):
    kwargs, n = edit_kwargs(world=fields.pop("world"), **fields), len(targets)
    locality = {kind: {k: v * n for k, v in inputs.items()} for kind, inputs in kwargs["locality_inputs"].items()}
    with compat.host_scope():
        return editor._prepare_requests(kwargs["prompts"] * n, targets, kwargs["image"] * n,
                                        kwargs["rephrase_prompts"] * n, kwargs["rephrase_image"] * n, locality)


def test_a_sequence_keeps_its_earlier_edits_as_out_rows(world, monkeypatch):
    """Edit k of a sequence must leave edits 1..k-1 as they are: each is an OUT row of the later
    edits (its prompt, image and new target), until the model is restored - by ``restore_all`` or,
    as the PyPI editor does, by copying the tensors back."""
    from easyedit_odedit.odedit import odedit_main

    seen = []
    build_rows = odedit_main.build_rows
    monkeypatch.setattr(odedit_main, "build_rows", lambda *a, **k: seen.append(build_rows(*a, **k)) or seen[-1])
    hp = ODEditHyperParams.from_hparams(write_yaml(world, "FT-L", HOSTS["FT-L"]))
    editor = MultimodalEditor.from_hparams(hp)
    before = state(editor.model)

    def past_targets():
        return sorted(r.target for r in seen[-1] if r.env == "OUT_past")

    for request in _sequence(editor, ["green", "blue", "red"], world=world):
        apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp, keep_original_weight=False)
    assert [sorted(r.target for r in rows if r.env == "OUT_past") for rows in seen] == [[], ["green"], ["blue", "green"]]
    size = editor.model.image_size  # kept at the model's own size, not the processor's 364
    assert all(r.prompt == PROMPT and r.image.shape == (3, size, size) for r in seen[-1] if r.env == "OUT_past")
    request = _sequence(editor, ["gray"], world=world)[0]
    restore_all(editor.model)
    apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp, keep_original_weight=False)
    assert past_targets() == []
    with torch.no_grad():  # what the PyPI editor does after an edit: the tensors copied back
        for name, value in editor.model.state_dict().items():
            value.copy_(before[name])
    apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp, keep_original_weight=False)
    assert past_targets() == []
    restore_all(editor.model)


def test_a_sequence_does_not_depend_on_earlier_records_evaluation_fields(world):
    hp = ODEditHyperParams.from_hparams(write_yaml(world, "FT-L", HOSTS["FT-L"]))
    assert same(*sequences_with_other_evaluation_fields(world, hp))


def sequences_with_other_evaluation_fields(world, hp):
    """The weights after the same two-edit sequence, twice: the first request's evaluation fields differ."""
    editor = MultimodalEditor.from_hparams(hp)
    results = []
    for rephrase, loc in [("what is the color of the shape ?", "what is two plus three ?"),
                          ("is there a circle ?", "what is one plus one ?")]:
        first = _sequence(editor, ["green"], world=world, rephrase=rephrase, loc_prompt=loc)[0]
        second = _sequence(editor, ["blue"], world=world)[0]
        for request in (first, second):
            apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp, keep_original_weight=False)
        results.append(state(editor.model))
        restore_all(editor.model)
    return results


def test_a_failed_edit_leaves_the_weights_untouched(world):
    hp = ODEditHyperParams.from_hparams(write_yaml(world, "FT-L", {"layers": [-1], "num_steps": 4, "lr": 1e30},
                                                   penalty={"warmup_steps": 0}))
    editor = MultimodalEditor.from_hparams(hp)
    before = state(editor.model)
    with pytest.raises(ODEditNumericalError):
        editor.edit(**edit_kwargs(world), keep_original_weight=True, verbose=False)
    assert same(before, state(editor.model))


def test_bad_requests_fail_before_any_weight_changes(world):
    hp = ODEditHyperParams.from_hparams(write_yaml(world))
    editor = MultimodalEditor.from_hparams(hp)
    before = state(editor.model)
    good = {"prompt": PROMPT, "target": "green", "image": torch.zeros(3, 32, 32)}
    cases = [(dict(good, target=""), "target"), (dict(good, target="zebra"), "cannot be encoded"),
             (dict(good, image=torch.zeros(32, 32)), "image"),
             (dict(good, image=torch.full((3, 8, 8), float("nan"))), "non-finite")]
    for request, message in cases:
        with pytest.raises(ODEditError, match=message):
            apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp)
        assert same(before, state(editor.model))


def test_same_seed_same_weights(world):
    hp = ODEditHyperParams.from_hparams(write_yaml(world, "FT-L"))
    editor = MultimodalEditor.from_hparams(hp)
    request = {"prompt": PROMPT, "target": "green", "image": torch.ones(3, 64, 64)}
    runs = []
    for _ in range(2):
        _, restore = apply_odedit_to_multimodal_model(editor.model, editor.tok, [request], hp, keep_original_weight=True)
        runs.append(state(editor.model))
        restore()
    assert same(*runs)


def test_a_chat_layout_wraps_the_prompt_and_masks_all_but_the_target(world):
    """LLaVA-1.5 rows read "[BOS] USER: [image] \\n prompt ASSISTANT: target"; only the target is
    labelled, with and without an image, and the prompt's count is EasyEdit's."""
    from easyedit_odedit.models.adapter import IGNORE
    from easyedit_odedit.models.loading import load_adapter

    adapter = load_adapter(str(world / "model"))
    tok = adapter.tokenizer
    prompt, target = "what color is the shape ?", "green"
    n_prompt = len(tok(prompt)["input_ids"])
    plain = adapter.embed([f"{prompt} {target}"], [torch.rand(3, 64, 64)], [n_prompt])
    adapter.config["chat"] = {"user": "question", "image_end": ":", "assistant": "short answer :"}
    chat = adapter.embed([f"{prompt} {target}"] * 2, [torch.rand(3, 64, 64), None], [n_prompt] * 2)
    extra = len(tok("question :", add_special_tokens=False)["input_ids"]) + len(tok("short answer :", add_special_tokens=False)["input_ids"])
    assert chat.attention_mask[0].sum() == plain.attention_mask[0].sum() + extra
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    for row in range(2):
        labels = chat.labels[row][chat.attention_mask[row].bool()].tolist()
        assert [x for x in labels if x != IGNORE] == target_ids and labels[-len(target_ids):] == target_ids
    ids = tok("short answer :", add_special_tokens=False)["input_ids"]
    embeds = adapter.language_model.get_input_embeddings()(torch.tensor(ids))
    before_target = chat.inputs_embeds[1, -len(target_ids) - len(ids):-len(target_ids)]
    assert torch.allclose(before_target, embeds)  # the assistant tag sits right before the target


def _add_bos(tokenizer):
    """Make a word tokenizer put "</s>" before every text, as OPT's does."""
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.convert_tokens_to_ids("</s>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="</s> $A", special_tokens=[("</s>", bos)])
    assert tokenizer("red")["input_ids"][0] == bos


def test_easyedit_prompt_counts_label_only_the_target_with_a_bos_tokenizer(world):
    """EasyEdit counts ``prompts_len`` with the BOS (PyPI release, BLIP-2) or without it (main);
    the samples its own ``prepare_multimodal_edit`` builds must label exactly the target either way."""
    from easyedit_odedit.models.adapter import IGNORE

    hp = ODEditHyperParams.from_hparams(write_yaml(world))
    editor = MultimodalEditor.from_hparams(hp)
    assert editor.model.prompts_len_counts_special_tokens == (compat.flavour() == compat.PYPI)
    for tokenizer in {id(t): t for t in (editor.tok, editor.model.tokenizer)}.values():
        _add_bos(tokenizer)
    image = compat.process_image_file(editor.vis_tok, str(world / "img" / "0.png"))
    samples = compat.multimodal_evaluation().prepare_multimodal_edit(hp, editor.tok, "green", PROMPT, image)
    labels = editor.model(samples).labels[0]
    assert [t for t in labels.tolist() if t != IGNORE] == editor.tok("green", add_special_tokens=False)["input_ids"]
    editor.model.prompts_len_counts_special_tokens = not editor.model.prompts_len_counts_special_tokens
    wrong = [t for t in editor.model(samples).labels[0].tolist() if t != IGNORE]
    assert len(wrong) != 1  # the other convention labels a prompt token too, or none: the check can fail
