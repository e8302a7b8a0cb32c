"""Fixtures shared by the end-to-end RL tests: a local Ray instance and the tiny data set + export."""

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray instance for one test module (each module starts its own, then shuts it down)."""
    from policies.ray_session import ray_session

    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data dir, phase-1 run dir) of tests.rl_fixtures.make_tiny_setup."""
    from tests.rl_fixtures import make_tiny_setup

    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))
