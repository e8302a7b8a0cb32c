"""Local matching (issue 23): a sketch and a photo compared place by place, so that where the agent
looks decides what the ranking compares.

Phase 1 can export a grid of local descriptors per image (`sketch_env.local_grids`): h x w cells (8 x 8
for the compact network at 64 px), each a unit d-vector describing that region. A drawing is not
pixel-aligned with its photo, so a sketch cell is compared with the photo's cells in the 3 x 3
neighbourhood of the same place and the best match counts:

    sim(s, p, c) = max over c' in N(c) of <s[c], p[c']>          (N(c): c and its 8 neighbours on the grid)
    local distance at c = 2 - 2 sim(s, p, c)                        (squared distance of unit vectors, in [0, 4])

`MATCHES` names the environment's modes (`sketch_env.env.EnvConfig.match`): the score of photo j for a
query q after glimpses at cells c_1..c_k of the current level is (lower is better)

    global: ||q - e_j||^2
    local:     ||q - e_j||^2 + weight x mean_i local distance at c_i     (the cells the agent looked at)
    dense:     ||q - e_j||^2 + weight x mean over every cell c           (no attention, at h x w / k times
                                                                           the local term's cost)
    dense-ink: ||q - e_j||^2 + weight x mean over the cells holding ink  (no attention, blank paper left out)

`LocalGallery` holds the gallery's photo grids and computes both local terms for a batch of queries;
the ranks themselves are `Gallery.rank(..., extra=...)`'s, the one place ranks are computed. The
phase-1 training loss reads the same similarity (`grid_similarity`), so training and retrieval agree.
"""

from __future__ import annotations

import torch

MATCHES = ("global", "local", "dense", "dense-ink")
DENSE = ("dense", "dense-ink")
NEIGHBOURHOOD = 3  # best match within a 3 x 3 block of cells around the same place
BLOCK_ELEMENTS = 1 << 24  # largest (rows x photos x 9 x d) block of float32 values computed at once (64 MiB)


def neighbour_cells(h: int, w: int) -> torch.Tensor:
    """(h * w, 9) long: the flat index of each cell's 3 x 3 neighbours (row-major, the cell itself in
    the middle), -1 where the neighbourhood leaves the grid."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy, dx = torch.meshgrid(torch.arange(-1, 2), torch.arange(-1, 2), indexing="ij")
    ny, nx = y.reshape(-1, 1) + dy.reshape(1, -1), x.reshape(-1, 1) + dx.reshape(1, -1)
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    return torch.where(inside, ny * w + nx, torch.full_like(ny, -1))


def cell_of(location: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The grid cell (flat row-major index, (R,) long) holding each sensor location (R, 2) in [-1, 1]^2
    (x, y; -1 the left/top edge of the image, as in `sketch_env.geometry`): cell column
    floor((x + 1) / 2 * w), clamped to the grid (the right/bottom edge belongs to the last cell)."""
    loc = location.to(torch.float32)
    col = ((loc[:, 0] + 1.0) * (w / 2.0)).floor().long().clamp(0, w - 1)
    row = ((loc[:, 1] + 1.0) * (h / 2.0)).floor().long().clamp(0, h - 1)
    return row * w + col


