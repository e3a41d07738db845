"""MiniMMEdit world, records and locality pool: properties of the real easy-vqa data."""
import json
import os
from collections import Counter

import pytest

from easyedit_odedit.benchmark import records as R
from easyedit_odedit.benchmark import world as W
from easyedit_odedit.models.tokenizer import words


@pytest.mark.parametrize("split", W.SPLITS)
def test_derived_attributes_answer_every_question_of_the_image(split):
    index = W.image_index(split)
    qs = W.questions(split)
    assert len(index) + len(W.dropped_images(split)) == {"train": 4000, "test": 1000}[split]
    assert len(index) > {"train": 3000, "test": 750}[split]
    for q in qs:
        image = index[q.image_id]
        assert W.answer(q.template, q.slot_value, image.shape, image.colour) == q.answer, q
    # colour / shape questions that name the other attribute name the image's own
    for q in qs:
        if q.family != "yesno" and q.slot_value is not None:
            image = index[q.image_id]
            assert q.slot_value == (image.shape if q.family == "colour" else image.colour)
    assert {im.shape for im in index.values()} == set(W.SHAPES)
    assert {im.colour for im in index.values()} == set(W.COLOURS)


def test_every_easy_vqa_question_has_a_template_and_family():
    texts, answers, _ = W.raw_questions("test")
    for text, ans in zip(texts, answers):
        template, slot = W.parse_question(text)
        assert W.fill(template, slot) == text
        assert ans in {"colour": W.COLOURS, "shape": W.SHAPES, "yesno": W.YES_NO}[template.family]
    used = {W.parse_question(t)[0].id for t in W.raw_questions("train")[0]}
    assert used == {t.id for t in W.TEMPLATES}


def test_derivation_drops_images_with_undetermined_attributes():
    assert W.derive_attributes([("what color is the shape?", "red"), ("is there a circle?", "yes")]) == ("circle", "red")
    assert W.derive_attributes([("what color is the shape?", "red")]) == (None, "red")
    # elimination: two shapes ruled out leave the third
    assert W.derive_attributes([("is there a circle?", "no"), ("is no triangle present?", "yes"),
                                ("is there not a blue shape?", "no")]) == ("rectangle", "blue")
    # contradiction
    assert W.derive_attributes([("what shape is present?", "circle"), ("is there a triangle?", "yes"),
                                ("what color is the shape?", "red")]) == (None, "red")


def test_held_out_rephrase_templates_are_disjoint_and_unreachable():
    held = {W.rephrase_template(g).id for g in W.GROUPS}
    assert len(held) == len(W.GROUPS)
    for group in W.GROUPS:
        assert W.rephrase_template(group).group == group
        reachable = {t.id for t in W.editor_templates(group)}
        assert reachable and not reachable & held
        assert reachable | {W.rephrase_template(group).id} == {t.id for t in W.templates(group)}
    held_texts = {W.question_for(W.rephrase_template(f), s, c) for f in R.EDIT_FAMILIES
                  for s in W.SHAPES for c in W.COLOURS}
    for q in W.questions("train")[:3000]:
        for variant in W.paraphrases(q.text) + W.paraphrases(W.image_prompt(q.text)):
            assert W.parse_question(variant.replace("Question: ", "").replace(" Short answer:", ""))[0].id not in held
            assert variant not in held_texts
    assert W.paraphrases("what color is the triangle?") == ["what color is the shape?", "what is the color of the shape?"]
    # a description of the edit image fills the slots the question leaves open, never a held-out form
    described = {W.image_prompt("what color is the shape?"): "Teal.", W.image_prompt("what shape is in the image?"): "rectangle"}
    for q in W.questions("train")[:3000]:
        for variant in W.paraphrases(W.image_prompt(q.text), described):
            assert W.parse_question(variant.replace("Question: ", "").replace(" Short answer:", ""))[0].id not in held
    assert W.paraphrases("what color is the shape?", described) == ["what is the color of the shape?",
                                                                    "what color is the rectangle?"]
    assert W.paraphrases("what shape is in the image?", described) == ["what shape is present?", "what is the teal shape?"]
    assert W.paraphrases("what shape is in the image?", {"what shape is in the image?": "a blur"}) == ["what shape is present?"]


