"""IKE as a MiniMMEdit baseline (easyedit_odedit/benchmark/ike.py): the local sentence model,
the train-only demonstration pool, EasyEdit's own multimodal IKE through ``MultimodalEditor`` on
the tiny model, the no-leakage check for a method without weights, and an IKE-only bench run."""
import json
import os

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import edit_kwargs

EVAL_STRINGS = ("rephrase", "loc")


def _train_records(n=6):
    colours = ["red", "blue", "green", "teal", "gray", "brown"]
    return [{"src": f"what color is the {shape} ?", "alt": colours[i % 6], "pred": colours[(i + 1) % 6],
             "rephrase": f"what is the color of the {shape} ?", "image": f"img/{i % 8}.png",
             "image_rephrase": f"img/{(i + 1) % 8}.png", "loc": f"what is {w} plus one ?", "loc_ans": "two",
             "m_loc": f"img/{(i + 2) % 8}.png", "m_loc_q": "what shape is in the image ?", "m_loc_a": "circle",
             "edit": {"split": "train"}}
            for i, (shape, w) in enumerate(zip(["circle", "triangle", "rectangle"] * 2, ["one"] * 6))][:n]


def test_embedder_is_deterministic_normalised_and_word_based(tmp_path):
    from sentence_transformers import SentenceTransformer  # after the plugin's torchvision shim

    from easyedit_odedit.benchmark import ike

    a = ike.hashed_ngram_vector("Question: what color is the circle? Short answer: red")
    assert torch.equal(a, ike.hashed_ngram_vector("question : WHAT color is the circle ? short answer : red"))
    assert a.norm().item() == pytest.approx(1.0) and a.shape == (512,)
    assert ike.hashed_ngram_vector("").norm().item() == 0.0
    same_scope = ike.hashed_ngram_vector("what color is the circle ? blue")
    other = ike.hashed_ngram_vector("what is two plus three ? five")
    assert float(a @ same_scope) > float(a @ other) > -1e-6
    # saved as a sentence-transformers model folder, loaded back the way EasyEdit loads it
    path = ike.save_sentence_model(str(tmp_path / "sm"))
    assert json.load(open(os.path.join(path, "modules.json")))[0]["type"].endswith("ike.HashedNgramEmbedder")
    with ike.sentence_model_scope():
        model = SentenceTransformer(path, device="cpu")
    texts = ["what color is the circle ? red", "what is two plus three ? five"]
    emb = model.encode(texts, convert_to_numpy=True)
    np.testing.assert_array_equal(emb, np.stack([ike.hashed_ngram_vector(t).numpy() for t in texts]))
    np.testing.assert_array_equal(emb, model.encode(texts, convert_to_numpy=True))


def test_sentence_scope_is_switched_off_afterwards(tmp_path):
    from easyedit_odedit.benchmark import ike

    try:
        from sentence_transformers.base.model import BaseModel
    except ImportError:
        pytest.skip("sentence-transformers without BaseModel")
    before = dict(getattr(BaseModel, "_module_classes", {}) or {})
    with ike.sentence_model_scope():
        pass
    assert dict(getattr(BaseModel, "_module_classes", {}) or {}) == before


def test_demonstrations_come_from_the_train_split_only():
    from easyedit_odedit.benchmark import ike

    train = _train_records()
    demos = ike.demonstrations(train)
    assert len(demos) == 3 * len(train)
    assert demos[0] == ("New Fact: Question: what color is the circle ? Short answer: red\n"
                        "Prompt: Question: what color is the circle ? Short answer: red\n\n")
    assert "Prompt: what is one plus one ? two" in demos[2]
    test_record = dict(train[0], edit={"split": "test"})
    with pytest.raises(ValueError, match="train split"):
        ike.demonstrations([test_record])


@pytest.fixture
def ike_setup(world, tmp_path):
    from easyedit_odedit.benchmark import ike

    train = ike.TrainSplit(_train_records())
    results = tmp_path / "results"
    sm = ike.save_sentence_model(str(results / "sm"))
    pool = ike.write_pool(sm, ike.demonstrations(train), str(results))
    hp = ike.ike_hparams(str(world / "model"), str(world), sm, str(results), k=2)
    return hp, train, pool


