"""Photos as line drawings (policies.phase1.edges): gradient edge maps and the thinning HED's maps share."""

from __future__ import annotations

import numpy as np
import torch

from policies.phase1.edges import photo_edges, thin_edges


def test_edge_map_of_a_rectangle_is_its_border():
    photo = np.full((1, 128, 128, 3), 255, np.uint8)
    photo[0, 32:96, 40:88] = (90, 40, 20)  # a dark filled rectangle on white
    edges = photo_edges(photo, size=32)[0, 0]
    assert edges.shape == (32, 32) and edges.min() >= 0 and edges.max() <= 1
    # the rectangle spans rows 8..23 and columns 10..21 at 32 x 32
    assert edges[8:24, 9:11].max(1).values.min() > 0.5  # left border inked on every row
    assert edges[8:24, 21:23].max(1).values.min() > 0.5  # right border
    assert edges[7:9, 10:22].max(0).values.min() > 0.5  # top border on every column
    assert edges[11:21, 12:20].max() == 0  # nothing inside
    assert edges[:, :7].max() == 0 and edges[:, 25:].max() == 0  # nothing far outside


def test_thinning_keeps_one_pixel_across_a_blurred_line():
    x = torch.arange(15.0)
    across = torch.exp(-0.5 * ((x - 7) / 1.5) ** 2)  # a soft vertical line, 5-6 pixels wide above 0.3
    prob = across.view(1, 1, 1, 15).expand(1, 1, 15, 15).contiguous()
    kept = thin_edges(prob)[0, 0, 7]  # a row in the middle
    assert (prob[0, 0, 7] > 0.3).sum() >= 5
    assert kept.nonzero().flatten().tolist() == [7]
