"""Retrieval metrics as pure functions of ranks (ranks themselves come from `sketch_env.gallery`).

Ranks are integers in [1, n_photos], 1 = the true photo is the nearest. Inputs may be numpy arrays,
torch tensors or nested lists; results are Python floats or numpy arrays. Shapes: S sketches,
L completion levels (17 in this project, the last one being the complete sketch).

- acc@q:      share of complete sketches whose true photo is in the top q, in percent.
- AUIR:       the paper's area under the inverse-rank curve = Bhunia et al.'s m@B: per sketch the
              mean over levels of 1 / rank, averaged over sketches, x100.
- m@A:        the same with the ranking percentile (N - rank) / (N - 1) in place of 1 / rank, x100.
- percentile curve: the mean ranking percentile at each completion level, x100.
"""

from __future__ import annotations

import numpy as np
import torch

from sketch_env.render import N_LEVELS


def percentile(ranks, n_photos: int):
    """Ranking percentile (n_photos - rank) / (n_photos - 1): 1 for the best rank, 0 for the worst.

    Elementwise and unchecked (hot paths use it): a torch tensor gives a float32 tensor on its
    device, anything else a float64 numpy array. A gallery of one photo gives 1.0 everywhere.
    """
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.to(torch.float32)
        return torch.ones_like(ranks) if n_photos == 1 else (n_photos - ranks) / (n_photos - 1)
    ranks = np.asarray(ranks, np.float64)
    return np.ones_like(ranks) if n_photos == 1 else (n_photos - ranks) / (n_photos - 1)


def acc_at(ranks_complete, q: int) -> float:
    """acc@q in percent: share of the (S,) ranks of complete sketches that are <= q."""
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 1:
        raise ValueError(f"acc@q needs an integer q >= 1, got {q!r}")
    ranks = _checked_ranks(ranks_complete, 1)
    return float(100.0 * np.mean(ranks <= q))


def auir(ranks) -> float:
    """AUIR (= m@B) of (S, L) ranks: mean over sketches of the mean over levels of 1 / rank, x100."""
    ranks = _checked_ranks(ranks, 2)
    return float(100.0 * np.mean(1.0 / ranks))


def m_at_a(ranks, n_photos: int) -> float:
    """m@A of (S, L) ranks in a gallery of n_photos: mean ranking percentile, x100."""
    ranks = _checked_ranks(ranks, 2, n_photos)
    return float(100.0 * np.mean(percentile(ranks, n_photos)))


def percentile_curve(ranks, n_photos: int) -> np.ndarray:
    """(L,) mean ranking percentile at each completion level of (S, L) ranks, x100."""
    ranks = _checked_ranks(ranks, 2, n_photos)
    return 100.0 * percentile(ranks, n_photos).mean(0)


def retrieval_metrics(ranks, n_photos: int) -> dict:
    """All figures of an evaluation from (S, 17) ranks, as written to metrics.json.

    acc@q is taken on the last level (the complete sketch). Keys: auir, m_at_a, acc@1, acc@5,
    acc@10, percentile_curve (17 floats), n_sketches, n_photos.
    """
    ranks = _checked_ranks(ranks, 2, n_photos)
    if ranks.shape[1] != N_LEVELS:
        raise ValueError(f"ranks must have shape (S, {N_LEVELS}) (one column per completion level), got {ranks.shape}")
    return {
        "auir": auir(ranks),
        "m_at_a": m_at_a(ranks, n_photos),
        "acc@1": acc_at(ranks[:, -1], 1),
        "acc@5": acc_at(ranks[:, -1], 5),
        "acc@10": acc_at(ranks[:, -1], 10),
        "percentile_curve": [float(v) for v in percentile_curve(ranks, n_photos)],
        "n_sketches": int(ranks.shape[0]),
        "n_photos": int(n_photos),
    }


def _checked_ranks(ranks, ndim: int, n_photos: int | None = None) -> np.ndarray:
    """`ranks` as an int64 numpy array of `ndim` dims, non-empty, in [1, n_photos]."""
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    ranks = np.asarray(ranks)
    if ranks.ndim != ndim:
        want = "(S,)" if ndim == 1 else "(S, L)"
        raise ValueError(f"ranks must have shape {want}, got {ranks.shape}")
    if ranks.size == 0:
        raise ValueError(f"no ranks to score (shape {ranks.shape})")
    if ranks.dtype.kind not in "iuf":
        raise ValueError(f"ranks must be numbers, got dtype {ranks.dtype}")
    if ranks.dtype.kind == "f" and not np.all(np.isfinite(ranks) & (ranks == np.round(ranks))):
        raise ValueError("ranks must be whole numbers; got fractional, NaN or infinite values")
    ranks = ranks.astype(np.int64)
    if ranks.min() < 1:
        raise ValueError(f"ranks start at 1, got {ranks.min()}")
    if n_photos is not None:
        if isinstance(n_photos, bool) or not isinstance(n_photos, (int, np.integer)) or n_photos < 1:
            raise ValueError(f"n_photos must be an integer >= 1, got {n_photos!r}")
        if ranks.max() > n_photos:
            raise ValueError(f"rank {ranks.max()} is beyond the gallery of {n_photos} photos")
    return ranks