def test_ike_edits_through_easyedit_multimodal_editor(world, ike_setup):
    from easyeditor import MultimodalEditor

    from easyedit_odedit.benchmark import ike

    hp, train, pool = ike_setup
    assert os.path.isfile(pool) and pool == ike.embedding_path(hp.results_dir)
    editor = MultimodalEditor.from_hparams(hp)
    assert editor.alg_name == "IKE"
    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    seen = []
    original = editor.apply_algo

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    editor.apply_algo = spy
    kwargs = edit_kwargs(world)
    with ike.sentence_model_scope():
        metrics, _, _ = editor.edit(**kwargs, keep_original_weight=True, verbose=False, train_ds=train)
    post, pre = metrics[0]["post"], metrics[0]["pre"]
    for key in ("rewrite_acc", "rephrase_acc", "rephrase_image_acc"):
        assert 0.0 <= float(post[key]) <= 1.0 and 0.0 <= float(pre[key]) <= 1.0
    # EasyEdit's retrieval: k demonstrations from the train pool, then the new fact itself
    (icl,) = seen
    demos = ike.demonstrations(train)
    assert len(icl) == hp.k + 1 and all(d in demos for d in icl[:-1])
    assert icl[-1] == f"New Fact: {kwargs['prompts'][0]} green\nPrompt: {kwargs['prompts'][0]} green\n\n"
    # the nearest demonstrations are colour facts (the edit asks a colour question), never the arithmetic
    assert all("color" in d and "plus" not in d.split("Prompt:")[1] for d in icl[:-1])
    # the prompt never holds the record's evaluation fields
    text = "".join(icl)
    for field in ("rephrase_prompts",):
        assert kwargs[field][0] not in text
    assert kwargs["locality_inputs"]["text"]["prompt"][0] not in text
    assert kwargs["locality_inputs"]["vision"]["prompt"][0] not in text
    # IKE changes no weight
    assert all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())


def test_ike_context_ignores_the_evaluation_fields(world, ike_setup):
    """The bench's no-leakage check for IKE: swapping the record's evaluation fields leaves the
    retrieved context unchanged, and the context holds none of them."""
    from easyeditor import MultimodalEditor

    from easyedit_odedit.benchmark import ike
    from easyedit_odedit.benchmark.evaluation import Evaluation

    hp, train, _ = ike_setup
    editor = MultimodalEditor.from_hparams(hp)
    ev = Evaluation(editor, str(world))
    rec = lambda i, rephrase, loc, mq: {"src": "what color is the shape ?", "alt": "green", "image": f"img/{i}.png",  # noqa: E731
                                        "rephrase": rephrase, "image_rephrase": f"img/{i + 1}.png", "loc": loc,
                                        "loc_ans": "five", "m_loc": f"img/{i + 2}.png", "m_loc_q": mq, "m_loc_a": "red"}
    records = [(0, rec(0, "what is the colour of this shape ?", "what is two plus three ?", "what shape is present ?")),
               (1, rec(3, "which color does the shape have ?", "what is nine plus nine ?", "what is the red shape ?"))]
    check = ike.IkeMethod.leakage_check(hp, train, ev, records)
    assert check["records"] == 2 and check["bit_identical"] == 2 and check["context_free"] == 2
    # and the check can fail: a context that depended on the rephrase would differ
    req_a = ev.requests([records[0][1]])[0]
    req_b = dict(req_a, prompt=req_a["prompt"].replace("color", "shape"))
    assert ike.retrieve(hp, train, req_a) != ike.retrieve(hp, train, req_b)


def test_bench_runs_ike_alone(tmp_path):
    """An IKE-only bench on the shipped model: rows, report without a +ODEdit partner, leakage."""
    from easyedit_odedit.benchmark.runner import run_bench

    config = {"name": "ike-tiny", "seeds": [1], "records": {"n_train": 6, "n_test": 2, "pool_images": 40},
              "settings": {"single": {"n": 2}, "sequential": {"T": [2], "chunks": 1}}, "hosts": {},
              "ike": {"k": 1}, "leakage_check": 2}
    path = tmp_path / "ike.yaml"
    path.write_text(yaml.safe_dump(config))
    res = run_bench(str(path), str(tmp_path / "out"), progress=False)
    assert set(res["summary"]) == {"single"}  # IKE is single editing only
    assert set(res["summary"]["single"]) == {"IKE"}
    assert res["paired"] == {}
    rows = res["per_edit"]
    assert len(rows) == 2 and all(r["method"] == "IKE" and not r["odedit"] for r in rows)
    for r in rows:
        for m in ("rel", "t_gen", "i_gen", "t_loc", "i_loc", "gen", "near", "far", "other_family", "hm"):
            assert 0.0 <= r[m] <= 1.0, (m, r[m])
        assert r["ike_k"] == 1 and r["ike_positions"] > 64  # EasyEdit's IKE rows exceed the model's 64 positions
        assert r["edit_s"] > 0
    assert res["leakage"]["IKE"]["1"]["bit_identical"] == 2 and res["leakage"]["IKE"]["1"]["context_free"] == 2
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| IKE | 2 |" in md and "no +ODEdit partner" in md
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    assert os.path.isfile(tmp_path / "out" / "ike" / "seed1" / "IKE" / "embedding" / "minimmedit_vqa_embeddings.pkl")
