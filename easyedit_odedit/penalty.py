"""The IRM-TV penalty and its learned multiplier (paper Eqs. 9-13).

omega is a scalar "environment classifier" multiplying the logits, evaluated at 1.0. For each
environment e the risk's gradient g_e = dR_e/d omega is taken with create_graph, so the penalty
(mean_e |g_e|)^2 can itself be minimised. The multiplier lambda = softplus(MLP(features)) is a
Lagrange multiplier: the edited parameters descend on G = R + lambda * TV while the MLP ascends
(primal-dual, Eq. 13). lambda is projected into [0, lambda_max], so it can never run away or go
negative.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def omega(n_envs: int = 0, device=None) -> torch.Tensor:
    """The dummy classifier scale at 1.0 (IRM's w = 1.0): a scalar shared by every environment, or
    one entry per environment (``n_envs``), which gives every dR_e/d omega_e from one gradient call."""
    shape = (n_envs,) if n_envs else ()
    return torch.ones(shape, device=device, requires_grad=True)


def tv_penalty(env_risks: Sequence[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """(mean_e |dR_e/d omega|)^2, differentiable in the model parameters (TV-l1, Eq. 9).

    With a scalar ``scale`` each environment's gradient is its own autograd call; with one scale per
    environment (risk e depends on scale[e] only) a single call on the summed risk yields them all."""
    env_risks = [r for r in env_risks if r.requires_grad]
    if not env_risks:
        return scale.sum() * 0.0
    if scale.dim() == 0:
        grads = torch.stack([torch.autograd.grad(r, scale, create_graph=True)[0] for r in env_risks])
    else:
        grads = torch.autograd.grad(torch.stack(env_risks).sum(), scale, create_graph=True)[0]
    return tv_from_gradients(grads)


# -- the same gradients in closed form -------------------------------------------------------------
# With logits l = omega * z at omega = 1, dR/d omega = sum_v (dR/dl_v) z_v for each compared
# position, so every environment's gradient is a plain function of the logits: no second autograd
# graph (create_graph) is needed, and the penalty's own gradient comes out of the step's one
# backward pass. ``tests/test_objective_math.py`` checks these against ``tv_penalty``'s autograd.
def risks_and_omega_gradients(logits: torch.Tensor, targets: torch.Tensor, pre_log_probs: torch.Tensor,
                               direction: str = "post_pre"):
    """Each compared position's risk and its d/d omega at omega = 1, from one log-softmax.

    ``logits`` [N, V]: the first ``len(targets)`` rows are NLL positions (IN/SE rows), the rest KL
    positions (OUT rows, unedited log-probs ``pre_log_probs``). With p = softmax(z), E_p[z] = sum p z:
      NLL  -log p_y                          d/d omega: E_p[z] - z_y
      KL(p || q) = sum p (log p - log q)     d/d omega: sum z p (log p - log q) - KL E_p[z]
      KL(q || p) = sum q (log q - log p)     d/d omega: E_p[z] - sum z q
    Returns two [N] tensors: the risks and the gradients, differentiable in ``logits``."""
    if direction not in ("post_pre", "pre_post"):
        raise ValueError(f"direction: {direction!r}; use post_pre or pre_post")
    return _RisksAndOmegaGradients.apply(logits, targets, pre_log_probs, direction == "post_pre")


class _RisksAndOmegaGradients(torch.autograd.Function):
    """``risks_and_omega_gradients`` with its backward in closed form.

    Left to autograd, the forward's dozen vocabulary-wide operations each keep an [N, V] tensor for
    the backward and add one or two more there; at every OUT position of every step that was most of
    what ODEdit's own terms cost beyond a plain NLL step. Here the forward keeps p and, on the KL
    positions, v below (KL(p || q)) or q (KL(q || p)), and the backward is four passes over the
    vocabulary, in place. With u = z - E_p[z] + 1 and, for KL(p || q), v = d - KL + 1, the
    derivatives in z are (t the one-hot target, or q for KL(q || p)):
      NLL and KL(q || p):  dR = p - t                 dg = p u - t
      KL(p || q):          dR = p (v - 1)             dg = p (u v - 1 - g)
    so with a, b the upstream gradients of g and R: a dg + b dR = p (w v - a (1 + g) - b) on KL(p || q)
    positions and p w - (a + b) t on the others, w = a u + b. ``tests/test_objective_math.py`` checks
    it against autograd (gradcheck, float64)."""

    @staticmethod
    def forward(ctx, logits, targets, pre_log_probs, post_pre: bool):
        # in place wherever a value is not read again: on a CPU each new [N, V] tensor is fresh pages
        # the kernel must fault in, which costs more than the arithmetic on them
        z = _at_least_float32(logits)
        n, y = len(targets), targets[:, None]
        log_p = z.log_softmax(-1)
        p = log_p.exp()
        p_z = p * z
        expected_z = p_z.sum(-1)
        risk, grad = torch.empty_like(expected_z), torch.empty_like(expected_z)
        risk[:n] = -log_p[:n].gather(-1, y)[:, 0]
        grad[:n] = expected_z[:n] - z[:n].gather(-1, y)[:, 0]
        if post_pre:
            ratio = log_p[n:].sub_(pre_log_probs)  # d = log p - log q
            moment = p_z[n:].mul_(ratio).sum(-1)  # sum p z d
            risk[n:] = torch.mul(p[n:], ratio, out=p_z[n:]).sum(-1)
            grad[n:] = moment - risk[n:] * expected_z[n:]
            kl_part = ratio.add_(1 - risk[n:, None])  # v = d - KL + 1: what the backward reads
        else:
            kl_part = pre_log_probs.exp()  # q: the backward subtracts it as the NLL's one-hot target
            risk[n:] = (kl_part * (pre_log_probs - log_p[n:])).sum(-1)
            grad[n:] = expected_z[n:] - (z[n:] * kl_part).sum(-1)
        ctx.post_pre, ctx.dtype = post_pre, logits.dtype
        ctx.save_for_backward(z, p, kl_part, targets, expected_z, risk, grad)
        return risk, grad

    @staticmethod
    def backward(ctx, d_risk, d_grad):
        z, p, kl_part, targets, expected_z, risk, grad = ctx.saved_tensors
        n = len(targets)
        a, b = d_grad[:, None], d_risk[:, None]
        dz = torch.addcmul(b - a * (expected_z[:, None] - 1), z, a)  # w = a u + b, in one pass
        if ctx.post_pre:
            dz[n:].mul_(kl_part).sub_(a[n:] * (1 + grad[n:, None]) + b[n:])  # w v - a (1 + g) - b
        dz.mul_(p)
        dz[:n].scatter_add_(-1, targets[:, None], -(a[:n] + b[:n]))
        if not ctx.post_pre:
            dz[n:].addcmul_(kl_part, -(a[n:] + b[n:]))
        return dz.to(ctx.dtype), None, None, None


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits in float32 (a softmax over 32k entries needs it); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def tv_from_gradients(env_gradients: torch.Tensor) -> torch.Tensor:
    """(mean_e |g_e|)^2 from the environments' dR_e/d omega (Eq. 9)."""
    return env_gradients.abs().mean() ** 2


class LagrangeMultiplier(nn.Module):
    """lambda(delta, phi_e) = softplus(MLP(features)), kept in [0, lambda_max] by projection.

    The MLP's input must be cheap for a 7B model (the reference implementation flattens every
    parameter, impossible there). ``delta_norms`` feeds the size of the change to each edited
    tensor: a handful of numbers that depend on phi_e, as Prop. 4.2 requires. ``edit_hidden``
    feeds the edit prompt's last hidden state; ``constant`` makes lambda a learned scalar.
    The bound is a projection after each dual step rather than a squashing function, so lambda
    never sits on a flat part of a sigmoid where the dual gradient vanishes."""

    def __init__(self, hidden: int = 16, init: float = 1.0, max_value: float = 10.0, seed: int = 0):
        super().__init__()
        self.hidden, self.max_value, self.seed = hidden, max_value, seed
        self.net = None  # built on first use, when the feature size is known
        self._init_bias = _inverse_softplus(max(init, 1e-4))

    def _build(self, n_features: int, device) -> None:
        with torch.random.fork_rng(devices=[]):  # reproducible, and the global generator is untouched
            torch.manual_seed(self.seed)
            self.net = nn.Sequential(nn.Linear(n_features, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1)).to(device)
        with torch.no_grad():
            self.net[-1].weight.mul_(0.01)
            self.net[-1].bias.fill_(self._init_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.detach().float().reshape(-1)
        if self.net is None:
            self._build(features.numel(), features.device)
        self._features = features
        lam = F.softplus(self.net(features)).squeeze()
        # above the bound: the value is lambda_max but the dual gradient still flows (a clamp would
        # stop it, and lambda could never come down again)
        lam = lam * (self.max_value / lam).clamp(max=1.0).detach()
        # lam * (max / lam) can round to just above max (3.0000002 for 3 seen on an H100 machine);
        # the excess is exact (Sterbenz), so subtracting it lands on max exactly
        return lam - (lam - self.max_value).clamp(min=0.0).detach()

    def ascend(self, lam: torch.Tensor, constraint: float, lr: float) -> None:
        """Dual step (Eq. 13): gradient *ascent* of lambda * (TV - tolerance) in the MLP's
        parameters, then projection onto lambda <= lambda_max. With a tolerance > 0, lambda shrinks
        again once the penalty is below it."""
        params = list(self.net.parameters())
        self._ascend_along(torch.autograd.grad(lam * constraint, params, allow_unused=True), lr)

    def dual_loss(self, lam: torch.Tensor, constraint: float) -> torch.Tensor:
        """-lambda * (TV - tolerance): added to the primal objective, so the one backward pass of a
        step also leaves the dual gradient on the MLP (descending this = ascending Eq. 13); then
        ``dual_step``. lambda enters the primal objective detached, so the two never mix."""
        self.net.zero_grad(set_to_none=True)
        return -lam * constraint

    def dual_step(self, lr: float) -> None:
        self._ascend_along([None if p.grad is None else -p.grad for p in self.net.parameters()], lr)

    def _ascend_along(self, grads, lr: float) -> None:
        params = list(self.net.parameters())
        grads = [g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]
        norm = torch.stack(torch._foreach_norm(grads)).float().norm()
        if not torch.isfinite(norm):
            return
        with torch.no_grad():
            # unit-clipped: a large penalty cannot blow the MLP up
            torch._foreach_add_(params, torch._foreach_mul(grads, lr / norm.clamp(min=1.0)))
            out = self.net(self._features).squeeze()
            self.net[-1].bias.sub_((out - _inverse_softplus(self.max_value)).clamp(min=0))


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y)) if y < 20 else y


def delta_norm_features(params: Dict[str, torch.Tensor], originals: Dict[str, torch.Tensor]) -> torch.Tensor:
    """log(1 + ||phi_e - phi||) for each edited tensor, in a fixed order. Absolute, not relative:
    LoRA's B matrices start at zero."""
    names = sorted(params)
    with torch.no_grad():
        deltas = torch._foreach_sub([params[k] for k in names], [originals[k] for k in names])
        return torch.stack(torch._foreach_norm(deltas)).float().log1p()
