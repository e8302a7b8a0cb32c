"""A real local Ray cluster (`ray start --head`, token authentication on) runs a `darp train` job with two
DDP learners, submitted through the Ray Jobs API with the repository as working directory.

The cluster gets its own --temp-dir, so other Ray instances on this machine (whose `ray.init()` looks
for a cluster in /tmp/ray) never see it, and it is stopped by ending its own processes: `ray stop`
would stop every Ray instance on the machine.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.processes import kill_session
from sketch_env.synthetic import make_tiny_setup
from tests.rl_fixtures import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_for_job_server(address: str, headers: dict, head: subprocess.Popen, timeout_s: float = 90):
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout_s
    while True:
        try:
            client = JobSubmissionClient(address, headers=headers)
            client.list_jobs()
            return client
        except (ConnectionError, RuntimeError):
            if head.poll() is not None or time.time() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def ray_cluster():
    """A 2-CPU head node with the dashboard (job server) and token authentication; yields (address, token)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp"))
    token = secrets.token_hex(32)
    (temp_dir / "auth_token").write_text(token)
    dashboard_port = free_port()
    env = os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(temp_dir / "auth_token"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
           f"--port={free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(temp_dir / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dashboard_port}", token, head
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        kill_session(head.pid)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_darp_train_job_with_two_learners(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus

    address, token, head = ray_cluster
    data, phase1 = make_tiny_setup(tmp_path)
    run_dir = tmp_path / "darp"
    start = time.time()
    client = wait_for_job_server(address, {"Authorization": f"Bearer {token}"}, head)

    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert denied.value.code == 401, "the job server must refuse requests without the token"

    job_id = client.submit_job(
        entrypoint=(f"darp train --data {data} --embedding {phase1} --run-dir {run_dir} --iterations 1 "
                    "--num-learners 2 --num-envs-per-env-runner 4 --episodes-per-batch 8 --n-glimpses 2 --val-interval 1"),
        runtime_env={"working_dir": str(REPO), "excludes": [".venv", "runs", ".git", "*.egg-info"]},
    )
    deadline = time.time() + 180
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.time() < deadline, f"job still {status} after 180 s:\n{client.get_job_logs(job_id)[-3000:]}"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    print(f"cluster start + job: {time.time() - start:.0f} s")

    from policies.running.runs import best_checkpoint

    assert (best_checkpoint(run_dir).module_dir / "module_state.pkl").is_file()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["config"]["num_learners"] == 2
    assert run["val_metrics"]["n_sketches"] > 0 and 0 < run["val_metrics"]["auir"] <= 100
    assert "val AUIR" in logs, "the job's log holds the training progress"

    cli_env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    cli = subprocess.run([str(BIN / "ray"), "job", "logs", job_id, "--address", address],
                         env=cli_env, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "validation (val): AUIR" in cli.stdout, cli.stderr[-2000:]
