"""A real two-node Ray cluster on this machine (ray.cluster_utils.Cluster): trials run on both nodes, and the
dataset reaches the second node through Ray's object store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sweep.run import REPO_ROOT

SPACE = """
base: {image_size: 32, epochs: 1, warmup_epochs: 0.5, batch_size: 16, eval_batch_size: 64, pretrained: none}
params:
  lr: {dist: loguniform, low: 1.0e-3, high: 1.0e-2}
"""


@pytest.fixture
def two_nodes():
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

    from core.demo_data import generate_demo
    from sweep.run import main

    data = generate_demo(tmp_path / "data", n_lesions=30, image_size=32)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    nodes = {node.node_id for node in two_nodes.list_all_nodes()}
    assert len(nodes) == 2
    code = main(["--address", two_nodes.address, "--gpus", "0", "--cpus-per-trial", "1", "--trials", "2",
                 "--scheduler", "none", "--space", str(space), "--data", str(data),
                 "--results", str(tmp_path / "results"), "--name", "cluster"])
    assert code == 0
    assert not ray.is_initialized()  # the command disconnects; the cluster stays up
    out = capsys.readouterr().out
    assert "2 trial(s) at once on 2 CPU(s)" in out and "python -m core.final_train" in out

    folder = tmp_path / "results" / "cluster"
    records = [json.loads(p.read_text()) for p in folder.glob("trials/*/trial.json")]
    assert len(records) == 2 and {r["status"] for r in records} == {"completed"}
    assert {r["node"]["node_id"] for r in records} == nodes  # one trial on each node
