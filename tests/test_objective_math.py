"""Risks and penalty against values worked out independently."""
import math

import pytest
import torch

from easyedit_odedit import penalty as tv
from easyedit_odedit import risks


def test_mmd_is_zero_for_identical_sets_and_grows_with_a_shift():
    torch.manual_seed(0)
    z = torch.randn(6, 8)
    assert risks.generality_mmd(z, z.clone(), [0.5, 1.0, 2.0]).abs().item() < 1e-6
    values = [risks.generality_mmd(z, z + shift, [0.5, 1.0, 2.0]).item() for shift in (0.1, 0.5, 2.0)]
    assert 0 < values[0] < values[1] < values[2]


def test_mmd_single_samples_matches_closed_form():
    # one sample each, one bandwidth: the median distance is d itself, so k(a,b) = exp(-1/2)
    a, b = torch.zeros(1, 3), torch.tensor([[3.0, 4.0, 0.0]])
    assert math.isclose(risks.generality_mmd(a, b, [1.0]).item(), 2 - 2 * math.exp(-0.5), rel_tol=1e-5)
    assert risks.generality_mmd(a, b[:0], [1.0]).item() == 0.0


def test_kl_is_zero_when_nothing_changed_and_matches_definition():
    logits = torch.randn(5, 11)
    pre = torch.log_softmax(logits, -1)
    for direction in ("post_pre", "pre_post"):
        assert risks.locality_kl(logits, pre, direction).abs().item() < 1e-6
    post = torch.randn(5, 11)
    p, q = torch.softmax(post, -1), torch.softmax(logits, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(risks.locality_kl(post, pre, "post_pre"), expected, atol=1e-6)


def test_tv_penalty_matches_finite_differences():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7)
    labels = torch.randint(0, 7, (2, 4))

    def env_risks(s):
        return [torch.nn.functional.cross_entropy(s * logits[i], labels[i]) for i in range(2)]

    scale = tv.omega()
    penalty = tv.tv_penalty(env_risks(scale), scale)
    eps = 1e-3
    grads = [(hi - lo) / (2 * eps) for hi, lo in zip(env_risks(torch.tensor(1 + eps)), env_risks(torch.tensor(1 - eps)))]
    expected = (sum(abs(g.item()) for g in grads) / 2) ** 2
    assert math.isclose(penalty.item(), expected, rel_tol=1e-3)
    assert penalty.requires_grad  # created with create_graph: the penalty can be minimised


def test_lambda_is_nonnegative_bounded_and_ascends():
    lam = tv.LagrangeMultiplier(hidden=8, init=1.0, max_value=3.0)
    features = torch.tensor([0.5, 2.0])
    assert abs(lam(features).item() - 1.0) < 0.05
    for _ in range(200):  # relentless ascent while the penalty exceeds its tolerance
        lam.ascend(lam(features), constraint=5.0, lr=10.0)
    final = lam(features).item()
    assert 1.0 < final <= 3.0
    for _ in range(400):  # penalty below tolerance: lambda comes down again, never below 0
        lam.ascend(lam(features), constraint=-5.0, lr=10.0)
    assert 0.0 <= lam(features).item() < final
    for extreme in (torch.full((2,), 1e6), torch.full((2,), -1e6)):
        assert 0.0 <= lam(extreme).item() <= 3.0


def test_one_scale_per_environment_gives_the_same_penalty_in_one_call():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 7)
    labels = torch.randint(0, 7, (3, 4))
    shared = tv.omega()
    scalar = tv.tv_penalty([torch.nn.functional.cross_entropy(shared * logits[i], labels[i]) for i in range(3)], shared)
    per_env = tv.omega(3)
    vector = tv.tv_penalty([torch.nn.functional.cross_entropy(per_env[i] * logits[i], labels[i]) for i in range(3)],
                           per_env)
    assert torch.allclose(scalar, vector, rtol=1e-5)


@pytest.mark.parametrize("direction", ["post_pre", "pre_post"])
def test_closed_form_omega_gradients_match_autograd_and_finite_differences(direction):
    """ODEdit's step computes dR_e/d omega in closed form (no create_graph): the values and the
    penalty's own gradient must equal the autograd construction, and a finite difference."""
    torch.manual_seed(3)
    logits = torch.randn(6, 9, requires_grad=True)  # 6 compared positions, vocabulary 9
    targets = torch.randint(0, 9, (6,))
    pre = torch.log_softmax(torch.randn(6, 9), -1)

    def env_risks(s):  # env 0: NLL on positions 0-2; env 1: KL on positions 3-5
        return [torch.nn.functional.cross_entropy(s * logits[:3], targets[:3]),
                risks.locality_kl(s * logits[3:], pre[3:], direction)]

    scale = tv.omega()
    reference = tv.tv_penalty(env_risks(scale), scale)
    values, grads = tv.risks_and_omega_gradients(logits, targets[:3], pre[3:], direction)
    assert torch.allclose(torch.stack([values[:3].mean(), values[3:].mean()]), torch.stack(env_risks(1.0)), rtol=1e-5)
    closed = torch.stack([grads[:3].mean(), grads[3:].mean()])
    eps = 1e-3
    finite = [(hi - lo).item() / (2 * eps) for hi, lo in zip(env_risks(torch.tensor(1 + eps)),
                                                              env_risks(torch.tensor(1 - eps)))]
    assert torch.allclose(closed, torch.tensor(finite), rtol=1e-3, atol=1e-5)
    penalty = tv.tv_from_gradients(closed)
    assert torch.allclose(penalty, reference, rtol=1e-5)
    (grad_closed,) = torch.autograd.grad(penalty, logits)
    (grad_reference,) = torch.autograd.grad(reference, logits)
    assert torch.allclose(grad_closed, grad_reference, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("direction", ["post_pre", "pre_post"])
@pytest.mark.parametrize("n_nll,n_kl", [(3, 4), (0, 5), (5, 0)])
def test_closed_form_backward_of_the_risks_and_omega_gradients_matches_autograd(direction, n_nll, n_kl):
    """The step's risks and omega-gradients carry their own backward (four passes over the vocabulary
    instead of autograd's graph of a dozen): both outputs' Jacobians must be the numerical ones, with
    NLL positions only, KL positions only, or both."""
    torch.manual_seed(5)
    logits = (3 * torch.randn(n_nll + n_kl, 11, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 11, (n_nll,))
    pre = torch.log_softmax(3 * torch.randn(n_kl, 11, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda z: tv.risks_and_omega_gradients(z, targets, pre, direction), (logits,))


def test_risks_and_omega_gradients_of_bf16_logits_come_back_in_bf16_from_float32_arithmetic():
    torch.manual_seed(6)
    logits = (3 * torch.randn(4, 50)).bfloat16().requires_grad_()
    pre = torch.log_softmax(torch.randn(2, 50), -1)
    values, grads = tv.risks_and_omega_gradients(logits, torch.tensor([1, 2]), pre)
    assert values.dtype == grads.dtype == torch.float32
    reference = tv.risks_and_omega_gradients(logits.detach().float(), torch.tensor([1, 2]), pre)
    assert torch.equal(values, reference[0]) and torch.equal(grads, reference[1])
    (values.sum() + grads.sum()).backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_an_unknown_kl_direction_is_refused():
    with pytest.raises(ValueError, match="direction"):
        tv.risks_and_omega_gradients(torch.zeros(1, 3), torch.tensor([0]), torch.zeros(0, 3), "both")
