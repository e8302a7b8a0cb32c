"""`SketchRetrievalEnv`: on-the-fly sketch retrieval as a Gymnasium environment (`SketchRetrieval-v0`).

One episode is one sketch being drawn: it walks through the 17 completion levels and at each level
the agent takes G glimpses, so an episode has 17 * G steps. At step t the agent sees the glimpse
at the location it chose at step t - 1 (the centre at t = 0) on the current partial sketch, and
acts with a Dict:

- "location" (2,) in [-1, 1]: where to look next (x, y; -1 is the left/top edge),
- "query" (D,) in [-1, 1]: its prediction of the complete sketch's phase-1 embedding, which the
  env ranks against the gallery at the current level to compute the reward.

Then the step advances (after G glimpses the level advances) and the next observation is the
glimpse at the new location on the (possibly new) level. infos carry the rank, the percentile, the
sketch's row in the env's episodes (`sketch_index`) and its photo's row in the gallery (`target_index`):
indices, not embeddings, so that episodes stay small to ship from remote EnvRunners; a learner looks
the supervised targets up (policies.darp.supervised). The target is never in the observation.

The step rule is written once, batched, in `EpisodeBatch`: this env is a batch of one and
`sketch_env.vector_env.SketchRetrievalVectorEnv` a batch of B, so the two agree by construction.

`match` chooses what the ranking compares (`sketch_env.local_match`): "global" ranks the query against
each photo's embedding (the paper); "local" adds, for every glimpse the agent has taken on the current
level, the sketch's local descriptor at the glimpse's cell against each photo's best match around the
same place, so the location decides which evidence enters the ranking; "dense" adds that term over
every cell, "dense-ink" over every cell holding ink (no attention). The action and the reward stay the
same; in local and dense modes the observation also holds the descriptor at the glimpse's cell and
the ink of every cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from sketch_env.episodes import EpisodeData, load_episode_data
from sketch_env.geometry import location_to_pixel
from sketch_env.glimpse import GlimpseSensor, integral_image
from sketch_env.local_match import DENSE, MATCHES, LocalGallery, cell_ink, cell_of, inked_cells
from sketch_env.locators import nearest_ink
from sketch_env.render import N_GLIMPSES, N_LEVELS
from sketch_env.rewards import REWARDS, best_rank_reward, eta, rank_gain_reward, threshold_reward

BOUND_TOLERANCE = 1e-6  # actions this far outside [-1, 1] are clipped, further is an error
ORDERS = ("random", "sequential")


@dataclass
class EnvConfig:
    """Options of the environment (`gymnasium.make("SketchRetrieval-v0", **fields)`).

    The default reward is `rank_gain`, because it is the most useful learning signal for the
    locator, whose choice at step t only shows in the queries of later steps:
    - it is dense and graded: every step says by how much the target moved up or down, where
      `threshold` with the paper's alpha, beta (eta_t >= 0.88 from the start) only pays for rank 1,
      which partial sketches rarely reach, so most episodes give every location the same zero;
    - it is relative to the sketch: differences cancel how easy a sketch is, which keeps the
      variance of REINFORCE low without a learned baseline;
    - its return telescopes: the rewards from step t on sum to the last percentile minus the
      percentile before step t (with gamma < 1: a discounted mean of the coming percentiles minus
      the current one), exactly what the glimpses chosen from t on added;
    - it is stationary and stateless: `best_rank` depends on a memory table that each env (each
      EnvRunner) fills on its own and pays 1 for a first visit and for any tie with the best, so
      the same behaviour earns different rewards on different workers and over time.
    The first reward of an episode is measured against the phase-1 embedding of the first partial
    sketch (the triplet baseline that initialises the agent), so an episode's return is the last
    percentile minus that baseline's.
    """

    data: str = field(default="", metadata={"help": "data-set directory (not needed when EpisodeData is given)"})
    embedding: str = field(default="", metadata={"help": "phase-1 run directory holding the embedding export"})
    split: Literal["train", "val", "test", "train+val", "all"] = field(
        default="train", metadata={"help": "which sketches and gallery photos (split by photo)"}
    )
    n_glimpses: int = field(default=N_GLIMPSES, metadata={"help": "glimpses per completion level (paper: 12)"})
    glimpse_size: int = field(default=8, metadata={"help": "side g of each glimpse patch in pixels"})
    n_patches: int = field(default=3, metadata={"help": "patches k per glimpse, each patch_scale times larger"})
    patch_scale: float = field(default=2.0, metadata={"help": "size ratio s of consecutive glimpse patches"})
    image_size: int = field(default=64, metadata={"help": "side of the partial sketch images in pixels"})
    reward: Literal["threshold", "best_rank", "rank_gain"] = field(
        default="rank_gain", metadata={"help": "reward variant (see EnvConfig's docstring for the choice)"}
    )
    eta_alpha: float = field(default=0.02, metadata={"help": "threshold reward: alpha of eta_t"})
    eta_beta: float = field(default=-2.0, metadata={"help": "threshold reward: beta of eta_t"})
    sketch_order: Literal["random", "sequential"] = field(
        default="random", metadata={"help": "random sketch per episode, or sketches in order (evaluation)"}
    )
    snap_to_ink: bool = field(
        default=False, metadata={"help": "a glimpse looks at the inked pixel nearest to the chosen location "
                                         "(where the partial sketch has any ink)"}
    )
    observe_sketch_embedding: bool = field(
        default=True, metadata={"help": "include the phase-1 embedding of the partial sketch in the observation"}
    )
    match: Literal["global", "local", "dense", "dense-ink"] = field(
        default="global", metadata={"help": "what the ranking compares: global (the query against each photo's "
                                            "embedding), local (+ the local descriptors at the cells the level's "
                                            "glimpses looked at), dense (+ every cell's) or dense-ink (+ every inked "
                                            "cell's); all but global need a phase 1 trained with --local-dim"}
    )
    local_weight: float = field(default=1.0, metadata={"help": "weight of the local term in the score (all matches but global)"})

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.sketch_order not in ORDERS:
            raise ValueError(f"sketch_order must be one of {ORDERS}, got {self.sketch_order!r}")
        if self.n_glimpses < 1:
            raise ValueError(f"n_glimpses must be at least 1, got {self.n_glimpses}")
        if self.image_size < 2:
            raise ValueError(f"image_size must be at least 2 pixels, got {self.image_size}")
        if self.match not in MATCHES:
            raise ValueError(f"match must be one of {MATCHES}, got {self.match!r}")
        if not self.local_weight >= 0:
            raise ValueError(f"local_weight must be >= 0, got {self.local_weight}")
        GlimpseSensor(self.glimpse_size, self.n_patches, self.patch_scale)

    @staticmethod
    def from_options(config: EnvConfig | None, options: Mapping[str, Any]) -> EnvConfig:
        """`config` with `options` (EnvConfig field names) replaced; a clear error for unknown names."""
        names = {f.name for f in fields(EnvConfig)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown environment option(s) {unknown}; EnvConfig has {sorted(names)}")
        return replace(config, **options) if config is not None else EnvConfig(**options)


def episodes_for(config: EnvConfig, episodes: EpisodeData | None, thumbnails: bool) -> EpisodeData:
    """The given episodes, or the ones `config` names (loaded with thumbnails if asked, and with local
    grids in local and dense match)."""
    local = config.match != "global"
    if episodes is not None:
        if thumbnails and episodes.thumbnails is None:
            raise ValueError("render_mode='rgb_array' needs photo thumbnails: load_episode_data(..., thumbnails=True)")
        if local and episodes.photo_grids is None:
            raise ValueError(f"match={config.match!r} needs episodes with local grids: load_episode_data(..., local=True)")
        return episodes
    if not config.data or not config.embedding:
        raise ValueError("EnvConfig needs `data` (a data-set directory) and `embedding` (a phase-1 run directory)")
    return load_episode_data(config.data, config.embedding, config.split, config.image_size, thumbnails, local=local)


def observation_space(config: EnvConfig, dim: int, local_shape: tuple[int, int, int] | None = None) -> spaces.Dict:
    """The observation of one env: glimpse (k, g, g), location (2,), level, glimpse index[, sketch embedding (D,)]
    and, in local and dense match, the local descriptor at the glimpse's cell (d,) and the ink share of every
    cell (h * w,); local_shape = (h, w, d) of the grids (`EpisodeData.local_shape`)."""
    sensor = GlimpseSensor(config.glimpse_size, config.n_patches, config.patch_scale)
    parts = {
        "glimpse": spaces.Box(0.0, 1.0, sensor.observation_shape, np.float32),
        "location": spaces.Box(-1.0, 1.0, (2,), np.float32),
        "level": spaces.Discrete(N_LEVELS),
        "glimpse_index": spaces.Discrete(config.n_glimpses),
    }
    if config.observe_sketch_embedding:
        parts["sketch_embedding"] = spaces.Box(-1.0, 1.0, (dim,), np.float32)
    if config.match != "global":
        if local_shape is None:
            raise ValueError(f"match={config.match!r}: the observation space needs the local grids' shape (h, w, d)")
        h, w, d = local_shape
        parts["descriptor"] = spaces.Box(-1.0, 1.0, (d,), np.float32)
        parts["cell_ink"] = spaces.Box(0.0, 1.0, (h * w,), np.float32)
    return spaces.Dict(parts)


def build_observation(
    sensor: GlimpseSensor,
    integral: torch.Tensor,
    location: torch.Tensor,
    level: torch.Tensor,
    glimpse_index: torch.Tensor,
    sketch_embedding: torch.Tensor | None,
    grids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The observation of B episodes as fresh tensors (the one place an observation is built).

    integral: (B, H + 1, W + 1) integral images of the current partial sketches (`integral_image`);
    location: (B, 2) where the glimpse looks; level, glimpse_index: (B,) long; sketch_embedding:
    (B, D) phase-1 embeddings of the partial sketches, or None where the env does not observe them;
    grids: (B, h, w, d) local descriptor grids of the partial sketches (local and dense match) or None.
    Returns glimpse (B, k, g, g) in [0, 1], location (B, 2), level (B,), glimpse_index (B,) and,
    unless None, sketch_embedding (B, D) clipped to [-1, 1] (the observation space's bounds); with
    grids, descriptor (B, d) (the grid at the glimpse's cell) and cell_ink (B, h * w).
    """
    obs = {
        "glimpse": sensor.from_integral(integral, location).clamp_(0.0, 1.0),
        "location": location.clone(),
        "level": level,
        "glimpse_index": glimpse_index,
    }
    if sketch_embedding is not None:
        obs["sketch_embedding"] = sketch_embedding.clamp(-1.0, 1.0)
    if grids is not None:
        b, h, w, d = grids.shape
        cell = cell_of(location, h, w)
        obs["descriptor"] = grids.reshape(b, h * w, d)[torch.arange(b), cell].to(torch.float32).clamp_(-1.0, 1.0)
        obs["cell_ink"] = cell_ink(integral, h, w)
    return obs


