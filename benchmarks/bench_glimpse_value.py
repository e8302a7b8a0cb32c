"""What are glimpses worth to the query, and does where they are taken matter? (supervised only, no RLlib)

Trains DARP's networks (the RLlib module `darp train` builds, policies.darp.module) with the supervised
term alone on glimpses a fixed rule takes (policies.darp.warm_start: ink, newest-ink, centre, random), for as
many updates as an RL run would need hours for, and prints the best validation AUIR, then evaluates
the kept network with every other rule's glimpses. Read it as:
- no-attention vs a looking model with the same rule: what glimpses add to the phase-1 features at all
  (the ceiling of any locator; bench_feature_ceiling is the no-attention half);
- one network evaluated under different rules: how much where it looks matters to a trained network
  (a learned locator can only earn what the best and worst rule differ by, unless it finds better spots).

    python benchmarks/bench_glimpse_value.py --data DIR --embedding RUN [--models no-attention darp sharp]
        [--rules ink centre] [--seeds 0 1 2] [--updates 3000] [--jsonl OUT.jsonl]

Without --data/--embedding it runs on a small built-in data set with a synthetic phase-1 export
(sketch_env.synthetic): that only shows the benchmark works; its AUIR figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.phase1.embedding import noisy_episode_data  # noqa: E402
from policies.darp.supervised import SupervisedObjective  # noqa: E402
from policies.darp.warm_start import (  # noqa: E402
    FixedRuleEpisodes, WarmStartConfig, best_of, validation_auir, validation_ranks, warm_start, with_noisy_copies,
    VAL_SEED,
)
from sketch_env.data import load_dataset, select_split  # noqa: E402
from sketch_env.env import EnvConfig, action_space, observation_space  # noqa: E402
from sketch_env.episodes import load_episode_data  # noqa: E402
from sketch_env.locators import LOCATORS  # noqa: E402
from sketch_env.glimpse import integral_image  # noqa: E402
from sketch_env.metrics import auir, retrieval_metrics  # noqa: E402
from sketch_env.render import N_LEVELS  # noqa: E402
from sketch_env.synthetic import given_or_tiny_setup  # noqa: E402

COLUMNS = LOCATORS + ("own (gradient)",)
# model -> (module class name, environment options, model_config)
MODELS = {
    "no-attention": ("NoAttentionModule", dict(n_glimpses=1), {}),
    "darp": ("DARPModule", dict(n_glimpses=12), {}),
    "darp-3": ("DARPModule", dict(n_glimpses=3), {}),
    "sharp": ("DARPModule", dict(n_glimpses=3, image_size=128, glimpse_size=16, snap_to_ink=True),
              {"retina_encoder": "conv"}),
    "sharp-linear": ("DARPModule", dict(n_glimpses=3, image_size=128, glimpse_size=16, snap_to_ink=True), {}),
}


def build_module(name: str, env_config: EnvConfig, dim: int, dropout: float):
    from policies.baselines.feature_policies import NoAttentionModule
    from policies.darp.module import DARPModule

    cls = {"DARPModule": DARPModule, "NoAttentionModule": NoAttentionModule}[MODELS[name][0]]
    model_config = {"dropout": dropout, "n_heads": 6, "std": 0.1, **MODELS[name][2]}
    return cls(observation_space=observation_space(env_config, dim), action_space=action_space(dim),
               model_config=model_config)


def unroll(module, episodes: FixedRuleEpisodes, rows: torch.Tensor) -> torch.Tensor:
    """The module with its own locator (the mean of its heads), one step at a time, differentiable in the
    locations: the glimpse is bilinear in its location (glimpses_from_integral), so the queries' loss
    reaches the locator through what it made the sensor see. Returns queries (B, 17 G, D)."""
    from ray.rllib.core.columns import Columns

    base = episodes.batch(rows, module)
    obs, G, B = base[Columns.OBS], episodes.G, len(rows)
    images = episodes.episodes.images.index_select(0, rows).flatten(0, 1).float()
    integral = integral_image(images).reshape(B, N_LEVELS, images.shape[-2] + 1, images.shape[-1] + 1)
    state = {k: v for k, v in base[Columns.STATE_IN].items() if k in ("h", "c")}
    location = torch.zeros(B, 2)
    out = []
    for t in range(N_LEVELS * G):
        level = t // G
        glimpse = episodes.sensor.from_integral(integral[:, level], location).clamp(0.0, 1.0)
        step = {k: v[:, t : t + 1] for k, v in obs.items()}
        g = module.glimpse_net(glimpse[:, None], location[:, None], step["level"], step["sketch_embedding"])
        starts = torch.full((B,), t == 0)
        h, state = module.core(g, state, starts, step["sketch_embedding"][:, 0])
        base_q = step["sketch_embedding"] if module.residual_query else None
        out.append(module.action_net(h, base_q))
        location = module.locator(h[:, 0]).mean(dim=1)  # (B, 2): the heads' mean, as evaluation acts
    return torch.cat(out, 1)


def gradient_locator(module, train, val, objective, updates: int, eval_every: int, lr: float, seed: int):
    """Fine-tune only the locator heads of a trained reader by backpropagation through the sensor (an
    upper bound for what RL's estimate of the same gradient could find). Returns [(update, val AUIR)]."""
    torch.manual_seed(seed)
    for p in module.parameters():
        p.requires_grad_(False)
    for p in module.locator.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(module.locator.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)

    def val_auir() -> float:
        ranks = []
        with torch.no_grad():
            for start in range(0, len(val), 32):
                rows = torch.arange(start, min(start + 32, len(val)))
                q = unroll(module, val, rows)[:, val.G - 1 :: val.G]
                target = val.episodes.target_index.index_select(0, rows).repeat_interleave(N_LEVELS)
                ranks.append(val.episodes.gallery.rank(q.reshape(-1, q.shape[-1]), target).reshape(-1, N_LEVELS))
        return auir(torch.cat(ranks).numpy())

    history = [(0, val_auir())]
    for update in range(1, updates + 1):
        rows = torch.randint(0, len(train), (16,), generator=generator)
        batch = train.batch(rows, module)
        loss = objective(unroll(module, train, rows), batch, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if update % eval_every == 0:
            history.append((update, val_auir()))
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data")
    p.add_argument("--embedding")
    p.add_argument("--models", nargs="+", default=["no-attention", "darp", "sharp"], choices=sorted(MODELS))
    p.add_argument("--rules", nargs="+", default=["ink"], choices=LOCATORS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--updates", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--episodes-per-update", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--time-budget-s", type=float, default=0.0, help="per training run (0: no limit)")
    p.add_argument("--jsonl", help="append one line per run here")
    p.add_argument("--noise-copies", type=int, default=0, help="train also on this many noisy copies of the training sketches")
    p.add_argument("--noise-strokes", type=int, default=4, help="noise strokes of the noisiest copy")
    p.add_argument("--noise-eval", type=int, default=0,
                   help="also evaluate the kept network and the triplet network with this many noise strokes (seed 0)")
    p.add_argument("--gradient-locator-updates", type=int, default=0,
                   help="then fine-tune the locator heads alone by backpropagation through the sensor for this many "
                        "updates and report its own-locator AUIR (an upper bound for a learned locator on that reader)")
    args = p.parse_args()
    torch.set_num_threads(1)
    data, embedding, tiny = given_or_tiny_setup(args.data, args.embedding, "bench_glimpse")
    if tiny:
        args.updates, args.eval_every = min(args.updates, 100), min(args.eval_every, 50)
    loaded = {}
    results = {}
    for name in args.models:
        env_config = EnvConfig(data=data, embedding=embedding, **MODELS[name][1])
        size = env_config.image_size
        if size not in loaded:
            loaded[size] = (load_episode_data(data, embedding, "train", size), load_episode_data(data, embedding, "val", size))
        train, val = loaded[size]
        if args.noise_copies:
            train = with_noisy_copies(train, data, "train", embedding, args.noise_copies, args.noise_strokes, 0, size)
        val_split = select_split(load_dataset(data), "val")
        noisy_val = noisy_episode_data(val_split, val.gallery, embedding, args.noise_eval, 0, size) if args.noise_eval else None
        noisy_select = (noisy_episode_data(val_split, val.gallery, embedding, args.noise_strokes, VAL_SEED, size)
                        if args.noise_copies else None)
        objective = SupervisedObjective("infonce", train.gallery.embeddings.float(), 0.2)
        rules = ["centre"] if name == "no-attention" else args.rules
        for rule in rules:
            for seed in args.seeds:
                torch.manual_seed(seed)
                module = build_module(name, env_config, train.dim, args.dropout)
                config = WarmStartConfig(updates=args.updates, locator=rule, episodes_per_update=args.episodes_per_update,
                                         lr=args.lr, eval_every=args.eval_every, seed=seed, time_budget_s=args.time_budget_s)
                start = time.perf_counter()
                val_sets = [FixedRuleEpisodes(val, env_config, rule, VAL_SEED + seed)]
                if args.noise_copies:  # selected on clean and noisy validation sketches, as darp train does
                    val_sets.append(FixedRuleEpisodes(noisy_select, env_config, rule, VAL_SEED + seed))
                history = warm_start(module, FixedRuleEpisodes(train, env_config, rule, seed), val_sets, objective, config)
                seconds = time.perf_counter() - start
                step, best = best_of(history)
                cross = {}
                if name != "no-attention":
                    for other in LOCATORS:
                        cross[other] = validation_auir(module, FixedRuleEpisodes(val, env_config, other, 2000 + seed))
                row = dict(model=name, rule=rule, seed=seed, best_auir=best, best_update=step, last_auir=history[-1][1],
                           seconds=seconds, updates=history[-1][0], cross=cross, curve=history,
                           triplet_auir=auir(val.phase1_rank.numpy()))
                if noisy_val is not None:
                    n_photos = len(val.gallery)
                    clean = retrieval_metrics(validation_ranks(module, FixedRuleEpisodes(val, env_config, rule, VAL_SEED + seed)), n_photos)
                    noisy = retrieval_metrics(validation_ranks(module, FixedRuleEpisodes(noisy_val, env_config, rule, VAL_SEED + seed)), n_photos)
                    t_clean = retrieval_metrics(val.phase1_rank.numpy(), n_photos)
                    t_noisy = retrieval_metrics(noisy_val.phase1_rank.numpy(), n_photos)
                    row["noise"] = dict(clean=clean, noisy=noisy, triplet_clean=t_clean, triplet_noisy=t_noisy)
                    print(f"  +{args.noise_eval} noise strokes: AUIR {clean['auir']:.2f} -> {noisy['auir']:.2f}, acc@5 "
                          f"{clean['acc@5']:.2f} -> {noisy['acc@5']:.2f} | triplet AUIR {t_clean['auir']:.2f} -> "
                          f"{t_noisy['auir']:.2f}, acc@5 {t_clean['acc@5']:.2f} -> {t_noisy['acc@5']:.2f}", flush=True)
                if args.gradient_locator_updates and name != "no-attention":
                    own = gradient_locator(module, FixedRuleEpisodes(train, env_config, "centre", seed),
                                           FixedRuleEpisodes(val, env_config, "centre", seed), objective,
                                           args.gradient_locator_updates, args.eval_every, 1e-3, seed)
                    row["gradient_locator"] = own
                    cross["own (gradient)"] = max(a for _, a in own)
                    print(f"  gradient-trained locator: " + " ".join(f"{u}:{a:.2f}" for u, a in own), flush=True)
                results.setdefault((name, rule), []).append(row)
                print(f"{name:13} {rule:10} seed {seed}: best {best:6.2f} at {step:5d} | last {history[-1][1]:6.2f} | "
                      f"{seconds:5.0f}s | eval with " + " ".join(f"{k} {v:.2f}" for k, v in cross.items()), flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print(f"\ntriplet (phase 1) val AUIR {auir(loaded[next(iter(loaded))][1].phase1_rank.numpy()):.2f}")
    print(f"{'model':13} {'trained at':10} {'best val AUIR':>16}  " + "  ".join(f"{r:>14}" for r in COLUMNS))
    for (name, rule), rows in results.items():
        cells = [_mean_std([r["best_auir"] for r in rows])]
        cells += [_mean_std([r["cross"][o] for r in rows]) if o in rows[0]["cross"] else "-" for o in COLUMNS]
        print(f"{name:13} {rule:10} {cells[0]:>16}  " + "  ".join(f"{c:>14}" for c in cells[1:]))


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


if __name__ == "__main__":
    main()
