"""Supervised warm start: DARP's glimpse network, core and action network trained on glimpses taken
where a fixed rule looks, before the locator learns anything by RL.

Why: in an RL run the glimpse pathway learns from the supervised term only as fast as episodes are
sampled (17 levels x G glimpses per episode, ~35 updates in 180 s on Chair-V2), so at the end of a
run it has barely learned to read glimpses, and a locator cannot learn where to look while what it
sees means nothing yet. Where a fixed rule (`sketch_env.locators`: ink, newest-ink, centre, random)
looks does not depend on the policy, so whole episodes of observations are built here as tensors in
one go (the environment's observation rule: the glimpse at step t is taken at the location chosen at
step t - 1 on level t // G, the centre at t = 0) and the networks learn from them by plain minibatch
gradient steps, hundreds per minute. The method's parts are unchanged: the supervised term is the
one `darp train` uses (policies.darp.supervised), and afterwards RL trains the locator as before, now on
a glimpse pathway that reads glimpses (method.md's "glimpse pathway first trained with the
supervised term at on-ink locations, then the locator by RL").

    episodes = FixedRuleEpisodes(train_episodes, env_config, rule="ink", seed=0)
    history = warm_start(module, episodes, FixedRuleEpisodes(val_episodes, env_config, "ink"), objective,
                         WarmStartConfig(updates=2000))

The kept weights are those of the best validation AUIR (the validation split's glimpses are taken by
the same rule with a fixed seed, so every validation sees the same glimpses).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import tree
from ray.rllib.core.columns import Columns

from policies.phase1.embedding import load_embedding_net, noisy_episode_data
from policies.darp.rollout import initial_state
from policies.darp.supervised import TARGET_EMBEDDING, TARGET_INDEX, SupervisedObjective
from sketch_env.env import EnvConfig
from sketch_env.episodes import EpisodeData, load_episode_data
from sketch_env.glimpse import GlimpseSensor, integral_image
from sketch_env.local_match import cell_ink, cell_of
from sketch_env.locators import LOCATORS, InkTable, nearest_ink
from sketch_env.metrics import auir
from sketch_env.render import N_LEVELS

VAL_CHUNK = 32  # validation episodes per forward pass
VAL_SEED = 1000  # + the seed: the validation glimpses' stream, apart from the training one


@dataclass
class WarmStartConfig:
    """updates: gradient steps (0: no warm start); locator: the fixed rule glimpses are taken by;
    episodes_per_update: whole episodes per step; eval_every: validate every this many steps;
    time_budget_s: stop after this many seconds (0: no limit); noise_copies: train also on this many
    copies of the training sketches with unnecessary strokes added (copy c: noise_strokes x (c + 1) /
    noise_copies strokes, `with_noisy_copies`), so the networks learn to discount them; the weights kept
    are then those of the best mean AUIR over the clean validation sketches and a copy with noise_strokes
    strokes (its own seed, not evaluation's)."""

    updates: int = 0
    locator: str = "ink"
    episodes_per_update: int = 16
    lr: float = 3e-4
    eval_every: int = 100
    seed: int = 0
    time_budget_s: float = 0.0
    noise_copies: int = 0
    noise_strokes: int = 4

    def __post_init__(self):
        if self.locator not in LOCATORS:
            raise ValueError(f"warm-start locator must be one of {LOCATORS}, got {self.locator!r}")
        if self.noise_copies < 0 or self.noise_strokes < 1:
            raise ValueError("warm start needs noise_copies >= 0 and noise_strokes >= 1")
        if self.updates < 0 or self.episodes_per_update < 1 or self.eval_every < 1:
            raise ValueError("warm start needs updates >= 0, episodes_per_update >= 1 and eval_every >= 1")


class FixedRuleEpisodes:
    """Whole episodes of observations (B, 17 G, ...) with the glimpses a fixed rule takes.

    `batch(rows)` is the train-batch dict a DARP-style RLModule's `_forward_train` reads (OBS,
    STATE_IN of episode starts) plus the supervised targets (TARGET_INDEX, TARGET_EMBEDDING).
    Locations are drawn from `seed`'s stream: `reseed()` replays it (fixed validation glimpses).
    """

    def __init__(self, episodes: EpisodeData, env_config: EnvConfig, rule: str, seed: int = 0):
        if rule not in LOCATORS:
            raise ValueError(f"unknown locator {rule!r}: choose from {LOCATORS}")
        self.episodes = episodes
        self.rule = rule
        self.seed = seed
        self.G = env_config.n_glimpses
        self.snap = env_config.snap_to_ink
        self.local = env_config.match != "global"  # observations also hold the local descriptor and cell ink
        self.sensor = GlimpseSensor(env_config.glimpse_size, env_config.n_patches, env_config.patch_scale)
        self.table = InkTable.from_renders(episodes.images)
        self.level = torch.arange(N_LEVELS).repeat_interleave(self.G)
        self.glimpse_index = torch.arange(self.G).repeat(N_LEVELS)
        self.reseed()

    def __len__(self) -> int:
        return len(self.episodes.sketch_id)

    def reseed(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def locations(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, 17, G, 2): where glimpse g of level L looks: the rule on level L's partial sketch (snapped
        onto its ink if the env snaps), the episode's first glimpse at the centre."""
        B = len(rows)
        sketch = rows.repeat_interleave(N_LEVELS * self.G)
        loc = self.table(self.rule, sketch, self.level.repeat(B), self.generator).reshape(B, N_LEVELS, self.G, 2)
        if self.snap and self.rule in ("centre", "random"):  # the ink rules' draws are inked pixels already
            images = self.episodes.images.index_select(0, rows).flatten(0, 1)  # (B * 17, H, W)
            snapped = [nearest_ink(images, loc[:, :, g].reshape(-1, 2)) for g in range(self.G)]
            loc = torch.stack(snapped, 1).reshape(B, N_LEVELS, self.G, 2)
        loc[:, 0, 0] = 0.0  # an episode starts at the centre (not snapped, as in the env)
        return loc

    def batch(self, rows: torch.Tensor, module) -> dict:
        """Episodes `rows` (B,) as a train batch on the module's device."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        B, T = len(rows), N_LEVELS * self.G
        loc = self.locations(rows)
        images = self.episodes.images.index_select(0, rows).flatten(0, 1).to(torch.float32)
        integral = integral_image(images)  # one per (sketch, level), read by all G glimpses of the level
        glimpses = torch.stack(
            [self.sensor.from_integral(integral, loc[:, :, g].reshape(-1, 2)) for g in range(self.G)], 1
        ).clamp_(0.0, 1.0)  # (B * 17, G, k, s, s)
        embedding = self.episodes.sketch_embedding.index_select(0, rows).float().clamp(-1.0, 1.0)
        obs = {
            "glimpse": glimpses.reshape(B, T, *glimpses.shape[2:]),
            "location": loc.reshape(B, T, 2),
            "level": self.level.expand(B, T),
            "glimpse_index": self.glimpse_index.expand(B, T),
            "sketch_embedding": embedding.repeat_interleave(self.G, 1),
        }
        if self.local:  # as sketch_env.env.build_observation: the grid at the glimpse's cell, the ink of every cell
            grids = self.episodes.sketch_grids.index_select(0, rows)  # (B, 17, h, w, d)
            h, w, d = grids.shape[2:]
            cells = cell_of(loc.reshape(-1, 2), h, w).view(B, N_LEVELS, self.G, 1).expand(-1, -1, -1, d)
            descriptor = grids.reshape(B, N_LEVELS, h * w, d).gather(2, cells).to(torch.float32).clamp_(-1.0, 1.0)
            obs["descriptor"] = descriptor.reshape(B, T, d)
            obs["cell_ink"] = cell_ink(integral, h, w).view(B, N_LEVELS, h * w).repeat_interleave(self.G, 1)
        state = initial_state(module, B)
        target = self.episodes.target_index.index_select(0, rows)[:, None].expand(B, T)
        gallery = self.episodes.gallery.embeddings.float()
        batch = {Columns.OBS: obs, Columns.STATE_IN: state, TARGET_INDEX: target, TARGET_EMBEDDING: gallery[target]}
        device = next(module.parameters()).device
        return batch if device.type == "cpu" else tree.map_structure(lambda x: x.to(device), batch)


def queries(module, batch: dict, train: bool = False) -> torch.Tensor:
    """The module's query (B, T, D) at every step of the batch's episodes (dropout only if `train`)."""
    h, _, _ = module._core(batch)
    return module.predict_query(h, batch, train=train)


def validation_auir(module, episodes: FixedRuleEpisodes) -> float:
    """AUIR on `episodes` with the rule's glimpses (the same ones every call)."""
    return auir(validation_ranks(module, episodes))


@torch.no_grad()
def validation_ranks(module, episodes: FixedRuleEpisodes) -> np.ndarray:
    """Ranks (S, 17) of the target photo after each level's last glimpse, the rule's glimpses replayed from its seed."""
    episodes.reseed()
    ranks = []
    for start in range(0, len(episodes), VAL_CHUNK):
        rows = torch.arange(start, min(start + VAL_CHUNK, len(episodes)))
        q = queries(module, episodes.batch(rows, module))[:, episodes.G - 1 :: episodes.G]  # (B, 17, D)
        target = episodes.episodes.target_index.index_select(0, rows).repeat_interleave(N_LEVELS)
        ranks.append(episodes.episodes.gallery.rank(q.reshape(-1, q.shape[-1]).cpu(), target).reshape(-1, N_LEVELS))
    return torch.cat(ranks).numpy()


def warm_start(module, train: FixedRuleEpisodes, val: FixedRuleEpisodes | list[FixedRuleEpisodes],
               objective: SupervisedObjective, config: WarmStartConfig, log=None) -> list[tuple[int, float]]:
    """Train `module` (in place) on `train`'s episodes with `objective`; keep the best validation AUIR.

    val: one validation set, or several (e.g. clean and noisy sketches): then the mean of their AUIRs.
    Returns [(update, val AUIR)], update 0 being the untrained module. `log(line)` gets one line per validation.
    """
    sets = val if isinstance(val, list) else [val]

    def validate() -> float:
        return float(np.mean([validation_auir(module, v) for v in sets]))

    torch.manual_seed(config.seed)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    module.train()
    history = [(0, validate())]
    best_auir, best_state = history[0][1], copy.deepcopy(module.state_dict())
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    for update in range(1, config.updates + 1):
        rows = torch.randint(0, len(train), (config.episodes_per_update,), generator=generator)
        batch = train.batch(rows, module)
        loss = objective(queries(module, batch, train=True), batch, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out_of_time = bool(config.time_budget_s) and time.perf_counter() - start >= config.time_budget_s
        if update % config.eval_every == 0 or update == config.updates or out_of_time:
            history.append((update, validate()))
            if history[-1][1] > best_auir:
                best_auir, best_state = history[-1][1], copy.deepcopy(module.state_dict())
            if log is not None:
                log(f"warm start {update:5d} updates {time.perf_counter() - start:6.0f}s | loss {loss.item():.4f} | "
                    f"val AUIR {history[-1][1]:6.2f} (best {best_auir:6.2f})")
        if out_of_time:
            break
    module.load_state_dict(best_state)
    return history


def with_noisy_copies(episodes: EpisodeData, data_dir, split: str, embedding_run, copies: int, strokes: int,
                      seed: int, image_size: int) -> EpisodeData:
    """`episodes` (the sketches of `split`, in load_episode_data's order) and `copies` noisy copies of them
    (policies.phase1.embedding.noisy_episode_data: copy c gets strokes x (c + 1) // copies strokes, seeded by
    10_000 + seed + c, apart from evaluation's noise seeds)."""
    if not copies:
        return episodes
    from sketch_env.data import load_dataset, select_split
    from sketch_env.episodes import concat_episode_data

    split_data = select_split(load_dataset(data_dir), split)
    net = load_embedding_net(embedding_run)[0]
    return concat_episode_data([episodes] + [
        noisy_episode_data(split_data, episodes.gallery, net, max(1, strokes * (c + 1) // copies), 10_000 + seed + c,
                           image_size, episodes.photo_grids)
        for c in range(copies)
    ])


def warm_start_learner(learner, config: WarmStartConfig, val_split: str = "val") -> list[tuple[int, float]]:
    """Warm-start a Learner's module (DARPLearner, SupervisedLearner) with its own supervised objective,
    on the training split of its env_config and glimpses as its environment takes them; returns the history."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    names = {f.name for f in dataclasses.fields(EnvConfig)}
    env = EnvConfig.from_options(None, {k: v for k, v in learner.config.env_config.items() if k in names})
    local = env.match != "global"
    train = load_episode_data(env.data, env.embedding, env.split, env.image_size, local=local)
    train = with_noisy_copies(train, env.data, env.split, env.embedding, config.noise_copies, config.noise_strokes,
                              config.seed, env.image_size)
    val = load_episode_data(env.data, env.embedding, val_split, env.image_size, local=local)
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    val_sets = [FixedRuleEpisodes(val, env, config.locator, VAL_SEED + config.seed)]
    if config.noise_copies:  # trained to discount unnecessary strokes: kept by clean and noisy validation alike
        from sketch_env.data import load_dataset, select_split

        noisy = noisy_episode_data(select_split(load_dataset(env.data), val_split), val.gallery, env.embedding,
                                   config.noise_strokes, VAL_SEED + config.seed, env.image_size, val.photo_grids)
        val_sets.append(FixedRuleEpisodes(noisy, env, config.locator, VAL_SEED + config.seed))
    return warm_start(module, FixedRuleEpisodes(train, env, config.locator, config.seed), val_sets,
                      learner.supervised_objective, config, log=lambda line: print(line, flush=True))


def warm_start_algo(algo, config: WarmStartConfig, val_split: str = "val") -> dict:
    """Warm-start the learners of an RLlib Algorithm (DARPConfig-built), then give every learner and
    EnvRunner the first learner's weights. Returns {warm_start_s, warm_start_auir, warm_start_update}."""
    start = time.perf_counter()
    results = algo.learner_group.foreach_learner(lambda learner: warm_start_learner(learner, config, val_split))
    histories = [r.get() for r in results]
    algo.learner_group.set_weights(algo.learner_group.get_weights())
    algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True)
    update, best = best_of(histories[0])
    return {"warm_start_s": time.perf_counter() - start, "warm_start_auir": best, "warm_start_update": update}


def best_of(history: list[tuple[int, float]]) -> tuple[int, float]:
    """(update, AUIR) of the best validation in a warm-start history."""
    return max(history, key=lambda item: (item[1], -item[0])) if history else (0, math.nan)


__all__ = ["FixedRuleEpisodes", "WarmStartConfig", "best_of", "queries", "validation_auir", "validation_ranks", "warm_start",
           "warm_start_algo", "warm_start_learner", "with_noisy_copies"]
