"""Ray clusters on this machine: a two-node cluster (ray.cluster_utils.Cluster) that the sweep joins with
--address, trials running on both nodes and the dataset reaching the second through Ray's object store; and a
``ray start --head`` cluster beside which the sweep, without --address, starts its own Ray.

Each test keeps Ray's files (session folders, the address of "the current cluster") in a temp folder of its
own (RAY_TMPDIR), so no other process's Ray is touched, and stops only the processes it started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sweep.run import REPO_ROOT

SPACE = """
base: {image_size: 32, epochs: 1, warmup_epochs: 0.5, batch_size: 16, eval_batch_size: 64, pretrained: none}
params:
  lr: {dist: loguniform, low: 1.0e-3, high: 1.0e-2}
"""


@pytest.fixture
def ray_tmpdir(monkeypatch: pytest.MonkeyPatch):
    folder = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def two_nodes(ray_tmpdir: Path):
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    # One CPU per node and one CPU per trial: two trials at once can only run one on each node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_trials_run_on_both_nodes(two_nodes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m sweep.run --address HOST:PORT`` joins the cluster; one trial lands on each node."""
    import ray

    from core.data.demo_data import generate_demo
    from sweep.run import main

    data = generate_demo(tmp_path / "data", n_lesions=30, image_size=32)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    nodes = {node.node_id for node in two_nodes.list_all_nodes()}
    assert len(nodes) == 2
    code = main(["--address", two_nodes.address, "--gpus", "0", "--cpus-per-trial", "1", "--trials", "2",
                 "--confirm-top", "0", "--scheduler", "none", "--space", str(space), "--data", str(data),
                 "--results", str(tmp_path / "results"), "--name", "cluster"])
    assert code == 0
    assert not ray.is_initialized()  # the command disconnects; the cluster stays up
    out = capsys.readouterr().out
    assert "2 trial(s) at once on 2 CPU(s)" in out and "python -m core.final_train" in out

    folder = tmp_path / "results" / "cluster"
    records = [json.loads(p.read_text()) for p in folder.glob("trials/*/trial.json")]
    assert len(records) == 2 and {r["status"] for r in records} == {"completed"}
    assert {r["node"]["node_id"] for r in records} == nodes  # one trial on each node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(pgid: int) -> None:
    """Stop the processes of one ``ray start`` (its own session: ``ray stop`` would stop every Ray here)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def test_sweep_starts_its_own_ray_beside_a_ray_start_cluster(ray_tmpdir: Path, tmp_path: Path) -> None:
    """`ray start --head` records itself as the cluster a plain ray.init() joins (where the sweep used to die
    with "When connecting to an existing cluster, num_cpus and num_gpus must not be provided"); without
    --address the sweep says so and starts its own Ray."""
    from core.data.demo_data import generate_demo

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TQDM_DISABLE="1", RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={_free_port()}",
                             "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert head.wait(timeout=120) == 0, head.stdout.read()
        address = (ray_tmpdir / "ray" / "ray_current_cluster").read_text().strip()
        data = generate_demo(tmp_path / "data", n_lesions=30, image_size=32)
        space = tmp_path / "space.yaml"
        space.write_text(SPACE)
        sweep = subprocess.run([sys.executable, "-m", "sweep.run", "--gpus", "0", "--trials", "1", "--confirm-top",
                                "0", "--space", str(space), "--data", str(data), "--results", str(tmp_path / "results"),
                                "--name", "beside"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                               timeout=300)
    finally:
        _stop_group(head.pid)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    assert f"notice: a Ray cluster is recorded on this machine ({address}); this sweep starts its own" in sweep.stdout
    assert "python -m core.final_train" in sweep.stdout
