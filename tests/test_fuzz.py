"""Property test (issue #5): whatever the request and the hparams, ODEdit's apply function either
edits - and the returned restore brings the weights back bit-identically - or raises ODEditError /
ODEditNumericalError with the weights untouched. Never anything else."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from easyedit_odedit import ODEditError, ODEditHyperParams, ODEditNumericalError
from easyedit_odedit.models.loading import load_adapter
from easyedit_odedit.models.tiny import TINY_VOCAB_TEXT
from easyedit_odedit.odedit.odedit_main import apply_odedit_to_multimodal_model
from tests.conftest import PROMPT

VOCAB = sorted(set(TINY_VOCAB_TEXT.split()))
JUNK = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


def words(min_size, max_size):
    return st.lists(st.sampled_from(VOCAB), min_size=min_size, max_size=max_size).map(" ".join)


@st.composite
def images(draw):
    kind = draw(st.sampled_from(["none"] * 2 + ["tensor"] * 7 + ["not-a-tensor"]))
    if kind == "none":
        return None
    if kind == "not-a-tensor":
        return draw(st.sampled_from(["/img/0.png", [0.5] * 3, 3]))
    channels = draw(st.sampled_from([3, 3, 3, 3, 1, 4]))
    height, width = draw(st.integers(0, 48)), draw(st.integers(0, 48))
    shape = [channels, height, width]
    shape = draw(st.sampled_from([shape, shape, shape, [1, *shape], [2, *shape], shape[1:]]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16, torch.uint8]))
    fill = draw(st.sampled_from(["random"] * 5 + ["zeros", "nan", "inf", "huge"]))
    image = torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16))))
    if fill == "zeros":
        image = torch.zeros(shape)
    elif fill == "nan" and image.numel():
        image.view(-1)[draw(st.integers(0, image.numel() - 1))] = math.nan
    elif fill == "inf" and image.numel():
        image.view(-1)[0] = math.inf
    elif fill == "huge":
        image = image * 1e4
    return (image * 255).to(dtype) if dtype is torch.uint8 else image.to(dtype)


HOSTS = {"FT-L": lambda steps, lr: {"layers": [-1], "num_steps": steps, "lr": lr},
         "FT-V": lambda steps, lr: {"num_steps": steps, "lr": lr, "modules": ["projector"]},
         "LoRA": lambda steps, lr: {"layers": [-1], "num_steps": steps, "lr": lr, "rank": 2}}


# Values ODEditHyperParams must reject; one of them is slipped into a fifth of the configs.
INVALID = [("environments", "pool_factor", 0), ("environments", "se_text", -1),
           ("environments", "near_miss_share", 1.5), ("penalty", "lambda_input", "bogus"),
           ("penalty", "lambda_max", -1.0), ("penalty", "lambda_init", 20.0), ("risks", "kl_direction", "sideways"),
           ("risks", "mmd_bandwidths", []), ("optimiser", "steps", -1), ("penalty", "warmup_steps", "3")]


@st.composite
def configs(draw, world):
    host = draw(st.sampled_from(sorted(HOSTS)))
    lr = draw(st.sampled_from([0.1, 0.1, 0.1, 1e-3, 0.0, 1e30]))
    count = st.integers(0, 3)
    environments = {"se_text": draw(count), "se_image": draw(count), "se_joint": draw(st.integers(0, 2)),
                    "out_text": draw(count), "out_image": draw(st.integers(0, 2)),
                    "pool_factor": draw(st.integers(1, 2)),
                    "near_miss_share": draw(st.sampled_from([0.0, 0.5, 1.0])),
                    "locality_pool": draw(st.sampled_from([str(world / "pool.json"), None]))}
    penalty = {"weight": draw(st.sampled_from([0.0, 1.0, 1e3])), "warmup_steps": draw(st.integers(0, 3)),
               "lambda_input": draw(st.sampled_from(["delta_norms", "edit_hidden", "constant"])),
               "lambda_init": draw(st.sampled_from([0.0, 1.0, 9.99])), "dual_lr": draw(st.sampled_from([0.01, 10.0]))}
    risks = {"kl_direction": draw(st.sampled_from(["post_pre", "pre_post"])),
             "kl_positions": draw(st.sampled_from(["answer", "all"])),
             "mmd_feature": draw(st.sampled_from(["last_prompt_token", "answer_mean"])),
             "mmd_detach_edit": draw(st.booleans())}
    optimiser = {"cache_prefix": draw(st.booleans()), "grad_clip": draw(st.sampled_from([1.0, 0.0]))}
    config = {"alg_name": "ODEdit", "host": host, "host_hparams": HOSTS[host](draw(st.integers(0, 3)), lr),
              "enabled": draw(st.sampled_from([True, True, True, False])), "coco_image": str(world),
              "environments": environments, "penalty": penalty, "risks": risks, "optimiser": optimiser}
    if draw(st.integers(0, 4)) == 0:
        section, key, value = draw(st.sampled_from(INVALID))
        config[section][key] = value
    return config


@st.composite
def requests(draw):
    prompt = draw(st.one_of(st.just(PROMPT), words(1, 10), words(1, 10), JUNK))
    target = draw(st.one_of(st.sampled_from(["green", "red", "circle", "yes"]), words(1, 3), words(1, 3), JUNK))
    request = {"prompt": prompt, "target": target, "image": draw(images())}
    if draw(st.booleans()):  # evaluation fields an editor never reads
        request.update(rephrase_prompt=draw(JUNK), locality_prompt=draw(JUNK), locality_ground_truth=draw(JUNK))
    return request


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def model(world):
    return load_adapter(str(world / "model"))


def test_every_input_edits_and_restores_or_raises_odedit_errors(model, world):
    @settings(max_examples=25, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(config=configs(world), request=requests())
    def check(config, request):
        before = state(model)
        try:
            hparams = ODEditHyperParams.from_dict(config)
            _, restore = apply_odedit_to_multimodal_model(model, model.tokenizer, [request], hparams,
                                                          keep_original_weight=True)
        except (ODEditError, ODEditNumericalError):
            assert same(before, state(model)), "a rejected edit changed the weights"
            return
        restore()
        assert same(before, state(model)), "restore() did not bring the weights back bit-identically"

    check()


# Crashes fuzzing once found outside the request checks (each raised something other than
# ODEditError); they are now rejected when the hparams load, with the field named.
FORMER_CRASHES = [
    ("optimizer-unknown", {"host_hparams": {"optimizer": "Nope"}}, "AttributeError at odedit/objective.py:65",
     AttributeError),
    ("lr-negative", {"host_hparams": {"lr": -0.1}}, "torch's ValueError at odedit/objective.py:65", ValueError),
    ("lora-rank-0", {"host": "LoRA", "host_hparams": {"rank": 0}}, "peft's ValueError at hosts/builtin.py:134",
     ValueError),
    ("templates-empty", {"environments": {"templates": []}}, "IndexError at environments.py:70", IndexError),
    ("templates-unknown-field", {"environments": {"templates": ["{question}"]}}, "KeyError at environments.py:71",
     KeyError),
    ("crop-scale-one-value", {"environments": {"crop_scale": [0.5]}}, "TypeError at environments.py:118", TypeError),
    ("seed-not-a-number", {"seed": "abc"}, "ValueError at odedit/odedit_main.py:76", ValueError),
]


@pytest.mark.parametrize("change", [pytest.param(c, id=i) for i, c, r, e in FORMER_CRASHES])
def test_former_hparams_crashes_are_clear_errors(model, world, change):
    config = {"alg_name": "ODEdit", "host": change.get("host", "FT-L"),
              "host_hparams": dict({"layers": [-1], "num_steps": 1, "lr": 0.1}, **change.get("host_hparams", {})),
              "coco_image": str(world),
              "environments": dict({"pool_factor": 1, "out_image": 0}, **change.get("environments", {}))}
    config.update({k: v for k, v in change.items() if k not in config})
    before = state(model)
    try:
        hparams = ODEditHyperParams.from_dict(config)
        _, restore = apply_odedit_to_multimodal_model(
            model, model.tokenizer, [{"prompt": PROMPT, "target": "green", "image": torch.rand(3, 16, 16)}], hparams,
            keep_original_weight=True)
        restore()
    except ODEditError:
        return  # the fix: a message naming the field
    finally:
        assert same(before, state(model))
    pytest.fail("edited without complaint")
