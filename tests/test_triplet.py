"""Phase 1's losses, negative mining and augmentation (policies.phase1.triplet)."""

from __future__ import annotations

import pytest
import torch

from policies.phase1.triplet import (
    batch_triplet_loss,
    negative_index,
    pairwise_sq_dist,
    random_affine,
    sample_levels,
    triplet_loss,
)


def test_triplet_loss_hand_computed():
    anchor = torch.zeros(2, 2)
    positive = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # Euclidean distances 5 and 1
    negative = torch.tensor([[0.0, 2.0], [6.0, 8.0]])  # 2 and 10
    # hinge(1 + 5 - 2) = 4, hinge(1 + 1 - 10) = 0
    loss = triplet_loss(anchor, positive, negative, margin=1.0)
    torch.testing.assert_close(loss, torch.tensor(2.0))
    # the gradient stays finite when an anchor coincides with its positive (a collapsed embedding)
    a = torch.zeros(1, 2, requires_grad=True)
    triplet_loss(a, torch.zeros(1, 2), torch.zeros(1, 2), margin=0.2).backward()
    assert torch.isfinite(a.grad).all()


def test_batch_hard_picks_the_closest_photo_of_another_object():
    sketches = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    photos = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.0, -1.0], [0.95, 0.0]])
    sk, ph = sketches, photos[:3]
    labels = torch.tensor([0, 1, 2])
    # sketch 0: other photos 1 (0.8, 0.3) and 2 -> 1; sketch 1: 0 (0.9, 0.1) is closer than 2 -> 0
    # sketch 2: photo 0 dist 3.62, photo 1 dist 3.33 -> 1
    torch.testing.assert_close(negative_index(sk, ph, labels, "batch_hard"), torch.tensor([1, 0, 1]))
    # rows of the same object are never negatives, however close: row 3 (sketch 0 again, of object 2)
    # skips its own photo (0.95, 0) and takes photo 0; rows 0 and 1 (object 0) skip photos 0 and 1
    labels = torch.tensor([0, 0, 1, 2])
    neg = negative_index(torch.cat([sk, sk[:1]]), photos, labels, "batch_hard")
    assert neg.tolist() == [3, 3, 1, 0]
    d = pairwise_sq_dist(sk, ph)
    torch.testing.assert_close(d, ((sk[:, None] - ph[None]) ** 2).sum(-1))
    loss = batch_triplet_loss(sk, ph, torch.tensor([0, 1, 2]), margin=0.2)
    expected = triplet_loss(sk, ph, ph[torch.tensor([1, 0, 1])], 0.2)
    torch.testing.assert_close(loss, expected)


def test_random_negatives_are_other_objects_and_vary():
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    gen = torch.Generator().manual_seed(0)
    picks = torch.stack([negative_index(emb, emb, labels, "random", gen) for _ in range(50)])
    assert (labels[picks] != labels).all()
    assert len(torch.unique(picks[:, 0])) > 1
    with pytest.raises(ValueError, match="another object"):
        negative_index(emb[:2], emb[:2], labels[:2], "batch_hard")


def test_random_affine_identity_and_variety():
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 10:20, 12:16] = 1.0
    same = random_affine(x, max_rotation_deg=0.0, max_scale=0.0, max_translate=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    moved = random_affine(x, generator=torch.Generator().manual_seed(1))
    assert moved.shape == x.shape
    assert not torch.allclose(moved[0], moved[1])  # each image gets its own transform
    assert abs(float(moved.sum() / x.sum()) - 1.0) < 0.3  # small transforms keep most ink


def test_sample_levels():
    assert sample_levels(5, 17, partial=False).tolist() == [16] * 5
    levels = sample_levels(500, 17, partial=True, min_level=3, generator=torch.Generator().manual_seed(0))
    assert int(levels.min()) == 3 and int(levels.max()) == 16
