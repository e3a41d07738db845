"""The caches of what an edit cannot change give the same logits as the full model, after the
edited parameters move; the structural check of ``LastModuleCache`` can fail, and then ODEdit
falls back to the layer-level cache."""
import pytest
import torch

from easyedit_odedit import ODEditHyperParams
from easyedit_odedit.environments import Row
from easyedit_odedit.models.loading import load_adapter
from easyedit_odedit.odedit.objective import EditRows, _select, make_prefix_cache
from easyedit_odedit.prefix_cache import LastModuleCache, PrefixCache
from easyedit_odedit.hosts import build_host
from tests.conftest import PROMPT, write_yaml

CASES = {  # host, host_hparams, the cache it gets
    "FT-L top MLP": ("FT-L", {"layers": [-1], "modules": ["mlp"]}, LastModuleCache),
    "FT-L top attention": ("FT-L", {"layers": [-1], "modules": ["self_attn"]}, PrefixCache),
    "FT-L top layer, both": ("FT-L", {"layers": [-1], "modules": ["mlp", "self_attn"]}, PrefixCache),
    "FT-L from layer 0": ("FT-L", {"layers": [0, -1], "modules": ["mlp"]}, type(None)),  # nothing below
    "LoRA top MLP": ("LoRA", {"layers": [-1], "rank": 2}, LastModuleCache),
}


def _rows(world):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    other = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    return [Row("IN", PROMPT, "green", image), Row("SE_text", "what color is the shape ?", "green", image),
            Row("OUT_text", "what is two plus two ?", "four"), Row("OUT_near", PROMPT, "red", other)]


def _setup(world, host, host_hparams):
    hp = ODEditHyperParams.from_hparams(write_yaml(world, host, {**host_hparams, "num_steps": 1, "lr": 0.1}))
    adapter = load_adapter(str(world / "model"))
    host_obj = build_host(hp)
    touched = host_obj.touched(adapter)
    rows = EditRows(adapter, _rows(world), "answer", make_prefix_cache(adapter, touched, hp))
    return adapter, host_obj, rows


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_decode_matches_the_full_model_after_the_edit_moves(world, case):
    host, host_hparams, expected = CASES[case]
    adapter, host_obj, rows = _setup(world, host, host_hparams)
    assert type(rows.cache) is expected
    params = host_obj.prepare(adapter)  # LoRA injects its adapters only now, after the capture
    gen = torch.Generator().manual_seed(2)
    idx = torch.tensor([3, 0, 2])
    batch = _select(rows.embedded, idx)
    with torch.no_grad():
        before = adapter.decode(batch, tail=rows.tail)[0]
        for p in params.values():
            p.add_(0.5 * p.abs().mean().clamp(min=0.05) * torch.randn(p.shape, generator=gen))
        cache = rows.cache
        cached_hidden = (cache.hidden_states(adapter, batch, idx, tail=rows.tail) if cache is not None
                         else adapter.decode_hidden(batch, tail=rows.tail))
        cached_logits = adapter.lm_head()(cached_hidden)
        full_logits, full_hidden = adapter.decode(batch, tail=rows.tail)
    host_obj.finalize(adapter)
    assert not torch.allclose(full_logits, before, atol=1e-3)  # the edit moved them: a stale cache would fail
    assert torch.allclose(cached_logits, full_logits, atol=1e-5, rtol=1e-4)
    assert torch.allclose(cached_hidden, full_hidden, atol=1e-5, rtol=1e-4)


