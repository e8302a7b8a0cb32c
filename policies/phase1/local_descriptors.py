"""Local descriptors of the phase-1 network (issue 23): a grid of unit d-vectors per image, trained so
that a sketch cell matches the same region of its own photo.

What: `LocalHead` reads the trunk's conv feature map before pooling (`EmbeddingNet.feature_map`: the
compact trunk's 8 x 8 map at 64 px) through two 1 x 1 convolutions and L2-normalises each cell. One
head serves sketches and photos (the network's `local_head`, present when `EmbeddingConfig.local_dim`
> 0), so it is trained, averaged (EMA), checkpointed and saved with the rest of the network.

Trained jointly with the global loss, by `local_infonce_loss`: for every inked cell of a training
sketch, a cross-entropy of its own photo among the batch's photos, with logits the best-match
similarity within the 3 x 3 neighbourhood of the same place (`sketch_env.local_match.grid_similarity`:
a small spatial tolerance, drawings are not pixel-aligned with photos) over a temperature. That is
the quantity the environment's local term ranks with, so training and retrieval agree.

Exported by `export_local_grids` (`sketch_env.local_grids`: photo grids, and every sketch's grid at
the 17 completion levels, float16).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sketch_env.data import Dataset, photo_digests, sketch_digests
from sketch_env.local_grids import LocalGrids
from sketch_env.local_match import grid_similarity
from sketch_env.render import N_LEVELS

INK_THRESHOLD = 0.25  # a cell of an (augmented, interpolated) sketch image holds ink where its max exceeds this


class LocalHead(nn.Module):
    """Trunk feature map (B, C, h, w) -> local descriptors (B, h, w, d), unit length per cell."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        if dim < 1:
            raise ValueError(f"local descriptor size must be >= 1, got {dim}")
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True), nn.Conv2d(channels, dim, 1))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(feature_map), dim=1).permute(0, 2, 3, 1)


@contextlib.contextmanager
def captured_feature_maps(net):
    """Within the block, every trunk forward pass of `net` appends its feature map (`EmbeddingNet.feature_map`'s
    layer) to the yielded list, so the training step gets the maps of the pass it makes anyway. Nothing is
    captured (empty list) for a network without local descriptors."""
    maps: list[torch.Tensor] = []
    handles = []
    if getattr(net, "local_head", None) is not None:
        for layer in {id(m): m for m in net.feature_map_layers()}.values():
            handles.append(layer.register_forward_hook(lambda module, args, out: maps.append(out)))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def local_infonce_loss(sketch_grids: torch.Tensor, photo_grids: torch.Tensor, labels: torch.Tensor,
                       ink: torch.Tensor, temperature: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the inked cells of the sketches of the cross-entropy of each cell's own photo.

    sketch_grids (B, h, w, d), photo_grids (M, h, w, d) unit descriptors; labels (B,) each sketch's photo
    row; ink (B, h, w) bool, the cells that count; weight (B,) per-sketch weights (e.g. by level) or None.
    Logits: best-match similarity within the 3 x 3 neighbourhood (`grid_similarity`) / temperature.
    """
    b, h, w, _ = sketch_grids.shape
    logits = grid_similarity(sketch_grids, photo_grids).permute(0, 2, 1).reshape(b * h * w, -1) / temperature
    ce = F.cross_entropy(logits, labels.repeat_interleave(h * w), reduction="none").view(b, h * w)
    mask = ink.reshape(b, h * w).float()
    if weight is not None:
        mask = mask * weight[:, None]
    return (ce * mask).sum() / mask.sum().clamp_min(1e-6)


def local_loss(net, maps: list[torch.Tensor], sketches: torch.Tensor, labels: torch.Tensor, temperature: float,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """The local term of a phase-1 training step from the maps `captured_feature_maps` caught during
    `net(sketches, photos)`: one map of sketches and photos together (shared branches) or one each."""
    if len(maps) == 1:
        sketch_map, photo_map = maps[0][: len(sketches)], maps[0][len(sketches) :]
    elif len(maps) == 2:
        sketch_map, photo_map = maps
    else:
        raise RuntimeError(f"expected the feature maps of one training forward pass, caught {len(maps)}")
    s, p = net.local_head(sketch_map), net.local_head(photo_map)
    ink = F.adaptive_max_pool2d(sketches[:, :1], s.shape[1:3])[:, 0] > INK_THRESHOLD
    return local_infonce_loss(s, p, labels, ink, temperature, weight)


@torch.no_grad()
def _grids(net, x: torch.Tensor, photo: bool) -> torch.Tensor:
    return net.local_head(net.feature_map(x, photo=photo)).to(torch.float16)


@torch.no_grad()
def photo_grids(net, photo_inputs: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Photo inputs (N, C, H, W) (`policies.phase1.embedding.photo_inputs`) -> grids (N, h, w, d) float16, in eval mode."""
    was_training = net.training
    net.eval()
    parts = [_grids(net, photo_inputs[i : i + batch], True) for i in range(0, len(photo_inputs), batch)]
    net.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, *grid_shape(net), dtype=torch.float16)


@torch.no_grad()
def sketch_level_grids(net, first_ink: np.ndarray, batch: int = 1024) -> torch.Tensor:
    """Level maps (S, H, W) uint8 (`first_ink_level`) -> grids of every partial sketch (S, 17, h, w, d) float16."""
    was_training = net.training
    net.eval()
    first = torch.as_tensor(np.asarray(first_ink))
    s = len(first)
    flat_sketch = torch.arange(s).repeat_interleave(N_LEVELS)
    flat_level = torch.arange(N_LEVELS, dtype=torch.uint8).repeat(s)
    out = torch.empty(s * N_LEVELS, *grid_shape(net), dtype=torch.float16)
    for start in range(0, s * N_LEVELS, batch):
        idx, lev = flat_sketch[start : start + batch], flat_level[start : start + batch]
        out[start : start + batch] = _grids(net, (first[idx] <= lev[:, None, None]).float().unsqueeze(1), False)
    net.train(was_training)
    return out.view(s, N_LEVELS, *out.shape[1:])


def grid_shape(net) -> tuple[int, int, int]:
    """(h, w, d) of the network's local grids."""
    side = net.feature_map(torch.zeros(1, 1, net.config.image_size, net.config.image_size)).shape[-2:]
    return int(side[0]), int(side[1]), int(net.config.local_dim)


def export_local_grids(net, ds: Dataset, photos: torch.Tensor, first_ink: torch.Tensor, batch: int) -> LocalGrids:
    """The grids of every photo (inputs `photos`, in ds.photos order) and every sketch at every level
    (level maps `first_ink`, in ds.sketches order), with the digests of what was embedded."""
    return LocalGrids(
        photo_id=ds.photos.photo_id,
        photo_grids=photo_grids(net, photos, batch).numpy(),
        sketch_id=ds.sketches.sketch_id,
        sketch_grids=sketch_level_grids(net, first_ink.numpy(), batch).numpy(),
        photo_digest=photo_digests(ds.photos),
        sketch_digest=sketch_digests(ds.sketches),
    )


__all__ = ["LocalHead", "captured_feature_maps", "export_local_grids",
           "grid_shape", "local_infonce_loss", "local_loss", "photo_grids", "sketch_level_grids"]
