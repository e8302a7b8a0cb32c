"""The engine of `darp play` (tune_runs/play.py: what the terminal shows and what you type): one episode of
SketchRetrieval-v0 stepped by hand.

`play_episode` loads the episode data and the env (a trained run's own env options, `policies.running.trained`),
picks who acts on Enter (`make_policy`: `RandomPolicy`, `CenterPolicy` or the run's `TrainedPolicy`), reads the
answers (`answers`, `ask`) and saves every frame (`save_png`) and the episode (`save_gif`) into --out, a folder
that holds only play frames (FRAMES_KIND).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sketch_env.atomic import OutputKind, atomic_write, check_output_dir, prepare_output_dir
from sketch_env.errors import ConfigError, DataError
from sketch_env.env import EnvConfig, SketchRetrievalEnv
from sketch_env.episodes import EpisodeData, load_episode_data
from sketch_env.options import arg

PROMPT = "[Enter] policy acts | x y: look there | q: quit > "
GIF_FRAME_MS = 250
FRAMES_KIND = OutputKind("play frames folder", ("episode.gif", "frame_[0-9][0-9][0-9].png"))


@dataclass
class PlayConfig:
    """Step one episode of the environment by hand in the terminal."""

    data: str = arg(help="data-set directory")
    embedding: str = arg(help="phase-1 run directory (its embedding export is the gallery)")
    policy: str = arg("random", "who acts when you press Enter: random, center, or a trained run directory")
    sketch: str | None = arg(None, "sketch id to play (default: one drawn with --seed)")
    split: Literal["train", "val", "test", "train+val", "all"] = arg("val", "split whose sketches and photos are used")
    out: str = arg("play_frames", "folder for the frames (frame_000.png, ...; earlier ones are removed) and episode.gif")
    seed: int = arg(0, "seed of the sketch draw and of the random policy")
    max_steps: int | None = arg(None, "stop after this many steps (default: the whole episode)")
    force: bool = arg(False, "write into --out even if it holds something other than play frames")

    def check(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {self.max_steps}")


class RandomPolicy:
    """Uniform random locations; the query is the phase-1 embedding of the current partial sketch."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def initial_state(self):
        return None

    def act(self, obs: dict, state):
        location = self.rng.uniform(-1.0, 1.0, 2).astype(np.float32)
        return {"location": location, "query": obs["sketch_embedding"]}, state


class CenterPolicy:
    """Always looks at the centre; the query is the phase-1 embedding of the current partial sketch."""

    def initial_state(self):
        return None

    def act(self, obs: dict, state):
        return {"location": np.zeros(2, np.float32), "query": obs["sketch_embedding"]}, state


def make_policy(name: str, seed: int, env: SketchRetrievalEnv):
    """"random", "center" or a trained run directory acting in `env` -> an object with
    initial_state() and act(obs, state)."""
    if name == "random":
        return RandomPolicy(seed)
    if name == "center":
        return CenterPolicy()
    from policies.running.trained import TrainedPolicy

    return TrainedPolicy(name, env)


def sketch_index(episodes: EpisodeData, sketch_id: str, split: str) -> int:
    found = np.flatnonzero(episodes.sketch_id == sketch_id)
    if len(found) == 0:
        raise DataError(f"no sketch {sketch_id!r} in split {split!r}; it has e.g. {list(episodes.sketch_id[:3])}")
    return int(found[0])


def answers() -> Iterator[str | None]:
    """The user's answers: input() on a terminal, else stdin lines; None once the input has ended."""
    while True:
        if sys.stdin.isatty():
            try:
                yield input(PROMPT)
            except EOFError:
                break
        else:
            print(PROMPT, end="")
            line = sys.stdin.readline()
            if not line:
                print()
                break
            print(line.rstrip("\n"))
            yield line.rstrip("\n")
    while True:
        yield None


def ask(lines: Iterator[str | None]) -> str | tuple[float, float] | None:
    """Read answers until one is valid: None (policy acts), "quit", or a location (x, y)."""
    while True:
        line = next(lines)
        if line is None or not line.strip():
            return None
        if line.strip().lower() in ("q", "quit"):
            return "quit"
        parts = line.replace(",", " ").split()
        try:
            x, y = (float(p) for p in parts)
        except ValueError:
            print(f"  expected 'x y' (two numbers in [-1, 1]), Enter or q; got {line.strip()!r}")
            continue
        if not (np.isfinite([x, y]).all() and abs(x) <= 1 and abs(y) <= 1):
            print(f"  x and y must lie in [-1, 1], got {x} {y}")
            continue
        return (x, y)


