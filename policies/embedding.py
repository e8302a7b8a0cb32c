"""The phase-1 embedding network: sketches and photos -> L2-normalised D-dim embeddings.

Backbones: a compact 4-block CNN that trains from scratch on a couple of CPU cores, or a
torchvision model (resnet18, resnet50, inception_v3, mobilenet_v3_small) built with
``weights=None``: nothing is ever downloaded, pretrained weights only come from a state-dict file
the user gives (``backbone_weights``). Sketch and photo branches share one backbone by default.

Without pretrained weights the sketch/photo domain gap is the main obstacle, so photos are fed as
edge maps by default (``photo_edges``): line drawings on the same ink = 1 / paper = 0 scale as the
rendered sketches.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from sketch_env.atomic import atomic_write
from sketch_env.data import DataError, PhotoSet, SketchSet
from sketch_env.render import N_LEVELS, default_thickness, first_ink_level

Backbone = Literal["compact", "resnet18", "resnet50", "inception_v3", "mobilenet_v3_small"]
PhotoInput = Literal["edges", "hed", "rgb"]
NET_FILE = "embedding_net.pt"

# Head layers of the torchvision classifiers: present in their ImageNet state dicts, dropped here.
_HEAD_PREFIXES = ("fc.", "classifier.", "AuxLogits.")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_INCEPTION_MIN_SIZE = 75


@dataclass
class EmbeddingConfig:
    """Architecture of the embedding network (saved next to its weights).

    photo_input: how photos enter: `photo_edges` (gradient edges), `policies.hed.hed_edges` (learned
    HED edges) or RGB. width: channels of the compact trunk's first block (doubling per block).
    tta_flip: in eval mode, embed every image and its mirror image and average (queries and gallery).
    local_dim: size d of the local descriptors read from the trunk's feature map (policies.local_descriptors;
    0: none).
    """

    backbone: Backbone = "compact"
    embedding_dim: int = 64
    image_size: int = 64
    shared_branches: bool = True
    photo_input: PhotoInput = "edges"
    backbone_weights: str | None = None
    width: int = 16
    tta_flip: bool = False
    local_dim: int = 0


def _compact_trunk(in_channels: int, width: int = 16) -> tuple[nn.Module, int]:
    """Four conv blocks + global average pool: (B, C, H, W) -> (B, widths[-1]).

    Block 1 is a strided 5x5 conv-BN-ReLU (halves the resolution without a full-resolution feature
    map, the costliest part of a conv-pool block on CPU); blocks 2-4 are conv3x3-BN-ReLU-maxpool2.
    About 15 M multiply-adds per 64 x 64 image: on 2 CPU cores it trains ~2x faster per epoch than
    widths (32, 64, 128, 256) and reaches a better validation acc@5 for the same time.
    Widths are (width, 2 width, 4 width, 8 width).
    """
    widths = (width, 2 * width, 4 * width, 8 * width)
    c0 = widths[0]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, c0, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True)]
    c = c0
    for w in widths[1:]:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c


def _torchvision_trunk(name: str) -> tuple[nn.Module, int]:
    """A torchvision classifier with its head replaced by Identity: (B, 3, H, W) -> (B, F)."""
    if name == "resnet18":
        model = torchvision.models.resnet18(weights=None)
    elif name == "resnet50":
        model = torchvision.models.resnet50(weights=None)
    elif name == "inception_v3":
        model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    elif name == "mobilenet_v3_small":
        model = torchvision.models.mobilenet_v3_small(weights=None)
    else:
        raise ValueError(f"unknown backbone {name!r}: use compact, resnet18, resnet50, inception_v3 or mobilenet_v3_small")
    if name == "mobilenet_v3_small":
        features = model.classifier[0].in_features
        model.classifier = nn.Identity()
    else:
        features = model.fc.in_features
        model.fc = nn.Identity()
    return model, features


def load_backbone_weights(trunk: nn.Module, path: str | Path, backbone: str) -> None:
    """Load a backbone state dict from `path` into `trunk` (torch.load with weights_only=True).

    The file may hold the full classifier (e.g. torchvision's ImageNet file): its head keys
    (fc., classifier., AuxLogits.) are ignored. Any other missing, unexpected or mis-shaped key is
    an error naming the file, so a wrong architecture never loads half-way.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: backbone weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for non-checkpoint files
        raise DataError(f"{path}: cannot read a state dict ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: expected a state dict (name -> tensor) for a {backbone} backbone, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    own = trunk.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise DataError(
            f"{path}: not a {backbone} backbone state dict: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:2]}"
        )
    trunk.load_state_dict(state)


class EmbeddingNet(nn.Module):
    """Sketch and photo branches mapping images to L2-normalised embeddings.

    embed_sketches: (B, 1, H, W) ink images in [0, 1] -> (B, D)
    embed_photos:   (B, C, H, W) edge maps (C = 1) or RGB in [0, 1] (C = 3) -> (B, D)
    """

    def __init__(self, config: EmbeddingConfig):
        super().__init__()
        self.config = config
        photo_channels = 3 if config.photo_input == "rgb" else 1
        self.in_channels = photo_channels if config.backbone == "compact" else 3
        self.sketch_trunk, features = self._make_trunk()
        self.sketch_head = nn.Linear(features, config.embedding_dim)
        if config.shared_branches:
            self.photo_trunk, self.photo_head = self.sketch_trunk, self.sketch_head
        else:
            self.photo_trunk = copy.deepcopy(self.sketch_trunk)
            self.photo_head = nn.Linear(features, config.embedding_dim)
        self.local_head = None  # local descriptors (issue 23): one head for both branches, on feature_map
        if config.local_dim:
            from policies.local_descriptors import LocalHead

            self.local_head = LocalHead(self._feature_map_channels(), config.local_dim)

    def _make_trunk(self) -> tuple[nn.Module, int]:
        c = self.config
        trunk, features = _compact_trunk(self.in_channels, c.width) if c.backbone == "compact" else _torchvision_trunk(c.backbone)
        if c.backbone_weights:
            load_backbone_weights(trunk, c.backbone_weights, c.backbone)
        return trunk, features

    def feature_map_layers(self) -> tuple[nn.Module, nn.Module]:
        """The (sketch, photo) trunk layers whose outputs are the conv feature maps before pooling that
        local descriptors read: the compact trunk's third block, an (image_size / 8)^2 map of 4 x width
        channels (8 x 8 at 64 px). Other backbones have none yet."""
        if self.config.backbone != "compact":
            raise ValueError(f"local descriptors need the compact backbone for now, not {self.config.backbone!r}")
        end = self._feature_map_end()
        return self.sketch_trunk[end - 1], self.photo_trunk[end - 1]

    def feature_map(self, x: torch.Tensor, photo: bool = False) -> torch.Tensor:
        """The trunk's conv feature map (B, C, h, w) of images x before pooling (`feature_map_layers`)."""
        self.feature_map_layers()
        trunk = self.photo_trunk if photo else self.sketch_trunk
        return trunk[: self._feature_map_end()](self._prepare(x))

    def _feature_map_end(self) -> int:
        pools = [i for i, layer in enumerate(self.sketch_trunk) if isinstance(layer, nn.MaxPool2d)]
        return pools[-2] + 1

    def _feature_map_channels(self) -> int:
        self.feature_map_layers()
        return 4 * self.config.width

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Match the trunk's input: channel count, and for torchvision trunks the ImageNet look.

        Line drawings (1 channel, ink = 1) go to torchvision trunks as dark ink on white paper,
        normalised with ImageNet statistics, so a user's ImageNet weights see familiar inputs.
        Inception needs at least 75 x 75 pixels: smaller inputs are resized.
        """
        if x.shape[1] not in (1, self.in_channels):
            raise ValueError(f"expected images with 1 or {self.in_channels} channels, got shape {tuple(x.shape)}")
        if self.config.backbone == "compact":
            return x.expand(-1, self.in_channels, -1, -1)
        if x.shape[1] == 1:
            x = (1.0 - x).expand(-1, 3, -1, -1)
        mean = x.new_tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.config.backbone == "inception_v3" and min(x.shape[-2:]) < _INCEPTION_MIN_SIZE:
            x = F.interpolate(x, size=(_INCEPTION_MIN_SIZE, _INCEPTION_MIN_SIZE), mode="bilinear", align_corners=False)
        return x

    def _embed(self, trunk: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Unit embeddings; with `tta_flip` in eval mode, of the image and its mirror image averaged."""
        x = self._prepare(x)
        if self.config.tta_flip and not self.training:
            both = head(trunk(torch.cat([x, x.flip(-1)])))
            return F.normalize(F.normalize(both[: len(x)], dim=1) + F.normalize(both[len(x) :], dim=1), dim=1)
        return F.normalize(head(trunk(x)), dim=1)

    def embed_sketches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, D), unit L2 norm."""
        return self._embed(self.sketch_trunk, self.sketch_head, x)

    def embed_photos(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D), unit L2 norm."""
        return self._embed(self.photo_trunk, self.photo_head, x)

    def forward(self, sketches: torch.Tensor, photos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of sketches (B, 1, H, W) and photos (M, C, H, W): ((B, D), (M, D)).

        Shared branches run both through the trunk in one pass, so batch norm sees the same mix
        of sketches and photos in training as its running statistics hold at evaluation.
        """
        if not self.config.shared_branches:
            return self.embed_sketches(sketches), self.embed_photos(photos)
        both = torch.cat([self._prepare(sketches), self._prepare(photos)])
        emb = F.normalize(self.sketch_head(self.sketch_trunk(both)), dim=1)
        return emb[: len(sketches)], emb[len(sketches) :]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) with reflect padding."""
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


def photo_edges(photos, size: int = 64, sigma: float = 1.0, low: float = 0.08, high: float = 0.25) -> torch.Tensor:
    """Canny-like edge maps of photos, drawn like a sketch: (N, H, W, 3) uint8 -> (N, 1, size, size).

    Grey -> Gaussian blur -> Sobel gradient -> non-maximum suppression across the gradient
    direction (4 directions) -> soft threshold: a thin edge gets ink = clamp((m - low) / (high - low))
    where m is the gradient magnitude over the image's largest magnitude. The thin map is computed at
    the input resolution, max-pooled to `size` (one pixel wide lines) and thickened with the square
    pen that `sketch_env.render` draws sketches with at that size, so both inputs have the same
    line width. Vectorised over the whole batch.
    """
    x = torch.as_tensor(photos)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"photo_edges expects (N, H, W, 3) uint8 photos, got shape {tuple(x.shape)}")
    rgb = x.permute(0, 3, 1, 2).float() / 255.0
    grey = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3])
    grey = _gaussian_blur(grey, sigma)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3))
    mag = torch.sqrt(gx * gx + gy * gy)
    thin = non_maximum_suppression(mag, gx, gy)
    scale = thin.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return drawn_with_pen(((thin / scale - low) / (high - low)).clamp(0.0, 1.0), size)