def test_a_wrong_structure_is_detected_and_the_layer_cache_is_used(world, monkeypatch):
    """A post-norm-like layer (its output is *not* residual + MLP output) must fail the check."""
    from easyedit_odedit.prefix_cache import decoder_layers

    adapter = load_adapter(str(world / "model"))
    _, layers = decoder_layers(adapter.language_model)
    last = layers[-1]
    plain = type(last).forward

    def post_norm(self, *args, **kwargs):
        out = plain(self, *args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = torch.nn.functional.layer_norm(hidden, hidden.shape[-1:])
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    monkeypatch.setattr(last, "forward", post_norm.__get__(last))
    hp = ODEditHyperParams.from_hparams(write_yaml(world, "FT-L", {"layers": [-1], "num_steps": 1, "lr": 0.1}))
    touched = build_host(hp).touched(adapter)
    cache = make_prefix_cache(adapter, touched, hp)
    assert isinstance(cache, LastModuleCache)
    rows = EditRows(adapter, _rows(world), "answer", cache)
    assert type(rows.cache) is PrefixCache


def test_the_unedited_pass_runs_text_rows_apart_and_gives_what_one_batch_gives(world):
    """The set-up runs the rows with an image and the text rows as two batches (a text row padded to
    an image row's width would cost as much as one); the OUT references are those of one batch."""
    adapter = load_adapter(str(world / "model"))
    rows = EditRows(adapter, _rows(world), "all")
    widths = rows.embedded.attention_mask.sum(1)
    assert rows.with_image.tolist() == [True, True, False, True]
    assert widths[2] < widths.max() / 2  # the text row is the short one the split is for
    with torch.no_grad():
        logits, _ = adapter.decode(rows.embedded, tail=rows.tail)
    one_batch = torch.log_softmax(logits[rows.compare_tail].float(), -1)
    assert rows.pre_log_probs.shape == one_batch.shape and rows.compare_tail[2].any()
    assert torch.allclose(rows.pre_log_probs, one_batch, atol=1e-5)


STEP_CASES = {  # host, host_hparams, each row's kind (IN, SE_text, OUT_text, OUT_near)
    "FT-V projector": ("FT-V", {"modules": ["projector"]}, ["image", "image", "fixed", "image"]),
    "FT-L top attention": ("FT-L", {"layers": [-1], "modules": ["self_attn"]}, ["image", "image", "text", "image"]),
    "FT-L from layer 0": ("FT-L", {"layers": [0, -1], "modules": ["mlp"]}, ["image", "image", "text", "image"]),
}


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_a_step_runs_text_rows_apart_and_reads_as_the_whole_model(world, case):
    """A step runs the rows with an image and the text rows as two batches, each as wide as its
    own rows; rows the edit cannot reach (FT-V's text rows: the projector is not on their path)
    run once an edit. After the edited parameters move, what the step reads is the whole model's
    over one batch."""
    from easyedit_odedit.odedit.objective import ODEditObjective

    host, host_hparams, kinds = STEP_CASES[case]
    adapter, host_obj, rows = _setup(world, host, host_hparams)
    params = host_obj.prepare(adapter)
    hp = ODEditHyperParams.from_hparams(write_yaml(world, host, {**host_hparams, "num_steps": 1}))
    objective = ODEditObjective(adapter, rows, params, hp, lr=0.1)
    assert objective.kind == kinds
    gen = torch.Generator().manual_seed(2)
    idx = [3, 2, 0]
    with torch.no_grad():
        before = adapter.decode_hidden(rows.embed(idx), rows.tail)
        for p in params.values():
            p.add_(0.5 * p.abs().mean().clamp(min=0.05) * torch.randn(p.shape, generator=gen))
        labels, hidden = objective.forward(idx)
        full = adapter.decode_hidden(rows.embed(idx), rows.tail)
    host_obj.finalize(adapter)
    assert not torch.allclose(full[[0, 2]], before[[0, 2]], atol=1e-3)  # the image rows moved
    assert torch.equal(labels, rows.embedded.labels[idx][:, -rows.tail:])
    assert torch.allclose(hidden, full, atol=1e-5, rtol=1e-4)


def test_an_edit_that_reaches_the_decoder_too_runs_every_text_row(world):
    from easyedit_odedit.odedit.objective import ODEditObjective

    adapter, host_obj, rows = _setup(world, "FT-V", {"modules": ["projector"]})
    params = host_obj.prepare(adapter)
    hp = ODEditHyperParams.from_hparams(write_yaml(world, "FT-V", {"modules": ["projector"], "num_steps": 1}))
    named = dict(adapter.named_parameters())
    decoder_param = next(n for n in named if n.startswith("language_model.") and ".layers." in n)
    objective = ODEditObjective(adapter, rows, dict(params, **{decoder_param: named[decoder_param]}), hp, lr=0.1)
    host_obj.finalize(adapter)
    assert objective.kind == ["image", "image", "text", "image"]