def cell_centres(h: int, w: int) -> torch.Tensor:
    """(h * w, 2) the sensor location (x, y) of each grid cell's centre, row-major: the inverse of `cell_of`."""
    ys = (2.0 * torch.arange(h, dtype=torch.float32) + 1.0) / h - 1.0
    xs = (2.0 * torch.arange(w, dtype=torch.float32) + 1.0) / w - 1.0
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def inked_cells(images: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h * w) bool: the grid cells of images (B, H, W) (ink > 0) that hold any ink."""
    b, height, width = images.shape
    if height % h or width % w:
        raise ValueError(f"a {height} x {width} image does not split into a {h} x {w} grid of whole cells")
    return (images.reshape(b, h, height // h, w, width // w) > 0).any(4).any(2).reshape(b, h * w)


def cell_ink(integral: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Share of inked pixels in each grid cell, (B, h * w) in [0, 1], from integral images (B, H + 1, W + 1)
    (`sketch_env.glimpse.integral_image`) whose sides are multiples of h and w."""
    height, width = integral.shape[1] - 1, integral.shape[2] - 1
    if height % h or width % w:
        raise ValueError(f"a {height} x {width} image does not split into a {h} x {w} grid of whole cells")
    corners = integral[:, :: height // h, :: width // w]  # (B, h + 1, w + 1)
    boxes = corners[:, 1:, 1:] - corners[:, :-1, 1:] - corners[:, 1:, :-1] + corners[:, :-1, :-1]
    return (boxes / ((height // h) * (width // w))).clamp_(0.0, 1.0).reshape(len(integral), h * w)


def grid_similarity(sketch: torch.Tensor, photos: torch.Tensor) -> torch.Tensor:
    """Best-match similarity at every cell: sketch grids (B, h, w, d), photo grids (M, h, w, d) ->
    (B, M, h * w): for each sketch, photo and cell c, max over c' in N(c) of <sketch[c], photo[c']>.
    Differentiable (the phase-1 local loss trains through it); memory B x M x 9 x h x w."""
    b, h, w, d = sketch.shape
    nb = neighbour_cells(h, w).to(sketch.device)  # (hw, 9)
    flat = photos.reshape(len(photos), h * w, d)
    padded = torch.cat([flat, flat.new_zeros(len(photos), 1, d)], 1)  # row hw: the outside (masked below)
    neighbours = padded[:, nb.masked_fill(nb < 0, h * w)]  # (M, hw, 9, d); outside -> the zero row
    sims = torch.einsum("bcd,mckd->bmck", sketch.reshape(b, h * w, d), neighbours)
    return sims.masked_fill((nb < 0)[None, None], float("-inf")).amax(-1)


class LocalGallery:
    """The photo grids of a gallery (N, h, w, d), rows in the gallery's order, and the two local terms.

    `distance_at(descriptors (R, d), cells (R,))` -> (R, N): the local distance at one cell per query
    (the sketch's descriptor there against each photo's best match around the same place);
    `dense_distance(grids (R, h, w, d), mask)` -> (R, N): its mean over every cell (or the cells of a
    (R, h * w) mask; a row with no cell in its mask takes every cell). Computed in blocks of at
    most BLOCK_ELEMENTS values, so galleries of any size fit in memory.
    """

    def __init__(self, photo_grids: torch.Tensor):
        grids = torch.as_tensor(photo_grids)
        if grids.ndim != 4 or min(grids.shape) < 1:
            raise ValueError(f"photo grids must have shape (N, h, w, d) with every size >= 1, got {tuple(grids.shape)}")
        self.n, self.h, self.w, self.dim = grids.shape
        self.cells = neighbour_cells(self.h, self.w)  # (hw, 9)
        flat = grids.to(torch.float32).reshape(self.n, self.h * self.w, self.dim)
        # (hw + 1, d, N): cell-major so one query's 9 neighbours are one gather; the last row is the outside
        self._by_cell = torch.cat([flat, flat.new_zeros(self.n, 1, self.dim)], 1).permute(1, 2, 0).contiguous()

    def __len__(self) -> int:
        return self.n

    @property
    def grid(self) -> tuple[int, int]:
        return self.h, self.w

    def similarity_at(self, descriptors: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """(R, d), (R,) cells -> (R, N): max over the cell's 3 x 3 neighbourhood of <descriptor, photo cell>."""
        descriptors = torch.as_tensor(descriptors).to(torch.float32)
        cells = torch.as_tensor(cells).long()
        if descriptors.ndim != 2 or descriptors.shape[1] != self.dim or cells.shape != descriptors.shape[:1]:
            raise ValueError(f"descriptors must be (R, {self.dim}) with cells (R,), got {tuple(descriptors.shape)} "
                             f"and {tuple(cells.shape)}")
        nb = self.cells[cells]  # (R, 9)
        outside = nb < 0
        nb = nb.masked_fill(outside, self.h * self.w)
        block = max(1, BLOCK_ELEMENTS // (self.n * NEIGHBOURHOOD**2 * self.dim))
        out = []
        for start in range(0, max(len(cells), 1), block):
            part = self._by_cell[nb[start : start + block]]  # (r, 9, d, N)
            sims = torch.einsum("rd,rkdn->rkn", descriptors[start : start + block], part)
            out.append(sims.masked_fill(outside[start : start + block, :, None], float("-inf")).amax(1))
        return torch.cat(out)

    def distance_at(self, descriptors: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """(R, d), (R,) -> (R, N) local distance 2 - 2 sim at one cell per query."""
        return 2.0 - 2.0 * self.similarity_at(descriptors, cells)

    def dense_distance(self, grids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(R, h, w, d) sketch grids -> (R, N): the local distance averaged over every cell, or over the
        cells of `mask` (R, h * w) bool (e.g. those holding ink; a row with none takes every cell)."""
        grids = torch.as_tensor(grids).to(torch.float32)
        if grids.shape[1:] != (self.h, self.w, self.dim):
            raise ValueError(f"sketch grids must be (R, {self.h}, {self.w}, {self.dim}), got {tuple(grids.shape)}")
        r, hw = len(grids), self.h * self.w
        cells = torch.arange(hw).repeat(r)
        distance = self.distance_at(grids.reshape(r * hw, self.dim), cells).view(r, hw, self.n)
        if mask is None:
            return distance.mean(1)
        weight = torch.as_tensor(mask).reshape(r, hw).to(torch.float32)
        weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))
        return (distance * weight[:, :, None]).sum(1) / weight.sum(1)[:, None]


def local_cost(match: str, n_glimpses: int, grid: tuple[int, int], local_dim: int, dim: int) -> int:
    """Multiply-adds per gallery photo to score one query at one completion level in a match mode:
    the global distance (D), plus 9 d per cell compared (k glimpses, or every cell for dense; dense-ink
    as computed here too, every cell then masked: skipping blank cells would pay for the inked ones only)."""
    cells = {"global": 0, "local": n_glimpses, "dense": grid[0] * grid[1], "dense-ink": grid[0] * grid[1]}[match]
    return dim + cells * NEIGHBOURHOOD**2 * local_dim


__all__ = ["BLOCK_ELEMENTS", "DENSE", "LocalGallery", "MATCHES", "NEIGHBOURHOOD", "cell_centres", "cell_ink", "cell_of", "grid_similarity",
           "inked_cells", "local_cost", "neighbour_cells"]
