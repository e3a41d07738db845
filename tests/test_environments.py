"""Near misses: the nearest pool images that do not show the edit's content (to the unedited model)."""
import torch

from easyedit_odedit.environments import EnvironmentBuilder, Row
from easyedit_odedit.odedit.odedit_hparams import EnvironmentSettings

EDIT_Q, OWN_Q = "what color is the shape ?", "what shape is in the image ?"


def _image(value):
    return torch.full((3, 8, 8), float(value))


def test_the_near_miss_is_the_nearest_image_of_other_content_and_same_content_is_left_out():
    """Pool images 0..5 at increasing feature distance; 0 and 2 show the edit's content (the
    model answers both questions on them as on the edit image), 1 and 3 differ in colour or shape.
    Candidates are probed nearest first until enough near misses are found (here 0 and 1)."""
    edit_image = _image(0)
    content = {0: ("red", "circle"), 1: ("blue", "circle"), 2: ("red", "circle"), 3: ("red", "square"),
               4: ("green", "square"), 5: ("gray", "circle")}
    candidates = [Row("OUT_image", OWN_Q, content[i][1], _image(i + 1)) for i in range(6)]

    def features(images):
        return torch.stack([im.mean().view(1) for im in images])  # distance = value difference

    def answers(probes):
        def seen(image):
            value = int(image.mean().item())
            return ("red", "circle") if value == 0 else content[value - 1]
        return [seen(p.image)[0] if p.prompt == EDIT_Q else seen(p.image)[1] for p in probes]

    settings = EnvironmentSettings(out_image=2, pool_factor=2, near_miss_share=0.5)  # quota 4: 1 near image
    builder = EnvironmentBuilder(settings, None, "", seed=0)
    view = {"prompt": EDIT_Q, "target": "green", "image": edit_image}

    rows = builder.near_and_far(view, [], candidates, features, answers)
    used = {int(r.image.mean().item()) - 1 for r in rows}
    near = {int(r.image.mean().item()) - 1 for r in rows if r.env == "OUT_near"}
    assert near == {1}  # the nearest image that differs; 0 (nearer) shows the same content
    assert used.isdisjoint({0})  # same content (found while looking for near misses) never kept as it was
    assert [r.target for r in rows if r.env == "OUT_near" and r.prompt == EDIT_Q] == ["blue"]  # the probe's answer

    without = builder.near_and_far(view, [], candidates, features)  # no model to ask: distance only
    assert {int(r.image.mean().item()) - 1 for r in without if r.env == "OUT_near"} == {0}


def test_same_content_asks_both_questions_on_both_images():
    seen_probes = []

    def answers(probes):
        seen_probes.extend((p.prompt, int(p.image.mean().item())) for p in probes)
        return ["x"] * len(probes)

    view = {"prompt": EDIT_Q, "image": _image(0)}
    same = EnvironmentBuilder.same_content(view, [Row("OUT_image", OWN_Q, "a", _image(7))], answers)
    assert same == [(True, "x")]  # every answer agrees
    assert sorted(seen_probes) == sorted([(EDIT_Q, 0), (EDIT_Q, 7), (OWN_Q, 0), (OWN_Q, 7)])


def test_pool_prompts_follow_the_file_kind(tmp_path):
    """E-VQA ``src`` fields are questions (templated, as VQADataset does); E-IC's are caption
    prompts (bare, as CaptionDataset does); ``m_loc_q`` is a question in both."""
    import json

    from easyedit_odedit.environments import VQA_TEMPLATE, load_locality_pool

    def pool(name, src):
        path = tmp_path / name
        path.write_text(json.dumps([{"image": "a.png", "src": src, "pred": "x", "m_loc": "b.png",
                                     "m_loc_q": "what is it?", "m_loc_a": "y"}]))
        return {e.prompt for e in load_locality_pool(str(path), str(tmp_path))}

    assert pool("vqa.json", "what color is it?") == {VQA_TEMPLATE.format("what color is it?"),
                                                     VQA_TEMPLATE.format("what is it?")}
    assert pool("caption.json", "a photo of") == {"a photo of", VQA_TEMPLATE.format("what is it?")}


def test_unedited_answers_decode_sub_word_tokens_together():
    """A greedy answer of several sub-word tokens is decoded as one string ("sunflower"), not
    joined with spaces ("sun flower"), so it re-tokenises to what the model produced."""
    from types import SimpleNamespace

    from easyedit_odedit.odedit.rows import unedited_answers

    pieces = {7: "sun", 8: "flower"}

    class Tokenizer:
        def __call__(self, text):
            return {"input_ids": text.split()}

        def decode(self, ids, skip_special_tokens=False):
            return "".join(pieces[i] for i in ids)

    steps = iter([7, 8])

    class Adapter:
        tokenizer = Tokenizer()

        def embed(self, texts, images, lens):
            return SimpleNamespace()

        def decode(self, batch, tail=None):
            logits = torch.zeros(1, 1, 10)
            logits[0, 0, next(steps)] = 1.0
            return logits, None

    assert unedited_answers(Adapter(), [Row("probe", "what is it ?", None)], n_tokens=2) == ["sunflower"]


def test_pool_image_cache_processes_once_and_evicts_the_least_recent_by_bytes():
    from easyedit_odedit.environments import ImageCache

    made = []

    def make(i):
        def build():
            made.append(i)
            return torch.zeros(100, dtype=torch.float32)  # 400 bytes
        return build

    cache = ImageCache(max_bytes=1000)  # room for two
    a = cache.get(("a",), make("a"))
    assert cache.get(("a",), make("a")) is a and made == ["a"]
    cache.get(("b",), make("b"))
    cache.get(("a",), make("a"))  # a is now the most recent
    cache.get(("c",), make("c"))  # over budget: b, the least recent, goes
    assert len(cache) == 2 and cache.bytes == 800
    cache.get(("a",), make("a"))
    cache.get(("b",), make("b"))
    assert made == ["a", "b", "c", "b"]
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
