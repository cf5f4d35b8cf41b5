"""What the benchmark scripts share: the data they run on, the machine they ran on, GPU utilisation.

Not a command. The data is the real HAM10000 copy at ``../shared/data/ham10000-200x150`` when it is
there, else a synthetic dataset from ``core.data.demo_data.generate_demo`` (generated once into the dataset
cache folder); every result says which.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from core.io import atomic
from core.errors import UserError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
HAM10000 = REPO.parent / "shared" / "data" / "ham10000-200x150"


def bench_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A bench script's parser: its docstring as help, and the flags every script has."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 2)[2])
    parser.add_argument("--data", help="dataset folder (default: ../shared/data/ham10000-200x150 when present, "
                                       "else generated demo data)")
    parser.add_argument("--demo-lesions", type=int, default=730,
                        help="lesions of the generated data when the HAM10000 copy is absent (default 730)")
    parser.add_argument("--out", help="write the figures as JSON here")
    return parser


def study_parser(module: str, doc: str, epochs: int) -> argparse.ArgumentParser:
    """A seeded study's parser (bench.box_study, bench.model_study, bench.ood_study): :func:`bench_parser`'s flags,
    the image size, the epochs of every run and the seeds."""
    parser = bench_parser(module, doc)
    parser.add_argument("--image-size", type=int, default=64, help="training and test image side (default 64)")
    parser.add_argument("--epochs", type=int, default=epochs, help=f"epochs of every run (default {epochs})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split and training seeds")
    return parser


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that produced a result, as a user would type it."""
    return " ".join([Path(sys.executable).name, "-m", module, *(sys.argv[1:] if argv is None else argv)])


def write_result(result: dict, out: str | None) -> None:
    if out:
        atomic.write_json(out, result)
        print(f"wrote {out}")


@contextlib.contextmanager
def work_folder(path: str | None, prefix: str) -> Iterator[Path]:
    """``path`` (resolved; kept afterwards, for a look at the runs) or, without one, a new temporary folder that
    goes when the block ends, however it ends."""
    folder = Path(path).resolve() if path else Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        if not path:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class BenchData:
    path: Path
    source: str   # "ham10000-200x150" (the real copy), "generated" (core.data.demo_data) or "given" (--data)


def bench_data(path: str | None, *, demo_lesions: int, demo_image_size: int) -> BenchData:
    """``path`` when given, else the real HAM10000 copy when present, else generated demo data."""
    from core.data.dataset import default_cache_dir
    from core.data.demo_data import generate_demo
    from core.data.layouts import DEMO_MARKER

    if path:
        given = Path(path).expanduser()
        if not given.exists():
            raise UserError(f"{given}: no such dataset folder (--data)")
        return BenchData(given.resolve(), "generated" if (given / DEMO_MARKER).is_file() else "given")
    if (HAM10000 / "HAM10000_metadata.csv").is_file():
        return BenchData(HAM10000.resolve(), "ham10000-200x150")
    root = default_cache_dir() / f"bench-demo-{demo_lesions}-lesions-{demo_image_size}px"
    if not (root / DEMO_MARKER).is_file():
        log.info("%s is absent: generating %d synthetic lesions at %d px into %s", HAM10000, demo_lesions,
                 demo_image_size, root)
        generate_demo(root, n_lesions=demo_lesions, image_size=demo_image_size)
    return BenchData(root, "generated")


def study_data(args: argparse.Namespace, what: str) -> BenchData:
    """A seeded study's start: torch's CPU threads (``--threads``), its data (``--data``: the HAM10000 copy, else
    generated demo data at ``--image-size``), and a first line saying what it runs (``what``: the study's own)."""
    torch.set_num_threads(args.threads)
    source = bench_data(args.data, demo_lesions=args.demo_lesions, demo_image_size=args.image_size)
    print(f"data: {source.source} ({source.path}); {args.image_size} px, {args.epochs} epochs, seeds {args.seeds}, "
          f"{what}", flush=True)
    return source


def result_header(module: str, argv: Sequence[str] | None, started: float, source: BenchData,
                  device: str = "cpu") -> dict[str, object]:
    """The first keys of a benchmark's JSON result: which, how it was run, when, how long, where, on what data."""
    return {"benchmark": module.rsplit(".", 1)[-1], "command": command_line(module, argv),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": round(time.time() - started, 1),
            "machine": machine_info(torch.device(device)), "data": {"source": source.source, "path": str(source.path)}}


def machine_info(device: torch.device) -> dict[str, object]:
    """What the figures depend on: CPU, cores, load, library versions and the GPU."""
    import torchvision

    info: dict[str, object] = {
        "cpu": _cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuUtilization:
    """Mean utilisation (%) of a CUDA device while the ``with`` block runs, sampled in a thread.

    Reads NVML through ``torch.cuda.utilization`` (needs pynvml), else ``nvidia-smi``; ``mean`` is None
    off CUDA or when neither is there.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.2):
        self.device, self.interval_s = device, interval_s
        self.samples: list[tuple[float, float]] = []   # (time.time(), percent)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuUtilization":
        query = _utilization_query(self.device) if self.device.type == "cuda" else None
        if query is not None:
            self._thread = threading.Thread(target=self._sample, args=(query,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self, query: Callable[[], float]) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append((time.time(), query()))
            except Exception:  # a failed read loses one sample, not the benchmark
                pass

    @property
    def mean(self) -> float | None:
        return self.mean_within([(float("-inf"), float("inf"))])

    def mean_within(self, windows: Sequence[tuple[float, float]]) -> float | None:
        """Mean of the samples taken inside any of ``windows`` ((start, end) ``time.time()`` readings)."""
        values = [value for when, value in self.samples if any(start <= when <= end for start, end in windows)]
        return round(sum(values) / len(values), 1) if values else None


def _utilization_query(device: torch.device) -> Callable[[], float] | None:
    try:
        torch.cuda.utilization(device)
        return lambda: float(torch.cuda.utilization(device))
    except Exception:  # no pynvml, or NVML cannot be read
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        log.warning("neither pynvml nor nvidia-smi is available: GPU utilisation is not measured")
        return None
    # The UUID names the same GPU whatever CUDA_VISIBLE_DEVICES renumbered.
    uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}"
    command = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", uuid]

    def query() -> float:
        return float(subprocess.run(command, capture_output=True, text=True, check=True, timeout=5).stdout)

    try:
        query()
    except (subprocess.SubprocessError, ValueError, OSError) as exc:
        log.warning("nvidia-smi cannot read the GPU's utilisation (%s): it is not measured", exc)
        return None
    return query


class Stopwatch:
    """Wall time of a block, with the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
