"""Cost of phase 1 on 2 CPU threads: training steps and embedding throughput per backbone.

For each backbone: sketch-photo pairs per second of one triplet training step (batch 32 pairs,
augmentation, batch-hard loss, Adam) and 64 x 64 images per second embedded in eval mode (what
validation and the export of S x 17 partial sketches cost), plus the edge maps per second of
`photo_edges` on 256 x 256 photos. The fastest of repeated calls is reported: on a shared machine
slower calls measure the other jobs. Run:

    .venv/bin/python benchmarks/bench_phase1.py [--seconds 3] [--backbones compact resnet18]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from policies.embedding import EmbeddingConfig, EmbeddingNet, photo_edges
from policies.triplet import batch_triplet_loss, random_affine


def best_rate(call, items: int, seconds: float) -> float:
    """Items per second of the fastest of repeated calls within `seconds` (after one warm-up call)."""
    call()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > deadline:
            return items / best


def bench_backbone(backbone: str, seconds: float, batch: int = 32, size: int = 64) -> tuple[float, float]:
    """(training pairs/s, embedded images/s) of one backbone with edge-map photos."""
    torch.manual_seed(0)
    net = EmbeddingNet(EmbeddingConfig(backbone=backbone, image_size=size))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    sketches = (torch.rand(batch, 1, size, size) > 0.9).float()
    photos = (torch.rand(batch, 1, size, size) > 0.9).float()
    labels = torch.arange(batch)

    def step() -> None:
        s, p = net(random_affine(sketches), random_affine(photos))
        loss = batch_triplet_loss(s, p, labels, margin=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    net.train()
    train_rate = best_rate(step, batch, seconds)
    net.eval()
    images = (torch.rand(256, 1, size, size) > 0.9).float()
    with torch.no_grad():
        embed_rate = best_rate(lambda: net.embed_sketches(images), len(images), seconds)
    return train_rate, embed_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--backbones", nargs="+", default=["compact", "mobilenet_v3_small", "resnet18"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    photos = np.random.default_rng(0).integers(0, 256, (64, 256, 256, 3), dtype=np.uint8)
    edges = best_rate(lambda: photo_edges(photos, 64), len(photos), args.seconds)
    print(f"photo_edges 256 -> 64: {edges:,.0f} photos/s")
    print(f"{'backbone':<20} {'train pairs/s':>14} {'embed images/s':>15} {'export 1200 x 17 (s)':>21}")
    for backbone in args.backbones:
        train_rate, embed_rate = bench_backbone(backbone, args.seconds)
        print(f"{backbone:<20} {train_rate:>14,.0f} {embed_rate:>15,.0f} {1200 * 17 / embed_rate:>21,.1f}")


if __name__ == "__main__":
    main()
