"""cluster.yaml passes the checks `ray up` makes before any cloud call, and broken copies fail them.

`ray up` fills the file out with the provider's defaults (prepare_config) and validates it against
ray/autoscaler/ray-schema.json plus a few cross-field rules (validate_config); only then does it
talk to the cloud. Both steps run here, offline.
"""

import copy
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture
def cluster():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_schema(cluster):
    prepared = check(cluster)
    workers = prepared["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["max_workers"] >= 1
    assert prepared["head_node_type"] == "head"
    assert f"ray:{ray.__version__}-" in prepared["docker"]["image"], "the image must carry the Ray version the project pins"
    assert any("pip install" in c and "~/darp" in c for c in prepared["setup_commands"])
    assert prepared["file_mounts"]["~/darp"] == "." and "~/data" in prepared["file_mounts"]
    assert all("RAY_AUTH_MODE=token" in " ".join(prepared[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))


def _unknown_top_level_key(c):
    c["max_worker"] = 4


def _head_type_missing(c):
    c["head_node_type"] = "cpu_head"


def _gpu_count_not_an_integer(c):
    c["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"


def _min_workers_over_max(c):
    c["available_node_types"]["gpu_worker"]["min_workers"] = c["max_workers"] + 1


def _no_docker_image(c):
    del c["docker"]["image"]


@pytest.mark.parametrize("breaks, error", [
    (_unknown_top_level_key, jsonschema.ValidationError),
    (_head_type_missing, ValueError),
    (_gpu_count_not_an_integer, jsonschema.ValidationError),
    (_min_workers_over_max, ValueError),
    (_no_docker_image, AssertionError),
])
def test_broken_copies_fail(cluster, breaks, error):
    breaks(cluster)
    with pytest.raises(error):
        check(cluster)