def save_png(path: Path, frame: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, lambda p: Image.fromarray(frame).save(p, format="PNG", compress_level=1))


def save_gif(path: Path, frames: list[np.ndarray]) -> None:
    from PIL import Image

    # fast octree quantisation: 6x quicker than PIL's default median cut, fine for photos and ink
    images = [Image.fromarray(f).quantize(256, method=Image.Quantize.FASTOCTREE) for f in frames]
    atomic_write(
        path,
        lambda p: images[0].save(
            p, format="GIF", save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0
        ),
    )


def play_episode(cfg: PlayConfig) -> None:
    """Play one episode (tune_runs/play.py says how); frames of an earlier play in `out` are replaced."""
    env_options = {}
    if cfg.policy not in ("random", "center"):
        if not Path(cfg.policy).is_dir():
            raise DataError(f"--policy {cfg.policy!r}: not 'random', 'center' or an existing run directory")
        from policies.running.trained import env_options as trained_env, read_run

        env_options = trained_env(read_run(cfg.policy))  # act in the env the policy was trained in
    trained = cfg.policy if cfg.policy not in ("random", "center") else None
    inputs = (cfg.data, cfg.embedding, trained)
    check_output_dir(cfg.out, FRAMES_KIND, inputs=inputs, force=cfg.force)  # refused before anything is read
    episodes = load_episode_data(cfg.data, cfg.embedding, cfg.split, env_options.get("image_size", 64), thumbnails=True,
                                 local=env_options.get("match", "global") != "global")
    env = SketchRetrievalEnv(
        EnvConfig(data=cfg.data, embedding=cfg.embedding, split=cfg.split, **env_options), episodes,
        render_mode="rgb_array",
    )
    policy = make_policy(cfg.policy, cfg.seed, env)
    options = None if cfg.sketch is None else {"sketch_index": sketch_index(episodes, cfg.sketch, cfg.split)}
    out = prepare_output_dir(cfg.out, FRAMES_KIND, inputs=inputs, force=cfg.force)  # made once the inputs are good
    obs, info = env.reset(seed=cfg.seed, options=options)
    state = policy.initial_state()
    n_photos, glimpses = len(episodes.gallery), env.config.n_glimpses
    start_rank = int(episodes.phase1_rank[sketch_index(episodes, info["sketch_id"], cfg.split), 0])
    print(
        f"sketch {info['sketch_id']} (photo {info['photo_id']}) in a gallery of {n_photos} photos; "
        f"{env.episode_length} steps: 17 levels x {glimpses} glimpses; policy {cfg.policy}"
    )
    print(f"the phase-1 embedding of level 1 ranks the photo {start_rank}/{n_photos}")
    for old in out.glob("frame_[0-9][0-9][0-9].png"):
        old.unlink()
    frames = [env.render()]
    save_png(out / "frame_000.png", frames[0])
    limit = env.episode_length if cfg.max_steps is None else min(cfg.max_steps, env.episode_length)
    lines = answers()
    total = 0.0
    for step in range(1, limit + 1):
        action, state = policy.act(obs, state)
        typed = ask(lines)
        if typed == "quit":
            break
        if typed is not None:
            action = {**action, "location": np.array(typed, np.float32)}
        obs, reward, _, _, info = env.step(action)
        total += reward
        x, y = obs["location"]
        print(
            f"step {step:3d}  level {info['level'] + 1:2d}/17  glimpse {info['glimpse_index'] + 1:2d}/{glimpses}  "
            f"next look ({x:+.2f}, {y:+.2f})  rank {info['rank']:4d}/{n_photos}  reward {reward:+.3f}"
        )
        frames.append(env.render())
        save_png(out / f"frame_{step:03d}.png", frames[-1])
    save_gif(out / "episode.gif", frames)
    print(f"{len(frames) - 1} steps, return {total:+.3f}; frames and episode.gif in {out}")
