"""Fixtures shared across test modules: the synthetic env data, a local Ray instance and the tiny data set + export.

Helpers they build on live in plain modules (sketch_env.synthetic, tests.rl_fixtures, tests.module_batches);
no test module imports another.
"""

import pytest


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> tuple[str, str]:
    """(data dir, embedding run dir) of sketch_env.synthetic.build_fixture."""
    from sketch_env.synthetic import build_fixture

    return build_fixture(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def episodes(synthetic):
    """The synthetic fixture's training episodes, with thumbnails for rendering."""
    from sketch_env.episodes import load_episode_data

    data, run = synthetic
    return load_episode_data(data, run, split="train", thumbnails=True)


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray instance for one test module (each module starts its own, then shuts it down)."""
    from policies.running.ray_session import ray_session

    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data dir, phase-1 run dir) of tests.rl_fixtures.make_tiny_setup."""
    from sketch_env.synthetic import make_tiny_setup

    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))
