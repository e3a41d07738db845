"""MMEdit's E-IC (image captioning) files, unchanged, through EasyEdit's ``CaptionDataset`` and
through ODEdit's own use of a train split (the edit-time locality pool). E-VQA through
``VQADataset`` is covered by tests/test_trainer.py and the pool tests; this is the caption half.

The records have exactly E-IC's keys (``caption_train_edit.json``): a caption prompt ``src``, the
model's caption ``pred``, the new caption ``alt``, a rephrased prompt and image, a text locality
pair and a VQA-style multimodal locality triple; the images are made in the test.
"""
import json

import torch

from easyedit_odedit import ODEditHyperParams, compat
from easyedit_odedit.environments import load_locality_pool
from tests.conftest import write_yaml

E_IC_KEYS = {"src", "pred", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q",
             "m_loc_a"}


def caption_json(path, n):
    records = [{"src": "a photo of", "pred": "a red circle", "alt": ["a green circle", "a blue triangle"][i % 2],
                "rephrase": "an image of", "image": f"img/{i % 6}.png", "image_rephrase": f"img/{(i + 1) % 6}.png",
                "loc": "what is two plus two ?", "loc_ans": "four", "m_loc": f"img/{(i + 2) % 6}.png",
                "m_loc_q": "what shape is in the image ?", "m_loc_a": "circle"} for i in range(n)]
    assert all(set(r) == E_IC_KEYS for r in records)
    path.write_text(json.dumps(records))
    return str(path)


def test_e_ic_file_loads_unchanged_through_caption_dataset(world, tmp_path):
    hp = ODEditHyperParams.from_hparams(write_yaml(world))
    CaptionDataset = compat.module("dataset.coco_caption").CaptionDataset
    records = json.loads(open(caption_json(tmp_path / "caption_train_edit.json", 4)).read())
    ds = CaptionDataset(str(tmp_path / "caption_train_edit.json"), config=hp)
    assert len(ds) == len(records)
    for item, record in zip(ds, records):
        assert (item["prompt"], item["target"], item["rephrase_prompt"]) == (record["src"], record["alt"], record["rephrase"])
        assert (item["locality_prompt"], item["multimodal_locality_prompt"]) == (record["loc"], record["m_loc_q"])
        assert item["image"].shape[0] == 3 and item["multimodal_locality_image"].shape == item["image"].shape
    with compat.cpu_redirect():  # the collate moves tensors to cuda:{device}, as inside EasyEdit's trainer
        batch = ds.collate_fn([ds[0], ds[1]])
    assert batch["edit_inner"]["text_input"][0].startswith(records[0]["src"])  # captions: no VQA template


def test_odedit_edits_a_caption_record_with_the_e_ic_train_split_as_locality_pool(world, tmp_path):
    from easyeditor import MultimodalEditor

    train = caption_json(tmp_path / "caption_train_edit.json", 6)
    pool = load_locality_pool(train, str(world))
    assert {e.answer for e in pool} >= {"four", "circle", "a red circle"}  # loc, m_loc and the records' own captions
    hp = ODEditHyperParams.from_hparams(write_yaml(world, host_hparams={"layers": [-1], "num_steps": 2, "lr": 0.1},
                                                   environments={"locality_pool": train}))
    record = json.loads(open(caption_json(tmp_path / "caption_eval_edit.json", 1)).read())[0]
    image = lambda key: str(world / record[key])  # noqa: E731  (absolute: both EasyEdit versions read it)
    editor = MultimodalEditor.from_hparams(hp)
    before = {k: v.clone() for k, v in editor.model.state_dict().items()}
    metrics, _, _ = editor.edit(
        prompts=[record["src"]], targets=[record["alt"]], image=[image("image")],
        rephrase_prompts=[record["rephrase"]], rephrase_image=[image("image_rephrase")],
        locality_inputs={"text": {"prompt": [record["loc"]], "ground_truth": [record["loc_ans"]]},
                         "vision": {"image": [image("m_loc")], "prompt": [record["m_loc_q"]],
                                    "ground_truth": [record["m_loc_a"]]}},
        keep_original_weight=True, verbose=False)
    assert 0.0 <= float(metrics[0]["post"]["rewrite_acc"]) <= 1.0
    assert all(torch.equal(before[k], v) for k, v in editor.model.state_dict().items())
