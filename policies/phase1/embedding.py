"""The phase-1 embedding network: sketches and photos -> L2-normalised D-dim embeddings.

Backbones (`policies.phase1.backbones`): a compact 4-block CNN that trains from scratch on a couple of CPU
cores, or a torchvision classifier built with ``weights=None``: nothing is ever downloaded, pretrained
weights only come from a state-dict file the user gives, or HED's VGG16 (``backbone_weights``). Its
first ``frozen_stages`` stages can stay fixed (`stem_*`), so phase 1 computes them once per image and
trains the rest (`embed_*_stems`). Sketch and photo branches share one backbone by default.

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

from policies.phase1.backbones import Backbone, Trunk, compact_trunk, normalise_input, torchvision_trunk
from policies.phase1.edges import photo_edges
from policies.phase1.local_descriptors import LocalHead, photo_grids, sketch_level_grids
from sketch_env.atomic import atomic_write
from sketch_env.data import DataError, PhotoSet, SketchSet
from sketch_env.render import N_LEVELS, first_ink_level

PhotoInput = Literal["edges", "hed", "rgb"]
NET_FILE = "embedding_net.pt"


@dataclass
class EmbeddingConfig:
    """Architecture of the embedding network (saved next to its weights).

    backbone: `policies.phase1.backbones` (compact, or a torchvision classifier). backbone_weights: a state
    dict in torchvision's layout, or "hed" for vgg16 (None: random initialisation). frozen_stages:
    how many of the backbone's first stages keep their weights (phase 1 caches their output).
    photo_input: how photos enter: `photo_edges` (gradient edges), `policies.phase1.hed.hed_edges` (learned
    HED edges) or RGB. width: channels of the compact trunk's first block (doubling per block).
    tta_flip: in eval mode, embed every image and its mirror image and average (queries and gallery).
    local_dim: size d of the local descriptors read from the trunk's feature map (policies.phase1.local_descriptors;
    0: none).
    """

    backbone: Backbone = "compact"
    embedding_dim: int = 64
    image_size: int = 64
    shared_branches: bool = True
    photo_input: PhotoInput = "edges"
    backbone_weights: str | None = None
    frozen_stages: int = 0
    width: int = 16
    tta_flip: bool = False
    local_dim: int = 0


class EmbeddingNet(nn.Module):
    """Sketch and photo branches mapping images to L2-normalised embeddings.

    embed_sketches: (B, 1, H, W) ink images in [0, 1] -> (B, D)
    embed_photos:   (B, C, H, W) edge maps (C = 1) or RGB in [0, 1] (C = 3) -> (B, D)
    Each is `stem` (the frozen stages, a fixed function of the image) then the trained rest:
    embed_sketches(x) == embed_sketch_stems(stem_sketches(x)), likewise for photos.
    """

    def __init__(self, config: EmbeddingConfig):
        super().__init__()
        self.config = config
        photo_channels = 3 if config.photo_input == "rgb" else 1
        self.in_channels = photo_channels if config.backbone == "compact" else 3
        self.sketch_trunk = self._make_trunk()
        features = self.sketch_trunk.features
        self.sketch_head = nn.Linear(features, config.embedding_dim)
        if config.shared_branches:
            self.photo_trunk, self.photo_head = self.sketch_trunk, self.sketch_head
        else:
            self.photo_trunk = copy.deepcopy(self.sketch_trunk)
            self.photo_head = nn.Linear(features, config.embedding_dim)
        self.local_head = None  # local descriptors (issue 23): one head for both branches, on feature_map
        if config.local_dim:
            self.local_head = LocalHead(self._feature_map_channels(), config.local_dim)

    def _make_trunk(self) -> Trunk:
        c = self.config
        if c.backbone == "compact":
            if c.backbone_weights:
                raise DataError("the compact backbone trains from scratch: --backbone-weights needs a torchvision backbone")
            trunk = compact_trunk(self.in_channels, c.width)
            if c.frozen_stages:
                trunk = Trunk(list(trunk.stages), trunk.features, c.frozen_stages)
            return trunk
        return torchvision_trunk(c.backbone, c.backbone_weights, c.frozen_stages)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The trained parameters of the trunk(s) (not the heads): what a lower learning rate fine-tunes."""
        trunks = {id(t): t for t in (self.sketch_trunk, self.photo_trunk)}.values()
        return [p for t in trunks for p in t.parameters() if p.requires_grad]

    LOCAL_STAGE = 2  # the compact trunk's third block: an (image_size / 8)^2 map of 4 x width channels

    def feature_map_layers(self) -> tuple[nn.Module, nn.Module]:
        """The (sketch, photo) trunk stages whose outputs are the conv feature maps before pooling that
        local descriptors read: the compact trunk's third block, an (image_size / 8)^2 map of 4 x width
        channels (8 x 8 at 64 px). Other backbones have none yet."""
        if self.config.backbone != "compact":
            raise ValueError(f"local descriptors need the compact backbone for now, not {self.config.backbone!r}")
        return self.sketch_trunk.stages[self.LOCAL_STAGE], self.photo_trunk.stages[self.LOCAL_STAGE]

    def feature_map(self, x: torch.Tensor, photo: bool = False) -> torch.Tensor:
        """The trunk's conv feature map (B, C, h, w) of images x before pooling (`feature_map_layers`)."""
        self.feature_map_layers()
        x = self._prepare(x)
        for stage in (self.photo_trunk if photo else self.sketch_trunk).stages[: self.LOCAL_STAGE + 1]:
            x = stage(x)
        return x

    def _feature_map_channels(self) -> int:
        self.feature_map_layers()
        return 4 * self.config.width

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Match the trunk's input: channel count, and for torchvision trunks the look of their weights'
        training data (`backbones.normalise_input`: line drawings as dark ink on white, normalised)."""
        if x.shape[1] not in (1, self.in_channels):
            raise ValueError(f"expected images with 1 or {self.in_channels} channels, got shape {tuple(x.shape)}")
        if self.config.backbone == "compact":
            return x.expand(-1, self.in_channels, -1, -1)
        return normalise_input(x, self.config.backbone)

    def stem_sketches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> the sketch trunk's frozen stages' output (no gradient)."""
        return self.sketch_trunk.stem(self._prepare(x))

    def stem_photos(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the photo trunk's frozen stages' output (no gradient)."""
        return self.photo_trunk.stem(self._prepare(x))

    def embed_sketch_stems(self, f: torch.Tensor) -> torch.Tensor:
        """`stem_sketches` output -> (B, D), unit L2 norm."""
        return F.normalize(self.sketch_head(self.sketch_trunk.tail(f.float())), dim=1)

    def embed_photo_stems(self, f: torch.Tensor) -> torch.Tensor:
        """`stem_photos` output -> (B, D), unit L2 norm."""
        return F.normalize(self.photo_head(self.photo_trunk.tail(f.float())), dim=1)

    def _embed(self, stem, embed_stems, x: torch.Tensor) -> torch.Tensor:
        """Unit embeddings; with `tta_flip` in eval mode, of the image and its mirror image averaged."""
        if self.config.tta_flip and not self.training:
            both = embed_stems(stem(torch.cat([x, x.flip(-1)])))
            return F.normalize(both[: len(x)] + both[len(x) :], dim=1)
        return embed_stems(stem(x))

    def embed_sketches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, D), unit L2 norm."""
        return self._embed(self.stem_sketches, self.embed_sketch_stems, x)

    def embed_photos(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D), unit L2 norm."""
        return self._embed(self.stem_photos, self.embed_photo_stems, x)

    def forward(self, sketches: torch.Tensor, photos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of sketches (B, 1, H, W) and photos (M, C, H, W): ((B, D), (M, D))."""
        return self.forward_stems(self.stem_sketches(sketches), self.stem_photos(photos))

    def forward_stems(self, sketch_stems: torch.Tensor, photo_stems: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` from the stems' outputs (phase 1's cache): ((B, D), (M, D)).

        Shared branches run both through the trunk in one pass, so batch norm sees the same mix
        of sketches and photos in training as its running statistics hold at evaluation.
        """
        if not self.config.shared_branches:
            return self.embed_sketch_stems(sketch_stems), self.embed_photo_stems(photo_stems)
        both = self.embed_sketch_stems(torch.cat([sketch_stems.float(), photo_stems.float()]))
        return both[: len(sketch_stems)], both[len(sketch_stems) :]


def photo_inputs(photos, config: EmbeddingConfig, chunk: int = 64) -> torch.Tensor:
    """The photo branch's input for `config`: (N, H, W, 3) uint8 -> (N, C, size, size) float in [0, 1].

    Works through `chunk` photos at a time to bound the memory of the full-resolution edge maps.
    """
    photos = torch.as_tensor(photos)
    size = config.image_size
    if config.photo_input == "hed":
        from policies.phase1.hed import hed_edges

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
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or corrupt files
        raise DataError(f"{path}: cannot read the embedding network ({str(e).splitlines()[0]})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise DataError(f"{path}: not an embedding network saved by `darp pretrain`")
    try:
        config = EmbeddingConfig(**payload["config"])
        net = EmbeddingNet(dataclasses.replace(config, backbone_weights=None))
        net.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise DataError(f"{path}: the saved network does not load ({str(e).splitlines()[0]})") from None
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


def _local_net(net_or_run):
    net = net_or_run if isinstance(net_or_run, EmbeddingNet) else load_embedding_net(net_or_run)[0]
    if net.local_head is None:
        raise ValueError("this phase-1 network has no local descriptors (train it with --local-dim)")
    return net


def embed_sketch_grids(net_or_run, sketches: SketchSet, batch: int = 1024) -> torch.Tensor:
    """(S, 17, h, w, d) grids of `sketches` by a network or the one in a phase-1 run (for sketches the
    export never saw: edited, or with noise strokes)."""
    net = _local_net(net_or_run)
    return sketch_level_grids(net, first_ink_level(sketches, net.config.image_size), batch)


def embed_photo_grids(net_or_run, photos: PhotoSet, batch: int = 512) -> torch.Tensor:
    """(N, h, w, d) grids of `photos` by a network or the one in a phase-1 run."""
    net = _local_net(net_or_run)
    return photo_grids(net, photo_inputs(photos.decode_all(photo_decode_size(net.config)), net.config), batch)


def grid_reembedders(run_dir: str | Path) -> dict:
    """`embed_sketch_grids=` and `embed_photo_grids=` for `sketch_env.episodes.load_episode_data`: the changed
    items' grids by the network of phase-1 run `run_dir`, loaded on first use."""
    net = functools.cache(lambda: load_embedding_net(run_dir)[0])
    return {"embed_sketch_grids": lambda s: embed_sketch_grids(net(), s),
            "embed_photo_grids": lambda p: embed_photo_grids(net(), p)}
