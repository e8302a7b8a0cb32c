"""`darp data ...`: make, import, describe and draw sketch data sets (the format is sketch_env/data/store.py).

    darp data generate --out runs/data/chairs
    darp data import-qmul --coords ChairV2_Coordinate_train --photos photo/ --out runs/data/chairv2
    darp data import-sketchy --svg sketchy/pig/sketch --photos sketchy/pig/photo --out runs/data/pig
    darp data info --data runs/data/chairv2
    darp data show --data runs/data/chairv2 --sketch 00140128_v1_1 --out sketch.png

Bad input stops with a `DataError` (exit status 1) that names the file and the problem; the import
commands can instead skip bad sketches and list them (`--on-error skip`, the default). `--out` may
be new, empty or an earlier data set; any other directory (or a file) is only replaced with
`--force`, and never one that holds the command's own input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sketch_env.data import load_dataset
from sketch_env.data.overview import describe, levels_sheet
from sketch_env.errors import ConfigError
from sketch_env.options import arg


MAX_GENERATED_PHOTOS = 10_000  # a generated set is held in memory whole (about 50 kB a photo)


@dataclass
class GenerateConfig:
    """Generate the built-in fine-grained chair data set: photos and sketches by simulated drawers."""

    out: Path = arg(Path("runs/data/chairs"), "data-set directory to write (replaces an earlier data set there)")
    photos: int = arg(400, "number of chair instances, one photo each")
    sketches_per_photo: int = arg(3, "sketches per photo, each by a different simulated drawer")
    seed: int = arg(0, "random seed: the same seed gives the same data set")
    test_fraction: float = arg(0.25, "share of the photos that go, with their sketches, to the test split")
    force: bool = arg(False, "replace --out even if it holds something other than a data set (never an input)")

    def check(self) -> None:
        if not 2 <= self.photos <= MAX_GENERATED_PHOTOS or not 1 <= self.sketches_per_photo <= 100:
            raise ConfigError(f"--photos must be in [2, {MAX_GENERATED_PHOTOS}] and --sketches-per-photo in [1, 100], "
                              f"got {self.photos} and {self.sketches_per_photo}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")


@dataclass
class ImportQMULConfig:
    """Import an on-the-fly SBIR coordinate pickle (QMUL Chair-V2 / Shoe-V2) and its photo directory."""

    coords: Path = arg(help="coordinate pickle, e.g. ChairV2_Coordinate_train (read with a restricted unpickler)")
    photos: Path = arg(help="directory of the photos NAME.png / NAME.jpg")
    split: Literal["all", "train", "test"] = arg("all", "which keys ('/train/...', '/test/...') to import")
    out: Path = arg(Path("runs/data/chairv2"), "data-set directory to write (replaces an earlier data set there)")
    on_error: Literal["skip", "fail"] = arg("skip", "bad sketches: skip and report them, or stop at the first")
    force: bool = arg(False, "replace --out even if it holds something other than a data set (never an input)")


@dataclass
class ImportSketchyConfig:
    """Import Sketchy database SVG sketches (PHOTO-N.svg) and their photos (PHOTO.jpg)."""

    svg: Path = arg(help="directory of the SVG sketches of one category")
    photos: Path = arg(help="directory of the photos PHOTO.jpg / PHOTO.png")
    out: Path = arg(Path("runs/data/sketchy"), "data-set directory to write (replaces an earlier data set there)")
    split: Literal["train", "test"] = arg("train", "split of every imported sketch and photo (val is 20% of train, chosen when read)")
    on_error: Literal["skip", "fail"] = arg("skip", "bad sketches: skip and report them, or stop at the first")
    force: bool = arg(False, "replace --out even if it holds something other than a data set (never an input)")


@dataclass
class ShowConfig:
    """Draw the 17 partial sketches of one sketch beside its photo, as one PNG."""

    data: Path = arg(help="data-set directory")
    sketch: str = arg("", "sketch id (default: the data set's first sketch)")
    out: Path = arg(Path("sketch.png"), "PNG file to write")
    size: int = arg(256, "side in pixels of each partial sketch and of the photo")

    def check(self) -> None:
        if not 16 <= self.size <= 2048:
            raise ConfigError(f"--size must be in [16, 2048] pixels, got {self.size}")


@dataclass
class InfoConfig:
    """Print what a data-set directory holds: counts per split and points / strokes per sketch."""

    data: Path = arg(help="data-set directory")


def generate(cfg: GenerateConfig) -> int:
    from sketch_env.data.generate import generate_dataset

    start = time.perf_counter()
    out = generate_dataset(Path(cfg.out), cfg.photos, cfg.sketches_per_photo, cfg.seed, cfg.test_fraction, cfg.force)
    print(f"generated {out} in {time.perf_counter() - start:.1f} s")
    print(describe(load_dataset(out)))
    return 0


def import_qmul(cfg: ImportQMULConfig) -> int:
    from sketch_env.data.qmul import import_qmul as run_import

    start = time.perf_counter()
    summary = run_import(cfg.coords, cfg.photos, cfg.out, split=cfg.split, on_error=cfg.on_error, force=cfg.force)
    print(f"{summary.format()}\nwrote {cfg.out} in {time.perf_counter() - start:.1f} s")
    return 0


def import_sketchy(cfg: ImportSketchyConfig) -> int:
    from sketch_env.data.sketchy import import_sketchy as run_import

    start = time.perf_counter()
    summary = run_import(cfg.svg, cfg.photos, cfg.out, split=cfg.split, on_error=cfg.on_error, force=cfg.force)
    print(f"{summary.format()}\nwrote {cfg.out} in {time.perf_counter() - start:.1f} s")
    return 0


def info(cfg: InfoConfig) -> int:
    start = time.perf_counter()
    ds = load_dataset(cfg.data)
    print(f"loaded in {time.perf_counter() - start:.2f} s")
    print(describe(ds))
    return 0


def show(cfg: ShowConfig) -> int:
    from sketch_env.atomic import atomic_write

    sheet, sketch_id, photo_id = levels_sheet(load_dataset(cfg.data), cfg.sketch, cfg.size)
    atomic_write(cfg.out, lambda p: sheet.save(p, format="PNG"))
    print(f"wrote {cfg.out}: sketch {sketch_id} of photo {photo_id}, 17 levels at {cfg.size}x{cfg.size}")
    return 0
