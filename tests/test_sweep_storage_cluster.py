"""Two Ray nodes on this machine that share no folder, a sweep kept in a bucket (SeaweedFS, tests/seaweedfs.py):
a ``ray start --head`` and a ``ray start --address`` worker, each with its own working and temp folder (the
trials' local folders), the driver's --results a third; trials on both nodes, every trial's files in the bucket,
the driver's outputs complete, then ``--resume`` from a fresh results folder. About a minute."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sweep.run import REPO_ROOT
from tests.seaweedfs import BUCKET, s3  # noqa: F401
from tests.test_sweep_cluster import _free_port, _stop_group, ray_tmpdir  # noqa: F401

pytestmark = pytest.mark.sweep
# the smallest backbone (tests/test_sweep_storage.py): each trial uploads its model and Ray's checkpoint
SPACE = """
base: {arch: mobilenet_v3_large, image_size: 32, epochs: 1, batch_size: 16, eval_batch_size: 64, pretrained: none}
params:
  lr: {dist: loguniform, low: 1.0e-3, high: 1.0e-2}
"""


def _ray_start(args: list[str], folder: Path, env: dict[str, str]) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    node = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", *args, "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                            cwd=folder, env={**env, "TMPDIR": str(folder)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert node.wait(timeout=120) == 0, node.stdout.read()
    return node


def test_two_nodes_without_a_shared_folder(s3, ray_tmpdir: Path, tmp_path: Path) -> None:  # noqa: F811
    from core.data.demo_data import generate_demo

    # RAY_AUTH_MODE: ray start --head enables token auth and keeps the token in ~/.ray, shared with any other
    # cluster of this user; these nodes listen on 127.0.0.1 only. Only in the children's environment: Ray reads
    # it once per process, and this test process starts local Rays for other tests.
    env = dict(os.environ, **s3.env, PYTHONPATH=str(REPO_ROOT), TQDM_DISABLE="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled")
    address = f"127.0.0.1:{_free_port()}"
    data = generate_demo(tmp_path / "data", n_lesions=30, image_size=32)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    storage = ["--storage", f"s3://{BUCKET}/cluster", "--storage-endpoint", s3.endpoint, "--address", address]
    nodes = []
    try:
        nodes.append(_ray_start(["--head", f"--port={address.split(':')[1]}", "--include-dashboard=false"],
                                tmp_path / "head", env))
        nodes.append(_ray_start([f"--address={address}"], tmp_path / "worker", env))
        for args in (["--gpus", "0", "--cpus-per-trial", "1", "--trials", "2", "--confirm-top", "0", "--scheduler",
                      "none", "--space", str(space), "--data", str(data), "--results", str(tmp_path / "driver")],
                     ["--resume", "--results", str(tmp_path / "fresh")]):
            sweep = subprocess.run([sys.executable, "-m", "sweep.run", *args, "--name", "two", *storage], cwd=REPO_ROOT,
                                   env=env, capture_output=True, text=True, timeout=300)
            assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-3000:]
    finally:  # both at once: each may wait out its SIGTERM grace
        with ThreadPoolExecutor() as stopping:
            list(stopping.map(_stop_group, [node.pid for node in nodes]))

    stored = s3.files(f"{BUCKET}/cluster/two")
    rows = list(csv.DictReader(open(tmp_path / "fresh" / "two" / "trials.csv")))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    for row in rows:
        for name in ("metrics.csv", "run.json", "best.pt", "node.json", "trial.json"):
            assert f"trials/{row['trial_id']}/{name}" in stored
    assert {"best.json", "trials.csv", "optuna.db", "report.html", "summary.txt"} <= set(stored)
    # each node trained in its own temp folder (what is left there: the emptied per-sweep folder)
    assert all(list((tmp_path / n).glob("lesion-sweep-trials/*")) for n in ("head", "worker"))
    import json

    node_ids = {json.loads(s3.filesystem().open_input_stream(f"{BUCKET}/cluster/two/trials/{r['trial_id']}/node.json")
                           .read())["node_id"] for r in rows}
    assert len(node_ids) == 2  # one trial on each node
    assert not list((tmp_path / "driver" / "two").glob("trials/*/best.pt"))  # the driver read the bucket only
