"""Voxel-wise uncertainty from Monte-Carlo dropout samples of sigmoid (multi-label) region logits.

Input: the logits of :meth:`custom.networks.SwinUNETRAttSE.forward_mc`, ``(B, S * C, *spatial)`` with sample-major
channels (S samples of the C = 3 BraTS regions TC, WT, ET). Each region is an independent Bernoulli variable with
``p_s = sigmoid(logit_s)``, so (Gal & Ghahramani 2016; BALD, Houlsby et al. 2011), with
``H(p) = -p ln p - (1 - p) ln(1 - p)``:

* ``mean_prob`` ``(B, C, *spatial)``: ``mean_s p_s``, the MC estimate of the predictive probability;
* ``predictive_entropy`` ``(B, 1, *spatial)``: ``sum_c H(mean_prob_c)``, total uncertainty;
* ``expected_entropy`` ``(B, 1, *spatial)``: ``mean_s sum_c H(p_s,c)``, the aleatoric part;
* ``mutual_information`` ``(B, 1, *spatial)``: ``predictive_entropy - expected_entropy`` (>= 0), the epistemic
  part: how much the samples disagree.

All entropies are in nats; per voxel each lies in ``[0, C ln 2]``. :func:`mean_logit` turns ``mean_prob`` back
into logits for pipelines that apply a sigmoid afterwards.
"""

from __future__ import annotations

from functools import partial

import torch
from monai.data import MetaTensor

__all__ = ["split_samples", "bernoulli_entropy", "mc_uncertainty", "mean_logit", "mc_dropout_pass"]


def split_samples(logits: torch.Tensor, samples: int) -> torch.Tensor:
    """View ``(B, S * C, *spatial)`` sample-major logits as ``(B, S, C, *spatial)`` (``S = samples``)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}.")
    if logits.ndim < 2 or logits.shape[1] % samples != 0:
        raise ValueError(
            f"expected (B, samples * C, *spatial) logits with samples={samples}, got shape {tuple(logits.shape)}."
        )
    batch, channels = logits.shape[:2]
    return logits.view(batch, samples, channels // samples, *logits.shape[2:])


def bernoulli_entropy(p: torch.Tensor) -> torch.Tensor:
    """Elementwise entropy ``-p ln p - (1 - p) ln(1 - p)`` in nats of Bernoulli probabilities ``p``; 0 at p = 0, 1."""
    q = 1 - p
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(q, q))


def mc_uncertainty(logits: torch.Tensor, samples: int) -> dict[str, torch.Tensor]:
    """Mean probability and entropies (nats) from ``(B, samples * C, *spatial)`` MC sigmoid logits.

    Returns a dict with ``mean_prob`` ``(B, C, *spatial)`` and ``predictive_entropy``, ``expected_entropy``,
    ``mutual_information`` ``(B, 1, *spatial)`` (see the module docstring); computed in at least float32.
    """
    split = split_samples(logits, samples)
    probs = torch.sigmoid(split.to(torch.promote_types(split.dtype, torch.float32)))  # (B, S, C, *spatial)
    mean_prob = probs.mean(dim=1)
    predictive_entropy = bernoulli_entropy(mean_prob).sum(dim=1, keepdim=True)
    expected_entropy = bernoulli_entropy(probs).sum(dim=2).mean(dim=1, keepdim=True)
    mutual_information = (predictive_entropy - expected_entropy).clamp_min(0)  # >= 0 up to round-off (Jensen)
    return {
        "mean_prob": mean_prob,
        "predictive_entropy": predictive_entropy,
        "expected_entropy": expected_entropy,
        "mutual_information": mutual_information,
    }


def mean_logit(mean_prob: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``logit(clamp(mean_prob, eps, 1 - eps))``: ``sigmoid`` of it gives ``mean_prob`` back (finite at 0 and 1)."""
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}.")
    return torch.logit(mean_prob, eps=eps)


def mc_dropout_pass(inferer, network, image: torch.Tensor, samples: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """One Monte-Carlo dropout prediction of ``image`` ``(C, *spatial)`` through ``inferer`` with
    ``network.forward_mc`` (:class:`custom.networks.SwinUNETRAttSE`). Returns, on ``image``'s grid and
    with its affine: ``logit`` ``(3, *spatial)`` (logit of the mean probability), ``mutual_information``
    and ``predictive_entropy`` ``(1, *spatial)`` (nats)."""
    inputs = (image if torch.is_tensor(image) else torch.as_tensor(image))[None]
    if device is not None:
        inputs = inputs.to(device)
    with torch.no_grad():
        logits = inferer(inputs, partial(network.forward_mc, samples=samples))
    u = mc_uncertainty(torch.as_tensor(logits), samples)
    meta = {"affine": image.affine} if isinstance(image, MetaTensor) else {}
    return {
        "logit": MetaTensor(mean_logit(u["mean_prob"])[0], **meta),
        "mutual_information": MetaTensor(u["mutual_information"][0].float(), **meta),
        "predictive_entropy": MetaTensor(u["predictive_entropy"][0].float(), **meta),
    }

