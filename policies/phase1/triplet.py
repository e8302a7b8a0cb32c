"""Triplet training pieces: the loss, negative mining, augmentation, partial-sketch sampling.

L = mean(max(0, margin + d(sketch, its photo) - d(sketch, a negative photo))), d the Euclidean
distance between L2-normalised embeddings (in [0, 2]). Not the squared distance: its gradient
vanishes when embeddings collapse onto one point, a state that batch-hard mining otherwise falls into
early (the loss then sits at the margin).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Mining = Literal["batch_hard", "random"]


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over triplets: anchor, positive, negative (B, D) -> scalar.

    margin > 0: the hinge max(0, margin + d(a, p) - d(a, n)); margin = 0: the soft margin
    log(1 + exp(d(a, p) - d(a, n))), which a collapse of all embeddings onto one point does not
    satisfy (it costs log 2 there, where the hinge costs only the margin).
    weight (B,): a weighted mean instead (weights need not sum to 1).
    """
    gap = _distance(anchor, positive) - _distance(anchor, negative)
    per_triplet = F.relu(margin + gap) if margin > 0 else F.softplus(gap)
    return _mean(per_triplet, weight)


def _mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(1e-12)


def batch_infonce_loss(
    sketch_emb: torch.Tensor,
    photo_emb: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each sketch's photo among the batch's photos (logits: cosine / temperature).

    sketch_emb (B, D), photo_emb (M, D) unit vectors, labels (B,) the photo row of each sketch in
    photo_emb (photo rows must be distinct objects).
    """
    logits = sketch_emb @ photo_emb.t() / temperature
    return _mean(F.cross_entropy(logits, labels, reduction="none"), weight)


def _distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Row-wise Euclidean distance (B,), with a finite gradient at zero distance."""
    return ((a - b).pow(2).sum(1) + eps).sqrt()


def pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, D), (M, D) -> (B, M) squared Euclidean distances (clamped at 0 against rounding)."""
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2.0 * a @ b.t()).clamp_min(0.0)


def negative_index(
    sketch_emb: torch.Tensor,
    photo_emb: torch.Tensor,
    labels: torch.Tensor,
    mining: Mining,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """For each sketch i, the index j of a batch photo of another object to use as negative.

    sketch_emb (B, D), photo_emb (B, D): row i of photo_emb is sketch i's own photo; labels (B,) the
    photo id of each row (rows of one photo share a label and are never negatives of each other).
    "batch_hard" picks the closest photo of another object, "random" any photo of another object.
    Returns LongTensor (B,). Every row needs at least one other object in the batch.
    """
    other = labels[:, None] != labels[None, :]
    if not bool(other.any(1).all()):
        raise ValueError("every sketch needs a photo of another object in its batch; use a batch of >= 2 objects")
    if mining == "batch_hard":
        with torch.no_grad():
            d = pairwise_sq_dist(sketch_emb, photo_emb).masked_fill(~other, math.inf)
        return d.argmin(1)
    if mining == "random":
        scores = torch.rand(other.shape, generator=generator).masked_fill(~other, -1.0)
        return scores.argmax(1)
    raise ValueError(f"unknown mining {mining!r}: use batch_hard or random")


def batch_triplet_loss(
    sketch_emb: torch.Tensor,
    photo_emb: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    mining: Mining = "batch_hard",
    generator: torch.Generator | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triplet loss of a batch of (sketch, its photo) pairs with negatives from the batch's photos.

    weight (B,): per-pair weights of the mean (e.g. by completion level), see `triplet_loss`.
    """
    neg = negative_index(sketch_emb, photo_emb, labels, mining, generator)
    return triplet_loss(sketch_emb, photo_emb, photo_emb[neg], margin, weight)


def random_affine(
    images: torch.Tensor,
    max_rotation_deg: float = 10.0,
    max_scale: float = 0.1,
    max_translate: float = 0.08,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An independent random similarity transform per image: (B, C, H, W) -> (B, C, H, W).

    Rotation uniform in +-max_rotation_deg, scale in 1 +- max_scale, shift in +-max_translate of the
    half-width; zero (paper) fills what comes in from outside. One affine_grid + grid_sample call.
    """
    b = images.shape[0]
    u = torch.rand(b, 4, generator=generator) * 2.0 - 1.0
    angle = torch.deg2rad(u[:, 0] * max_rotation_deg)
    inv_scale = 1.0 / (1.0 + u[:, 1] * max_scale)
    cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
    theta = torch.stack(
        [torch.stack([cos, -sin, u[:, 2] * max_translate], 1), torch.stack([sin, cos, u[:, 3] * max_translate], 1)], 1
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def sample_levels(
    n: int,
    n_levels: int,
    partial: bool,
    min_level: int = 0,
    generator: torch.Generator | None = None,
    complete_fraction: float = 0.0,
) -> torch.Tensor:
    """Completion level per training sample (n,): the complete sketch (n_levels - 1) unless
    `partial`; then the complete sketch with probability `complete_fraction`, else uniform in
    [min_level, n_levels - 1]."""
    if not partial:
        return torch.full((n,), n_levels - 1, dtype=torch.long)
    levels = torch.randint(min_level, n_levels, (n,), generator=generator)
    if complete_fraction > 0:
        complete = torch.rand(n, generator=generator) < complete_fraction
        levels = torch.where(complete, torch.full_like(levels, n_levels - 1), levels)
    return levels