def test_text_questions_split_is_fixed_disjoint_and_single_word():
    train, held = W.text_questions("train"), W.text_questions("heldout")
    assert not {q.text for q in train} & {q.text for q in held}
    assert len(held) > 100 and len(train) > 4 * len(held) - 100
    assert Counter(q.kind for q in held).keys() == set(W.TEXT_KINDS)
    for q in train + held:
        assert len(words(q.answer)) == 1 and q.answer in W.NUMBER_WORDS
    for q in W.text_questions():
        a, b = (W.NUMBER_WORDS.index(w) for w in words(q.text) if w in W.NUMBER_WORDS)
        assert W.NUMBER_WORDS.index(q.answer) == {"plus": a + b, "larger": max(a, b), "smaller": min(a, b)}[q.kind]
    # every held-out question's mirror (b op a) is trained: answerable, never seen verbatim
    train_texts = {q.text for q in train}
    for q in held:
        a, b = (w for w in words(q.text) if w in W.NUMBER_WORDS)
        mirror = q.text.replace(f" {a} ", " \0 ").replace(f" {b} ", f" {a} ").replace(" \0 ", f" {b} ")
        assert mirror in train_texts
    W._text_world.cache_clear()
    assert W.text_questions("heldout") == held


def test_vocabulary_covers_prompts_records_and_text():
    vocab = {w for text in W.vocabulary_texts() for w in words(text)}
    assert {"question", "short", "answer", ":"} <= vocab
    for q in W.questions("test")[:500]:
        assert set(words(W.image_prompt(q.text) + " " + q.answer)) <= vocab


@pytest.fixture(scope="module")
def test_records():
    return R.build_records("test", 60, seed=3)


def test_records_have_every_evqa_field_and_consistent_answers(test_records):
    index = W.image_index("test")
    by_path = {R.image_relpath(im): im for im in index.values()}
    held_text = {(q.text, q.answer) for q in W.text_questions("heldout")}
    for rec in test_records:
        assert set(R.EVQA_FIELDS) <= set(rec) and set(R.EXTRA_FIELDS) <= set(rec)
        assert all(isinstance(rec[k], str) and rec[k] for k in R.EVQA_FIELDS)
        edit = rec["edit"]
        image, rephrase_image = by_path[rec["image"]], by_path[rec["image_rephrase"]]
        assert (image.shape, image.colour) == (rephrase_image.shape, rephrase_image.colour) == (edit["shape"], edit["colour"])
        assert image.id != rephrase_image.id
        src_t, _ = W.parse_question(rec["src"])
        reph_t, _ = W.parse_question(rec["rephrase"])
        assert src_t.family == reph_t.family == edit["family"]
        assert not W.is_rephrase_template(src_t.id) and reph_t.id == W.rephrase_template(edit["family"]).id
        assert rec["alt"] not in (edit["answer"], rec["pred"])
        assert rec["alt"] in (W.COLOURS if edit["family"] == "colour" else W.SHAPES)
        assert (rec["loc"], rec["loc_ans"]) in held_text
        for item in rec["eval_gen"]:
            im = by_path[item["image"]]
            assert (im.shape, im.colour) == (image.shape, image.colour) and item["answer"] == rec["alt"]
        assert len(rec["eval_gen"]) <= R.N_EXTRA and len(rec["eval_near_shape"]) == R.N_EXTRA
        paths = [rec["image"], rec["image_rephrase"], rec["m_loc"]] + [
            it["image"] for k in R.EXTRA_FIELDS if k != "eval_other_family" for it in rec[k]]
        assert len(paths) == len(set(paths))  # no image used twice in a record
        for item in rec["eval_other_family"]:
            assert item["image"] == rec["image"] and W.parse_question(item["question"])[0].family != edit["family"]