def non_maximum_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Edge maps (N, 1, H, W) thinned to one-pixel lines: a pixel keeps its magnitude only if it is the
    largest of its two neighbours along the gradient (gx, gy), quantised to 0, 45, 90, 135 degrees."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    sector = (((angle + 22.5) // 45.0) % 4).long()
    m = F.pad(magnitude, (1, 1, 1, 1))
    h, w = magnitude.shape[-2:]

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return m[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    offsets = ((0, 1), (1, 1), (1, 0), (1, -1))  # (dy, dx) along the gradient for each sector
    neighbour_max = torch.stack(
        [torch.maximum(shifted(dy, dx), shifted(-dy, -dx)) for dy, dx in offsets], dim=0
    ).gather(0, sector.unsqueeze(0)).squeeze(0)
    return torch.where(magnitude >= neighbour_max, magnitude, torch.zeros_like(magnitude))


def drawn_with_pen(ink: torch.Tensor, size: int) -> torch.Tensor:
    """Thin ink maps (N, 1, H, W) in [0, 1] as a sketch is drawn at `size`: max-pooled to size x size
    (one pixel wide lines) and thickened with the square pen `sketch_env.render` draws sketches with."""
    if ink.shape[-2:] != (size, size):
        ink = F.adaptive_max_pool2d(ink, (size, size))
    side = default_thickness(size)
    if side > 1:  # ink at p spreads to p - (side - 1) // 2 ... p + side // 2, as in render._min_filter
        lo, hi = (side - 1) // 2, side // 2
        ink = F.max_pool2d(F.pad(ink, (lo, hi, lo, hi)), side, stride=1)
    return ink


def photo_inputs(photos, config: EmbeddingConfig, chunk: int = 64) -> torch.Tensor:
    """The photo branch's input for `config`: (N, H, W, 3) uint8 -> (N, C, size, size) float in [0, 1].

    Works through `chunk` photos at a time to bound the memory of the full-resolution edge maps.
    """
    photos = torch.as_tensor(photos)
    size = config.image_size
    if config.photo_input == "hed":
        from policies.hed import hed_edges

        return hed_edges(photos, size)
    parts = []
    for start in range(0, len(photos), chunk):
        x = photos[start : start + chunk]
        if config.photo_input == "edges":
            parts.append(photo_edges(x, size))
            continue
        x = x.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        parts.append(x)
    channels = 3 if config.photo_input == "rgb" else 1
    return torch.cat(parts) if parts else torch.zeros(0, channels, size, size)


def photo_decode_size(config: EmbeddingConfig) -> int:
    """Resolution to decode photos at: edge maps are traced at 4x the input size for thin lines."""
    return config.image_size if config.photo_input == "rgb" else 4 * config.image_size


@torch.no_grad()
def embed_photo_inputs(net: EmbeddingNet, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Photo inputs (N, C, H, W) (see `photo_inputs`) -> (N, D), in eval mode, `batch` at a time."""
    was_training = net.training
    net.eval()
    out = torch.empty(len(x), net.config.embedding_dim)
    for start in range(0, len(x), batch):
        out[start : start + batch] = net.embed_photos(x[start : start + batch])
    net.train(was_training)
    return out


@torch.no_grad()
def embed_sketch_levels(
    net: EmbeddingNet, first_ink: np.ndarray, batch: int = 1024, levels: tuple[int, ...] = tuple(range(N_LEVELS))
) -> torch.Tensor:
    """Partial sketches' embeddings: level maps (S, H, W) uint8 -> (S, len(levels), D).

    first_ink is `sketch_env.render.first_ink_level`; level L of a sketch is inked where
    first_ink <= L (L = 16: the complete sketch). Images are made `batch` at a time, never all at once.
    """
    was_training = net.training
    net.eval()
    first = torch.as_tensor(np.asarray(first_ink))
    s, n = first.shape[0], len(levels)
    flat_sketch = torch.arange(s).repeat_interleave(n)
    flat_level = torch.tensor(levels, dtype=torch.uint8).repeat(s)
    out = torch.empty(s * n, net.config.embedding_dim)
    for start in range(0, s * n, batch):
        idx, lev = flat_sketch[start : start + batch], flat_level[start : start + batch]
        images = (first[idx] <= lev[:, None, None]).float().unsqueeze(1)
        out[start : start + batch] = net.embed_sketches(images)
    net.train(was_training)
    return out.view(s, n, -1)


def save_embedding_net(run_dir: str | Path, net: EmbeddingNet, config: EmbeddingConfig) -> Path:
    """Write run_dir/embedding_net.pt atomically: {"config": dict, "state_dict": tensors}."""
    payload = {"config": asdict(config), "state_dict": net.state_dict()}
    return atomic_write(Path(run_dir) / NET_FILE, lambda p: torch.save(payload, p))


def load_embedding_net(run_dir: str | Path) -> tuple[EmbeddingNet, EmbeddingConfig]:
    """Read run_dir/embedding_net.pt (weights_only=True); the net is returned in eval mode.

    The backbone-weights file is not re-read: the saved state dict already holds every weight.
    """
    path = Path(run_dir) / NET_FILE
    if not path.is_file():
        raise DataError(f"{path}: no embedding network here; train one with `darp pretrain --run-dir {run_dir}`")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = EmbeddingConfig(**payload["config"])
    net = EmbeddingNet(dataclasses.replace(config, backbone_weights=None))
    net.load_state_dict(payload["state_dict"])
    net.config = config
    net.eval()
    return net, config


def embed_sketches(net_or_run: EmbeddingNet | str | Path, sketches: SketchSet, batch: int = 1024) -> torch.Tensor:
    """(S, 17, D) phase-1 embeddings of every partial sketch of `sketches`, by a network or the one
    saved in a phase-1 run directory: what the export holds, for sketches it never saw (edited,
    re-imported, with added strokes). Rendered as `darp pretrain` renders them."""
    net = net_or_run if isinstance(net_or_run, EmbeddingNet) else load_embedding_net(net_or_run)[0]
    return embed_sketch_levels(net, first_ink_level(sketches, net.config.image_size), batch)


def noisy_episode_data(split, gallery, net_or_run: EmbeddingNet | str | Path, strokes: int, seed: int, image_size: int,
                       photo_grids: torch.Tensor | None = None):
    """Episodes of the Dataset `split` with `strokes` unnecessary strokes added to every sketch
    (sketch_env.strokes.with_noise_strokes: what `darp evaluate --noise-strokes N --noise-seed S` ranks),
    ranked in `gallery`, their partial sketches embedded by the phase-1 network (they are not in the export).
    photo_grids: the gallery's local grids (local matching): the noisy sketches' grids are computed too."""
    from sketch_env.episodes import episode_data
    from sketch_env.strokes import with_noise_strokes

    noisy = with_noise_strokes(split, strokes, seed)
    net = net_or_run if isinstance(net_or_run, EmbeddingNet) else load_embedding_net(net_or_run)[0]
    grids = {}
    if photo_grids is not None:
        from policies.local_descriptors import embed_sketch_grids

        grids = {"sketch_grids": embed_sketch_grids(net, noisy.sketches), "photo_grids": photo_grids}
    return episode_data(noisy, gallery, embed_sketches(net, noisy.sketches), image_size, **grids)


def embed_photos(net_or_run: EmbeddingNet | str | Path, photos: PhotoSet, batch: int = 512) -> torch.Tensor:
    """(N, D) phase-1 embeddings of `photos`, by a network or the one saved in a phase-1 run directory."""
    net = net_or_run if isinstance(net_or_run, EmbeddingNet) else load_embedding_net(net_or_run)[0]
    return embed_photo_inputs(net, photo_inputs(photos.decode_all(photo_decode_size(net.config)), net.config), batch)


def reembedders(run_dir: str | Path, log: Callable[[str], None] | None = None) -> dict[str, Callable]:
    """`embed_sketches=` and `embed_photos=` for sketch_env's episode loaders (`load_episode_data`):
    they re-embed what changed since the export with the network of phase-1 run `run_dir`, loaded
    on first use (never, when nothing changed). `log` is told how many items each call re-embeds."""
    net = functools.cache(lambda: load_embedding_net(run_dir)[0])

    def sketches(s: SketchSet) -> torch.Tensor:
        if log is not None:
            log(f"re-embedding {len(s)} changed sketch(es) with the phase-1 network of {run_dir}")
        return embed_sketches(net(), s)

    def photos(p: PhotoSet) -> torch.Tensor:
        if log is not None:
            log(f"re-embedding {len(p)} changed photo(s) with the phase-1 network of {run_dir}")
        return embed_photos(net(), p)

    return {"embed_sketches": sketches, "embed_photos": photos}