def action_space(dim: int) -> spaces.Dict:
    """The action of one env: where to look next (2,) and the query embedding (D,), both in [-1, 1]."""
    return spaces.Dict(
        {"location": spaces.Box(-1.0, 1.0, (2,), np.float32), "query": spaces.Box(-1.0, 1.0, (dim,), np.float32)}
    )


def check_action(action: Any, dim: int, n_envs: int | None, active: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a Dict action; return (location, query) as float32 arrays clipped to [-1, 1].

    n_envs None: one env, shapes (2,) and (dim,); else a batch, shapes (n_envs, 2) and (n_envs, dim).
    active: (n_envs,) bool, the sub-envs whose action is used (the others are about to be reset and
    may hold anything). Raises ValueError naming the key, what was expected and what came.
    """
    if not isinstance(action, Mapping):
        raise ValueError(f"action must be a dict with keys 'location' and 'query', got {type(action).__name__}")
    if set(action) != {"location", "query"}:
        raise ValueError(f"action must have exactly the keys ['location', 'query'], got {sorted(action)}")
    out = []
    for key, width in (("location", 2), ("query", dim)):
        expected = (width,) if n_envs is None else (n_envs, width)
        value = np.asarray(action[key])
        if value.dtype.kind not in "fiub":
            raise ValueError(f"action[{key!r}] must be numbers, got dtype {value.dtype}")
        if value.shape != expected:
            raise ValueError(f"action[{key!r}] must have shape {expected}, got {value.shape}")
        value = value.astype(np.float64)
        checked = value if active is None else value[active]
        where = "" if n_envs is None else " (sub-env, component)"
        bad = np.argwhere(~np.isfinite(checked))
        if len(bad):
            raise ValueError(f"action[{key!r}] must be finite, got {checked[tuple(bad[0])]} at index{where} {_index(bad[0], active)}")
        bad = np.argwhere(np.abs(checked) > 1.0 + BOUND_TOLERANCE)
        if len(bad):
            raise ValueError(
                f"action[{key!r}] must lie in [-1, 1], got {checked[tuple(bad[0])]} at index{where} "
                f"{_index(bad[0], active)} ({len(bad)} value(s) out of bounds)"
            )
        out.append(np.clip(value, -1.0, 1.0).astype(np.float32))
    return out[0], out[1]


def _index(position: np.ndarray, active: np.ndarray | None) -> tuple[int, ...]:
    """A position in the checked (possibly active-only) array as an index into the full action."""
    position = tuple(int(p) for p in position)
    if active is None:
        return position
    return (int(np.flatnonzero(active)[position[0]]),) + position[1:]


@dataclass
class StepResult:
    """What one batched step computed, for the R sub-envs that stepped: all (R,) tensors."""

    rank: torch.Tensor
    percentile: torch.Tensor
    reward: torch.Tensor
    level: torch.Tensor
    glimpse_index: torch.Tensor
    terminated: torch.Tensor


class EpisodeBatch:
    """The state of n episodes and the batched step rule (the single env is n = 1).

    Episode b shows sketch `sketch[b]` and is at step `t[b]` in [0, 17 G]; step t ranks its query at
    level t // G. `best_rank` (n, S * 17) is the `best_rank` reward's memory per episode slot, kept
    across episodes until `forget`. Each slot caches the integral image of the partial sketch it
    looks at, so a slot recomputes it once per level (every G steps), not once per glimpse.
    Hot paths index with index_select / index_copy_: much faster on CPU than advanced indexing.

    Local match: step t first adds the cell of the glimpse it observed (at `location`, on level t // G)
    to that level's evidence (a level starts with none), then ranks with score = squared distance +
    local_weight x the mean local distance over the evidence's cells (`local_sum` / `local_count`,
    (n, N) and (n,)). Dense match: the local distance over every cell (dense-ink: every inked cell),
    computed once per level.
    """

    def __init__(self, config: EnvConfig, episodes: EpisodeData, n: int):
        self.config = config
        self.episodes = episodes
        self.n = n
        self.sensor = GlimpseSensor(config.glimpse_size, config.n_patches, config.patch_scale)
        self.length = N_LEVELS * config.n_glimpses
        height, width = episodes.images.shape[-2:]
        self.images = episodes.images.reshape(-1, height, width)  # (S * 17, H, W), row sketch * 17 + level
        self.embeddings = episodes.sketch_embedding.reshape(-1, episodes.dim)  # (S * 17, D)
        self.sketch = torch.zeros(n, dtype=torch.long)
        self.t = torch.zeros(n, dtype=torch.long)
        self.location = torch.zeros(n, 2, dtype=torch.float32)
        self.previous_percentile = torch.zeros(n, dtype=torch.float32)
        self.integral = torch.zeros(n, height + 1, width + 1, dtype=torch.float32)
        self.integral_row = torch.full((n,), -1, dtype=torch.long)  # image row each slot's integral is of
        self.never_seen = len(episodes.gallery) + 1
        self.best_rank = (
            torch.full((n, len(episodes) * N_LEVELS), self.never_seen, dtype=torch.int32)
            if config.reward == "best_rank"
            else None
        )
        self.eta = eta(0, config.eta_alpha, config.eta_beta)
        self.local = None
        if config.match != "global":
            if episodes.photo_grids is None:
                raise ValueError(f"match={config.match!r} needs episodes with local grids")
            self.local = LocalGallery(episodes.photo_grids)
            self.grids = episodes.sketch_grids.reshape(-1, *episodes.sketch_grids.shape[2:])  # (S * 17, h, w, d)
            self.local_sum = torch.zeros(n, len(episodes.gallery), dtype=torch.float32)
            self.local_count = torch.zeros(n, dtype=torch.float32)

    def set_training_step(self, step: int) -> None:
        self.eta = eta(step, self.config.eta_alpha, self.config.eta_beta)

    def forget(self) -> None:
        """Clear the best-rank memory of every slot."""
        if self.best_rank is not None:
            self.best_rank.fill_(self.never_seen)

    def begin(self, rows: torch.Tensor, sketch: torch.Tensor) -> None:
        """Start episodes in slots `rows` (R,) on sketches `sketch` (R,), looking at the centre."""
        self.sketch.index_copy_(0, rows, sketch)
        self.t.index_fill_(0, rows, 0)
        self.location.index_fill_(0, rows, 0.0)
        if self.local is not None:
            self.local_sum.index_fill_(0, rows, 0.0)
            self.local_count.index_fill_(0, rows, 0.0)
        start = self.episodes.gallery.percentile(self.episodes.phase1_rank[:, 0].index_select(0, sketch))
        self.previous_percentile.index_copy_(0, rows, start)

    def step(self, rows: torch.Tensor, location: torch.Tensor, query: torch.Tensor) -> StepResult:
        """Rank the queries (R, D) of slots `rows` (R,) at their current level, reward, then advance
        and move the next glimpse to `location` (R, 2)."""
        sketch, t = self.sketch.index_select(0, rows), self.t.index_select(0, rows)
        if len(t) and int(t.max()) >= self.length:
            raise RuntimeError("the episode has ended (terminated); call reset() before step()")
        level = t // self.config.n_glimpses
        gallery = self.episodes.gallery
        extra = self._local_term(rows, sketch, t, level) if self.local is not None else None
        rank = gallery.rank(query, self.episodes.target_index.index_select(0, sketch), extra)
        percentile = gallery.percentile(rank)
        if self.config.reward == "threshold":
            reward = threshold_reward(rank, self.eta)
        elif self.config.reward == "best_rank":
            memory = self.best_rank.view(-1)
            cell = (rows * len(self.episodes) + sketch) * N_LEVELS + level
            reward, best = best_rank_reward(rank, memory.index_select(0, cell))
            memory.index_copy_(0, cell, best)
        else:
            reward = rank_gain_reward(percentile, self.previous_percentile.index_select(0, rows))
        self.previous_percentile.index_copy_(0, rows, percentile)
        self.t.index_copy_(0, rows, t + 1)
        if self.config.snap_to_ink:  # onto the ink of the partial sketch the next glimpse reads
            next_level = ((t + 1) // self.config.n_glimpses).clamp(max=N_LEVELS - 1)
            location = nearest_ink(self.images.index_select(0, sketch * N_LEVELS + next_level), location)
        self.location.index_copy_(0, rows, location)
        return StepResult(rank, percentile, reward, level, t % self.config.n_glimpses, t + 1 == self.length)

    def _local_term(self, rows: torch.Tensor, sketch: torch.Tensor, t: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """(R, N): local_weight x the mean local distance over the current level's evidence, after adding
        this step's glimpse (local) or, at a level's first step, every cell (dense)."""
        first = t % self.config.n_glimpses == 0  # a new level: its evidence starts empty
        grid_row = sketch * N_LEVELS + level
        total = self.local_sum.index_select(0, rows)
        count = self.local_count.index_select(0, rows)
        if self.config.match in DENSE:
            fresh = torch.nonzero(first | (count == 0)).flatten()
            if len(fresh):
                rows_fresh = grid_row.index_select(0, fresh)
                mask = inked_cells(self.images.index_select(0, rows_fresh), *self.local.grid) if self.config.match == "dense-ink" else None
                total[fresh] = self.local.dense_distance(self.grids.index_select(0, rows_fresh), mask)
                count[fresh] = 1.0
        else:
            h, w = self.local.grid
            cell = cell_of(self.location.index_select(0, rows), h, w)
            grids = self.grids.index_select(0, grid_row).reshape(len(rows), h * w, -1)
            distance = self.local.distance_at(grids[torch.arange(len(rows)), cell], cell)
            total = torch.where(first[:, None], torch.zeros_like(total), total) + distance
            count = torch.where(first, torch.zeros_like(count), count) + 1.0
        self.local_sum.index_copy_(0, rows, total)
        self.local_count.index_copy_(0, rows, count)
        return self.config.local_weight * total / count[:, None]

    def local_score(self, rows: torch.Tensor) -> torch.Tensor | None:
        """(R, N) the local term the last step of slots `rows` ranked with (zeros before a first step), or None
        in global match."""
        if self.local is None:
            return None
        count = self.local_count.index_select(0, rows).clamp(min=1.0)
        return self.config.local_weight * self.local_sum.index_select(0, rows) / count[:, None]

    def observation(self) -> dict[str, np.ndarray]:
        """Batched observations of all n slots, in fresh arrays (callers may keep views of them)."""
        t = self.t.clamp(max=self.length - 1)  # after the last step, repeat the last step's level and index
        level = t // self.config.n_glimpses
        row = self.sketch * N_LEVELS + level
        stale = torch.nonzero(row != self.integral_row).flatten()
        if len(stale):
            fresh = self.images.index_select(0, row.index_select(0, stale)).to(torch.float32)
            self.integral.index_copy_(0, stale, integral_image(fresh))
            self.integral_row.index_copy_(0, stale, row.index_select(0, stale))
        embedding = self.embeddings.index_select(0, row) if self.config.observe_sketch_embedding else None
        grids = self.grids.index_select(0, row) if self.local is not None else None
        obs = build_observation(self.sensor, self.integral, self.location, level, t % self.config.n_glimpses, embedding,
                                grids)
        return {key: value.numpy() for key, value in obs.items()}

    def infos(self, rows: torch.Tensor, level: torch.Tensor, glimpse_index: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-slot infos for `rows` (R,): level, glimpse index, ids, the sketch's row in `episodes`
        and its photo's row in the gallery. The supervised targets are found from the two rows:
        `episodes.gallery.embeddings[target_index]` (the photo) and
        `episodes.sketch_embedding[sketch_index, -1]` (the complete sketch's phase-1 embedding)."""
        sketch = self.sketch.index_select(0, rows)
        target = self.episodes.target_index.index_select(0, sketch)
        sketch = sketch.numpy()
        return {
            "level": level.numpy(),
            "glimpse_index": glimpse_index.numpy(),
            "photo_id": self.episodes.photo_id[sketch],
            "sketch_id": self.episodes.sketch_id[sketch],
            "sketch_index": sketch,
            "target_index": target.numpy(),
        }


class StepsAnEpisodeBatch:
    """What the single and the vector env both hand to their `EpisodeBatch` (`self._batch`)."""

    _batch: EpisodeBatch

    @property
    def episode_length(self) -> int:
        """Steps per episode: 17 levels x n_glimpses."""
        return self._batch.length

    def set_training_step(self, step: int) -> None:
        """Tell the env (every sub-env) the training step t (sets eta_t of the `threshold` reward)."""
        self._batch.set_training_step(step)


class SketchRetrievalEnv(StepsAnEpisodeBatch, gymnasium.Env):
    """On-the-fly sketch retrieval, one sketch per episode (see the module docstring).

    SketchRetrievalEnv(config, episodes=None, render_mode=None, **options): `options` replace
    fields of `config` (gymnasium.make passes every option this way); `episodes` skips loading.
    reset(seed=s) restarts everything: the RNG, the sequential order and the best-rank memory.
    reset(options={"sketch_index": i}) shows sketch i of `episodes` (e.g. to play one sketch).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        config: EnvConfig | None = None,
        episodes: EpisodeData | None = None,
        render_mode: str | None = None,
        **options,
    ):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.config = EnvConfig.from_options(config, options)
        self.render_mode = render_mode
        self.episodes = episodes_for(self.config, episodes, thumbnails=render_mode is not None)
        self.observation_space = observation_space(self.config, self.episodes.dim, self.episodes.local_shape)
        self.action_space = action_space(self.episodes.dim)
        self._batch = EpisodeBatch(self.config, self.episodes, 1)
        self._rows = torch.zeros(1, dtype=torch.long)
        self._episode = 0
        self._query = torch.zeros(self.episodes.dim)
        self._rank = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        sketch_index = options.pop("sketch_index", None)
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; the env knows 'sketch_index'")
        if seed is not None:
            self._episode = 0
            self._batch.forget()
        if sketch_index is None:
            sketch_index = next_sketch(self.config.sketch_order, self.np_random, self._episode, len(self.episodes))
            self._episode += 1
        elif not 0 <= sketch_index < len(self.episodes):
            raise ValueError(f"sketch_index must be in [0, {len(self.episodes)}), got {sketch_index}")
        sketch = torch.tensor([int(sketch_index)])
        self._batch.begin(self._rows, sketch)
        self._query = self.episodes.sketch_embedding[sketch_index, 0]
        self._rank = int(self.episodes.phase1_rank[sketch_index, 0])
        zero = torch.zeros(1, dtype=torch.long)
        return self._observation(), _unbatch(self._batch.infos(self._rows, zero, zero))

    def step(self, action):
        location, query = check_action(action, self.episodes.dim, None)
        location, query = torch.from_numpy(location[None]), torch.from_numpy(query[None])
        result = self._batch.step(self._rows, location, query)
        self._query, self._rank = query[0], int(result.rank[0])
        info = _unbatch(self._batch.infos(self._rows, result.level, result.glimpse_index))
        info["rank"] = self._rank
        info["percentile"] = float(result.percentile[0])
        return self._observation(), float(result.reward[0]), bool(result.terminated[0]), False, info

    def render(self):
        if self.render_mode is None:
            gymnasium.logger.warn("render() called without a render_mode; make the env with render_mode='rgb_array'")
            return None
        return render_frame(self._batch, self._query, self._rank)

    def _observation(self) -> dict[str, Any]:
        obs = self._batch.observation()
        return {key: (int(value[0]) if value.ndim == 1 else value[0]) for key, value in obs.items()}


def next_sketch(order: str, rng: np.random.Generator, position: int, n_sketches: int) -> int:
    """The sketch of the next episode: drawn from `rng`, or `position` mod S in sequential order."""
    if order == "sequential":
        return position % n_sketches
    return int(rng.integers(n_sketches))


def _unbatch(infos: dict[str, np.ndarray]) -> dict[str, Any]:
    """Infos of a batch of one as plain Python values (arrays stay arrays)."""
    out = {}
    for key, value in infos.items():
        item = value[0]
        out[key] = item.item() if isinstance(item, np.generic) else item
    return out


SKETCH_PANEL = 256
THUMB = 64
GAP = 8
PATCH_COLOURS = ((230, 40, 40), (240, 140, 20), (30, 110, 230), (140, 60, 200), (20, 160, 90))


def render_frame(batch: EpisodeBatch, query: torch.Tensor, rank: int) -> np.ndarray:
    """An (H, W, 3) uint8 picture of slot 0 of `batch`: the partial sketch with the glimpse squares,
    the retina, the top-5 photos of `query` (D,) and the target photo with its `rank`."""
    from PIL import Image, ImageDraw

    ep, cfg = batch.episodes, batch.config
    s = int(batch.sketch[0])
    t = min(int(batch.t[0]), batch.length - 1)
    level, glimpse_index = divmod(t, cfg.n_glimpses)
    n = len(ep.gallery)
    width = GAP + SKETCH_PANEL + 2 * GAP + 5 * (THUMB + GAP)
    height = 28 + SKETCH_PANEL + GAP
    frame = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(frame)
    draw.text(
        (GAP, 8),
        f"sketch {ep.sketch_id[s]}   level {level + 1}/{N_LEVELS}   glimpse {glimpse_index + 1}/{cfg.n_glimpses}"
        f"   target rank {rank}/{n}",
        fill=(0, 0, 0),
    )

    ink = 255 - 255 * ep.images[s, level].numpy().astype(np.uint8)
    sketch = Image.fromarray(ink, "L").resize((SKETCH_PANEL, SKETCH_PANEL), Image.NEAREST).convert("RGB")
    pen = ImageDraw.Draw(sketch)  # squares drawn on the panel itself are clipped to it
    zoom = SKETCH_PANEL / ep.images.shape[-1]
    x, y = location_to_pixel(batch.location[0].numpy(), SKETCH_PANEL).tolist()  # the panel is the image, zoomed
    for i in range(cfg.n_patches):
        half = cfg.glimpse_size * cfg.patch_scale**i * zoom / 2
        pen.rectangle([x - half, y - half, x + half, y + half], outline=PATCH_COLOURS[i % len(PATCH_COLOURS)], width=2)
    frame.paste(sketch, (GAP, 28))
    draw.rectangle([GAP - 1, 27, GAP + SKETCH_PANEL, 28 + SKETCH_PANEL], outline=(160, 160, 160))

    left = GAP + SKETCH_PANEL + 2 * GAP
    draw.text((left, 28), "top 5 for the query", fill=(0, 0, 0))
    top = ep.gallery.ranked_topk(query[None], min(5, n), batch.local_score(torch.zeros(1, dtype=torch.long)))[0][0].tolist()
    target = int(ep.target_index[s])
    for j, photo in enumerate(top):
        px = left + j * (THUMB + GAP)
        frame.paste(Image.fromarray(ep.thumbnails[photo]), (px, 44))
        if photo == target:
            draw.rectangle([px - 3, 41, px + THUMB + 2, 44 + THUMB + 2], outline=(20, 170, 60), width=3)
        draw.text((px, 44 + THUMB + 4), f"#{j + 1}", fill=(0, 0, 0))

    draw.text((left, 132), "target", fill=(0, 0, 0))
    frame.paste(Image.fromarray(ep.thumbnails[target]), (left, 148))
    draw.rectangle([left - 3, 145, left + THUMB + 2, 148 + THUMB + 2], outline=(20, 170, 60), width=3)
    draw.text((left, 148 + THUMB + 4), f"rank {rank}/{n}", fill=(0, 0, 0))

    retina_left = left + THUMB + 2 * GAP
    draw.text((retina_left, 132), "retina (what the agent sees)", fill=(0, 0, 0))
    side = min(THUMB, (width - retina_left) // cfg.n_patches - GAP)
    glimpse = batch.observation()["glimpse"][0]
    for i, patch in enumerate(glimpse):
        px = retina_left + i * (side + GAP)
        tile = Image.fromarray((255 - 255 * patch).astype(np.uint8), "L").resize((side, side), Image.NEAREST)
        frame.paste(tile.convert("RGB"), (px, 148))
        colour = PATCH_COLOURS[i % len(PATCH_COLOURS)]
        draw.rectangle([px - 2, 146, px + side + 1, 148 + side + 1], outline=colour, width=2)
    return np.asarray(frame, np.uint8)
