"""What choosing glimpse cells can gain in local match (issue 23), and how widely a locator spreads them.

Two tables on one split (validation by default):

1. Headroom, on the phase-1 network's own queries, ranks in closed form (the env's score, sketch_env.local_match):
   score_j = ||q - e_j||^2 + w x mean over the cells C read at the level of the local distance at c to photo j.
   Rows: no cell (global ranking), every inked cell (dense-ink: reproduces `darp evaluate --match dense-ink`),
   k distinct inked cells drawn uniformly, and the label oracle: k distinct inked cells chosen greedily to give
   the true photo its best rank (ties: the smallest sum of hinge margins). The oracle reads the answer, so no
   locator reaches it; it bounds what choosing cells could gain with these descriptors.
2. Spread, for each DARP-local run given (`--run`, and the phase-1 network in local match): AUIR with the run's
   own locator and with rules in its place: ink, random, ink-1 (one inked pixel per level, drawn once: every
   glimpse of the level reads it) and ink-centroid (the centroid of the level's ink: where a Gaussian mean
   imitating the ink rule tends), beside the distinct cells of an 8 x 8 grid each episode visits.

    python benchmarks/bench_local_attention.py --data DATA --embedding P1 [--run DARP_LOCAL_RUN ...] [--split val]

Without --data/--embedding: a tiny synthetic set with synthetic grids, table 1 only (figures mean nothing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from sketch_env.geometry import pixel_to_location
from sketch_env.local_match import LocalGallery, inked_cells
from sketch_env.locators import InkTable
from sketch_env.metrics import retrieval_metrics
from sketch_env.render import N_LEVELS


def headroom_rows(episodes, ks=(1, 3, 12), local_weight: float = 1.0, seed: int = 0) -> list[tuple[str, dict]]:
    """(name, metrics) of table 1 for EpisodeData with local grids."""
    s, n = len(episodes.sketch_id), len(episodes.gallery)
    rows = s * N_LEVELS
    e = torch.as_tensor(episodes.gallery.embeddings, dtype=torch.float32)
    q = episodes.sketch_embedding.clamp(-1, 1).reshape(rows, -1).float()
    g = (e * e).sum(1)[None] - 2 * q @ e.T  # (R, N): ||q - e||^2 up to a constant per query
    h, w, d = episodes.sketch_grids.shape[-3:]
    cells = h * w
    grids = episodes.sketch_grids.reshape(rows * cells, d).float()
    distance = LocalGallery(episodes.photo_grids).distance_at(grids, torch.arange(cells).repeat(rows))
    distance = local_weight * distance.view(rows, cells, n)
    ink = inked_cells(episodes.images.reshape(rows, *episodes.images.shape[-2:]), h, w)
    ink = torch.where(ink.any(1, keepdim=True), ink, torch.ones_like(ink))  # blank level: every cell
    target = torch.as_tensor(episodes.target_index).repeat_interleave(N_LEVELS)

    def metrics(scores):
        ranks = 1 + (scores < scores.gather(1, target[:, None])).sum(1)
        return retrieval_metrics(ranks.view(s, N_LEVELS).numpy(), n)

    def mean_over(chosen, valid):
        picked = distance.gather(1, chosen[:, :, None].expand(-1, -1, n))
        return (picked * valid[:, :, None]).sum(1) / valid.sum(1).clamp(min=1)[:, None]

    out = [("no cell (global ranking)", metrics(g)),
           ("every inked cell (dense-ink)", metrics(g + mean_over(torch.arange(cells).expand(rows, -1), ink.float())))]
    generator = torch.Generator().manual_seed(seed)
    for k in ks:
        cells_text = f"{k} inked cell{'s' if k > 1 else ''}"
        order = torch.rand(rows, cells, generator=generator).masked_fill(~ink, 2.0).argsort(1)[:, :k]
        out.append((f"{cells_text} drawn uniformly", metrics(g + mean_over(order, ink.gather(1, order).float()))))
        out.append((f"oracle: {cells_text} chosen knowing the photo", metrics(g + _oracle_term(g, distance, ink, target, k))))
    return out


def _oracle_term(g, distance, ink, target, k: int) -> torch.Tensor:
    """(R, N) mean local distance over k distinct inked cells picked greedily for the target's best rank."""
    rows, cells, n = distance.shape
    total, count = torch.zeros(rows, n), torch.zeros(rows, 1)
    used = ~ink
    every = torch.arange(rows)
    for _ in range(k):
        candidate = g[:, None] + (total[:, None] + distance) / (count[:, None] + 1)  # (R, cells, N)
        own = candidate.gather(2, target[:, None, None].expand(-1, cells, 1))
        rank = (candidate < own).sum(2).float()
        objective = (rank * 1e6 + (own - candidate).clamp(min=0).sum(2)).masked_fill(used, float("inf"))
        best = objective.argmin(1)
        fresh = ~used[every, best]  # False once a level has no unread inked cell left
        total += distance[every, best] * fresh[:, None]
        count += fresh[:, None].float()
        used[every, best] = True
    return total / count.clamp(min=1)