def test_near_miss_images_share_exactly_one_attribute(test_records):
    by_path = {R.image_relpath(im): im for im in W.images("test")}
    kinds = Counter()
    for rec in test_records:
        edit = rec["edit"]
        m_loc = by_path[rec["m_loc"]]
        shared = (m_loc.shape == edit["shape"]) + (m_loc.colour == edit["colour"])
        assert shared == 1
        kinds[edit["m_loc_kind"]] += 1
        assert (m_loc.shape == edit["shape"]) == (edit["m_loc_kind"] == "near_shape")
        template, slot = W.parse_question(rec["m_loc_q"])
        assert rec["m_loc_a"] == W.answer(template, slot, m_loc.shape, m_loc.colour)
        for key, same_shape, same_colour in (("eval_near_shape", True, False), ("eval_near_colour", False, True),
                                             ("eval_far", False, False)):
            for item in rec[key]:
                im = by_path[item["image"]]
                assert (im.shape == edit["shape"], im.colour == edit["colour"]) == (same_shape, same_colour)
                t, s = W.parse_question(item["question"])
                assert item["answer"] == W.answer(t, s, im.shape, im.colour)
    assert kinds["near_shape"] == kinds["near_colour"] == 30


def test_records_deterministic_under_seed_and_scopes_do_not_repeat(test_records):
    again = R.build_records("test", 60, seed=3)
    assert json.dumps(again, sort_keys=True) == json.dumps(test_records, sort_keys=True)
    other = R.build_records("test", 60, seed=4)
    assert json.dumps(other, sort_keys=True) != json.dumps(test_records, sort_keys=True)
    scopes = [(r["edit"]["shape"], r["edit"]["colour"], r["edit"]["family"]) for r in test_records]
    for i in range(len(scopes)):
        window = scopes[i:i + R.NO_REPEAT_WINDOW]
        assert len(set(window)) == len(window)


def test_train_records_and_pool_never_touch_test_or_held_out():
    train_records = R.build_records("train", 30, seed=1)
    held_text = {q.text for q in W.text_questions("heldout")}
    for rec in train_records:
        assert all(p.startswith("train/") for p in R.referenced_images([rec]))
        assert rec["loc"] not in held_text
        assert not W.is_rephrase_template(W.parse_question(rec["rephrase"])[0].id)
    pool = R.locality_pool(300, seed=1)
    assert len([e for e in pool if "image" in e]) == 300
    for entry in pool:
        assert entry["prompt"] not in held_text
        if "image" in entry:
            assert entry["image"].startswith("train/")
            question = entry["prompt"][len("Question: "):-len(" Short answer:")]
            assert not W.is_rephrase_template(W.parse_question(question)[0].id)
    assert R.locality_pool(300, seed=1) == pool


def test_copy_images_writes_pngs(tmp_path, test_records):
    rels = R.referenced_images(test_records[:2])
    assert R.copy_images(rels, str(tmp_path)) == len(rels)
    for rel in rels:
        with open(os.path.join(tmp_path, rel), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_training_layout_matches_the_adapter_forward():
    """base_model trains with rows laid out [image][pad][text]; EasyEdit calls the adapter, which
    lays them out [pad][image][text]: the answer logits must agree."""
    import torch

    from easyedit_odedit.benchmark import base_model as B
    from easyedit_odedit.benchmark.pixels import to_model_size
    from easyedit_odedit.models.tiny import tiny_conv_llama

    adapter = tiny_conv_llama(seed=0, image_size=32, tokenizer=B.build_tokenizer())
    torch.manual_seed(0)
    big = torch.randn(3, 3, 364, 364)
    small = to_model_size(big, 32)
    rows = [(W.image_prompt("what color is the shape?"), "red"),
            (W.image_prompt("does the image not contain a yellow shape?"), "no"),
            (W.image_prompt("what is the red shape?"), "circle")]
    with torch.no_grad():
        assert torch.allclose(adapter.encode_images(big), adapter.encode_images(small))
        batch = B._text_rows(adapter, B.RowEncoder(adapter.tokenizer), rows, adapter.encode_images(small))
        mine = adapter.decode(batch)[0]
        ref = adapter({"text_input": [f"{p} {a}" for p, a in rows], "image": big,
                       "prompts_len": [len(adapter.tokenizer.encode(p)) for p, _ in rows]})
    for m_logits, m_labels, r_logits, r_labels in zip(mine, batch.labels, ref.logits, ref.labels):
        k_m = (m_labels != -100).nonzero().flatten() - 1
        k_r = (r_labels != -100).nonzero().flatten() - 1
        assert torch.equal(m_labels[k_m + 1], r_labels[k_r + 1])
        assert torch.allclose(m_logits[k_m], r_logits[k_r], atol=1e-4)
