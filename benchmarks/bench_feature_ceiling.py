"""How far can a query correction learned from phase-1 features alone go? (no RLlib, no glimpses)

Trains DARP's no-attention networks (policies.darp.networks: GlimpseNetwork(attention=False), the
core RNN over the 17 completion levels, the residual action network) with the supervised objective
of `darp train` (policies.darp.supervised) on the precomputed phase-1 embeddings of the training split's
partial sketches, full episodes per minibatch, and prints the validation AUIR every `--eval-every`
updates. This is the ceiling of what the supervised term can add on top of the triplet network
without new information from the sketch's pixels, and it shows when that correction starts to
overfit the training photos (the place to stop, or to regularise with `--dropout`). Seconds per
thousand updates on one core, so it runs where an RLlib run would take many minutes.

    python benchmarks/bench_feature_ceiling.py --data DIR --embedding RUN [--dropout 0 0.3]
        [--updates 4000] [--sup-loss infonce mse] [--seeds 0]

Without --data/--embedding it runs on a small built-in data set with a synthetic phase-1 export
(sketch_env.synthetic): that only shows the benchmark works; its AUIR figures mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.darp.networks import ActionNetwork, CoreNetwork, GlimpseNetwork  # noqa: E402
from policies.darp.supervised import TARGET_EMBEDDING, TARGET_INDEX, SupervisedObjective  # noqa: E402
from sketch_env.episodes import load_episode_data  # noqa: E402
from sketch_env.metrics import auir  # noqa: E402
from sketch_env.synthetic import given_or_tiny_setup  # noqa: E402
from sketch_env.render import N_LEVELS  # noqa: E402


class FeatureOnlyPolicy(torch.nn.Module):
    """DARP without attention, one step per level: (S, 17, D) phase-1 embeddings -> (S, 17, D) queries."""

    def __init__(self, dim: int, dropout: float, hidden: int = 256, glimpse_hidden: int = 128):
        super().__init__()
        self.glimpse = GlimpseNetwork((1, 1, 1), dim, glimpse_hidden, use_sketch_embedding=True, attention=False)
        self.core = CoreNetwork(glimpse_hidden, dim, hidden)
        self.action = ActionNetwork(hidden, dim, zero_init=True, dropout=dropout)

    def forward(self, embedding: torch.Tensor, train: bool = False) -> torch.Tensor:
        S = embedding.shape[0]
        level = torch.arange(N_LEVELS).expand(S, N_LEVELS)
        g = self.glimpse(None, None, level, embedding)
        h, _ = self.core(g, {"h": torch.zeros(S, self.core.hidden)}, torch.ones(S, dtype=torch.bool), embedding[:, 0])
        return self.action(h, embedding, train=train)


def run(train, val, sup_loss: str, dropout: float, updates: int, batch: int, lr: float, eval_every: int, seed: int):
    """[(updates, val AUIR)] of one training run."""
    torch.manual_seed(seed)
    gallery = train.gallery.embeddings.float()
    objective = SupervisedObjective(sup_loss, gallery if sup_loss == "infonce" else None)
    policy = FeatureOnlyPolicy(gallery.shape[1], dropout)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    x, target = train.sketch_embedding.float(), train.target_index
    history = []
    for step in range(1, updates + 1):
        rows = torch.randint(0, len(x), (batch,))
        goal = target[rows, None].expand(batch, N_LEVELS)
        loss = objective(policy(x[rows], train=True), {TARGET_INDEX: goal, TARGET_EMBEDDING: gallery[goal]}, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0:
            with torch.no_grad():
                query = policy(val.sketch_embedding.float())
            ranks = val.gallery.rank(query.reshape(-1, query.shape[-1]), val.target_index.repeat_interleave(N_LEVELS))
            history.append((step, auir(ranks.reshape(-1, N_LEVELS).numpy())))
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data")
    p.add_argument("--embedding")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--sup-loss", nargs="+", default=["infonce"], choices=["infonce", "mse"])
    p.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--updates", type=int, default=4000)
    p.add_argument("--batch", type=int, default=16, help="episodes per update (as --minibatch-episodes)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=250)
    args = p.parse_args()
    torch.set_num_threads(1)
    data, embedding, tiny = given_or_tiny_setup(args.data, args.embedding, "bench_ceiling")
    if tiny:
        args.updates, args.eval_every = min(args.updates, 500), min(args.eval_every, 250)
    train = load_episode_data(data, embedding, args.train_split, image_size=8)
    val = load_episode_data(data, embedding, args.val_split, image_size=8)
    print(f"{len(train.sketch_id)} training sketches, {len(val.sketch_id)} validation sketches, "
          f"{len(val.gallery)} validation photos; triplet (phase 1) val AUIR {auir(val.phase1_rank.numpy()):.2f}")
    print(f"{'loss':8} {'dropout':>7} {'seed':>4} {'best AUIR':>9} {'at update':>9} {'last':>6} {'s':>5}  curve")
    for sup_loss in args.sup_loss:
        for dropout in args.dropout:
            for seed in args.seeds:
                start = time.perf_counter()
                history = run(train, val, sup_loss, dropout, args.updates, args.batch, args.lr, args.eval_every, seed)
                best_step, best = max(history, key=lambda item: item[1])
                curve = " ".join(f"{a:.1f}" for _, a in history)
                print(f"{sup_loss:8} {dropout:7.2f} {seed:4d} {best:9.2f} {best_step:9d} {history[-1][1]:6.2f} "
                      f"{time.perf_counter() - start:5.0f}  {curve}", flush=True)


if __name__ == "__main__":
    main()