class PerLevel:
    """A locator fixed per (sketch, level): table (S, 17, 2) of locations."""

    def __init__(self, table: torch.Tensor):
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def __call__(self, sketch_index, level) -> np.ndarray:
        level = torch.as_tensor(np.asarray(level)).clamp(max=N_LEVELS - 1)
        return self.table[torch.as_tensor(np.asarray(sketch_index)), level].numpy()


def ink_one(episodes, seed: int) -> PerLevel:
    """One uniformly drawn inked pixel per sketch and level."""
    table, generator = InkTable.from_renders(episodes.images), torch.Generator().manual_seed(seed)
    s = len(episodes.sketch_id)
    return PerLevel(torch.stack([table("ink", torch.arange(s), torch.full((s,), lv), generator) for lv in range(N_LEVELS)], 1))


def ink_centroid(episodes) -> PerLevel:
    """The centroid of each partial sketch's ink (the centre where a level has none)."""
    images = episodes.images > 0
    h, w = images.shape[-2:]
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = pixel_to_location(torch.stack([cols, rows], -1).reshape(-1, 2), (w, h))
    weights = images.reshape(*images.shape[:2], -1).float()
    return PerLevel(weights @ centres / weights.sum(-1, keepdim=True).clamp(min=1))


def spread_rows(module, env, episodes, own: bool, seed: int) -> list[tuple[str, dict, float]]:
    """(locator, metrics, distinct cells per episode) for the policy's own locator (if `own`) and each rule."""
    from policies.darp.rollout import FixedLocator, rollout_ranks

    rules = {"policy": None} if own else {}
    rules |= {"ink": FixedLocator("ink", episodes, seed), "random": FixedLocator("random", episodes, seed),
              "ink-1": ink_one(episodes, seed), "ink-centroid": ink_centroid(episodes)}
    out = []
    for name, locator in rules.items():
        rollout = rollout_ranks(module, env, np.arange(len(episodes.sketch_id)), locator=locator)
        out.append((name, retrieval_metrics(rollout.ranks, len(episodes.gallery)), float(rollout.cells.mean())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="data set directory")
    parser.add_argument("--embedding", help="phase-1 run trained with --local-dim (darp pretrain)")
    parser.add_argument("--run", nargs="*", default=[], help="DARP runs trained with --match local on that phase 1")
    parser.add_argument("--split", default="val")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 12], help="cells read per level in table 1")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn cells and of the random rules")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from policies.running.trained import load_episodes

    if args.data and args.embedding:
        episodes = load_episodes(args.embedding, args.data, args.split, 64, True)
    else:
        from sketch_env.synthetic import given_or_tiny_setup, with_local_grids

        data, embedding, _ = given_or_tiny_setup(None, None, "bench_local_attention")
        episodes = with_local_grids(load_episodes(embedding, data, "train", 64))
    print(f"## Headroom: the phase-1 network's queries, {len(episodes.sketch_id)} sketches, {len(episodes.gallery)} photos\n")
    print("| cells read per level | AUIR | acc@1 | acc@5 | m@A |\n|---|---|---|---|---|")
    for name, m in headroom_rows(episodes, args.ks, seed=args.seed):
        print(f"| {name} | {m['auir']:.2f} | {m['acc@1']:.2f} | {m['acc@5']:.2f} | {m['m_at_a']:.2f} |", flush=True)
    if not args.run:
        return

    from policies.running.trained import Phase1Query, check_match, load_module, load_run_episodes, make_env, read_run, run_spaces
    from sketch_env.vector_env import make_vector_env

    print("\n## Spread: own locator and rules in its place\n")
    print("| network | locator | AUIR | acc@1 | acc@5 | distinct cells per sketch |\n|---|---|---|---|---|---|")
    for run_dir in map(Path, args.run):
        run = read_run(run_dir)
        match = check_match(run, run_dir, None)
        run_episodes = load_run_episodes(run, args.data, args.split, match=match)
        env = make_env(run, args.data, args.split, num_envs=64, episodes=run_episodes, match=match)
        name = f"{run_dir.name} (seed {run['config']['seed']})"
        for locator, m, cells in spread_rows(load_module(run_dir, *run_spaces(run)), env, run_episodes, True, args.seed):
            print(f"| {name} | {locator} | {m['auir']:.2f} | {m['acc@1']:.2f} | {m['acc@5']:.2f} | {cells:.1f} |", flush=True)
    glimpses = read_run(Path(args.run[0]))["config"]["n_glimpses"]
    options = {"match": "local", "n_glimpses": glimpses, "sketch_order": "sequential", "num_envs": 64, "episodes": episodes}
    for locator, m, cells in spread_rows(Phase1Query(), make_vector_env(options), episodes, False, args.seed):
        print(f"| phase 1 ({glimpses} glimpses) | {locator} | {m['auir']:.2f} | {m['acc@1']:.2f} | {m['acc@5']:.2f} | "
              f"{cells:.1f} |", flush=True)


if __name__ == "__main__":
    main()
