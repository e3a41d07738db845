"""ODEdit's tripartite risk: reliability (NLL on IN), locality (KL on OUT), generality (MMD, IN vs SE).

Each function reads like its equation in the paper (arXiv 2601.19700, Eqs. 2, 3, 6).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Mask of the logit positions that predict a label token (logits at t predict labels at t+1)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def reliability_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """R_rel = -log p(y_e | m_e, x_e), averaged over the target tokens (Eq. 2)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def kl_per_position(post_logits: torch.Tensor, pre_log_probs: torch.Tensor, direction: str = "post_pre") -> torch.Tensor:
    """[N]: KL(p_edited || p_unedited) at each compared position; ``pre_post`` gives EasyEdit's
    KL(p_unedited || p_edited). Inputs are [N, V] rows of the positions compared."""
    post_log_probs = F.log_softmax(post_logits.float(), dim=-1)
    if direction == "post_pre":
        return (post_log_probs.exp() * (post_log_probs - pre_log_probs)).sum(-1)
    return (pre_log_probs.exp() * (pre_log_probs - post_log_probs)).sum(-1)


def locality_kl(post_logits: torch.Tensor, pre_log_probs: torch.Tensor, direction: str = "post_pre") -> torch.Tensor:
    """R_loc = KL(p_edited || p_unedited) per position, averaged (Eq. 3)."""
    kl = kl_per_position(post_logits, pre_log_probs, direction)
    return kl.mean() if kl.numel() else post_logits.sum() * 0.0


def segment_mean(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """[n_segments, ...]: the mean of ``values`` [N, ...] in each segment (0 for an empty one).
    Every environment's risk in one pass, instead of a slice and a reduction per environment."""
    sums = values.new_zeros((n_segments, *values.shape[1:])).index_add(0, segment, values)
    counts = values.new_zeros(n_segments).index_add(0, segment, values.new_ones(len(segment)))
    return sums / counts.clamp(min=1).view(-1, *([1] * (values.dim() - 1)))


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = sum_q exp(-||a_i - b_j||^2 / (2 sigma_q^2))."""
    sq_dist = torch.cdist(a, b).pow(2)
    return torch.exp(-sq_dist.unsqueeze(0) / (2 * sigmas.view(-1, 1, 1) ** 2)).sum(0)


def median_bandwidths(pooled: torch.Tensor, multipliers: Sequence[float]) -> torch.Tensor:
    """Bandwidths relative to the median pairwise distance of the pooled samples (no gradient)."""
    pooled = pooled.detach()
    dist = torch.pdist(pooled)
    median = dist.median() if dist.numel() else pooled.new_tensor(0.0)
    return median.clamp(min=1e-6) * pooled.new_tensor(list(multipliers))


def generality_mmd(z_e: torch.Tensor, z_r: torch.Tensor, multipliers: Sequence[float]) -> torch.Tensor:
    """R_gen = MMD^2(Z_E, Z_R) with a multi-bandwidth Gaussian kernel (Eq. 6), biased estimator.

    The biased estimator is defined (and >= 0) for any sample sizes >= 1, which is what a single
    edit gives (one IN row, a few SE rows); it is 0 when the two sets coincide. With no SE sample
    there is nothing to align and the risk is 0."""
    if z_e.shape[0] == 0 or z_r.shape[0] == 0:
        return z_e.sum() * 0.0 + z_r.sum() * 0.0
    z = torch.cat([z_e, z_r]).float()
    kernel = gaussian_kernel(z, z, median_bandwidths(z, multipliers))
    # mean K_ee + mean K_rr - 2 mean K_er = w^T K w with w = (1/n_e, ..., 1/n_e, -1/n_r, ..., -1/n_r):
    # one Gram matrix of the pooled samples instead of three
    w = torch.cat([z.new_full((len(z_e),), 1.0 / len(z_e)), z.new_full((len(z_r),), -1.0 / len(z_r))])
    return w @ kernel @ w
