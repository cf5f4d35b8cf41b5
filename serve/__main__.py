"""Serve a model file: the page, /predict and the KServe v2 routes, under uvicorn or through Ray Serve.

    python -m serve results/<sweep>/final/model.pt [--host 127.0.0.1] [--port 8000] [--api-key KEY]
        [--device auto|cpu|cuda] [--backend torch|onnx] [--model-name NAME] [--threads N]
    python -m serve results/<sweep>/final/model.pt --ray [--replicas N] [--gpus-per-replica F] [--address auto]

A model file that is missing, damaged or not a lesion-sweep model (a pickle that would run code is refused:
files are read with torch.load(weights_only=True)) ends with one line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Sequence

from core.cli import add_coverage_option, apply_threads, coverage_of
from core.errors import UserError, run_cli
from serve.app import DEFAULT_MODEL_NAME, MAX_BODY_BYTES
from serve.service import ServeOptions

log = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model file (core.final_train's model.pt)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("LESION_SERVE_API_KEY"),
                        help="require this key in the X-API-Key header (default: $LESION_SERVE_API_KEY; none)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                        help="onnx: single-view probabilities through ONNX Runtime (checked against torch at start)")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="the model's name in /v2/models/<name>")
    parser.add_argument("--max-batch", type=int, default=32, help="most images per forward pass")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0,
                        help="wait this long for more requests before a forward pass (default 0: batch only "
                             "what queued while the model was busy)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one per core); 1 can be faster on a busy machine")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20, help="largest request body")
    add_coverage_option(parser, default=None)
    ray = parser.add_argument_group("Ray Serve (--ray)")
    ray.add_argument("--ray", action="store_true", help="run the same app through Ray Serve")
    ray.add_argument("--replicas", type=int, default=1)
    ray.add_argument("--gpus-per-replica", type=float, default=0.0)
    ray.add_argument("--address", default=None, help="a running Ray cluster (auto, ray://host:port); default: local")
    args = parser.parse_args(argv)
    if args.replicas < 1 or args.gpus_per_replica < 0 or args.max_batch < 1 or args.max_body_mb <= 0:
        raise UserError("--replicas and --max-batch must be >= 1, --gpus-per-replica >= 0, --max-body-mb > 0")
    if not Path(args.model).is_file():
        raise UserError(f"{args.model}: no such model file (core.final_train writes results/<sweep>/final/model.pt)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    apply_threads(args.threads)
    options = ServeOptions(device=args.device, backend=args.backend, max_batch=args.max_batch,
                           max_wait_ms=args.batch_wait_ms, coverage=coverage_of(args))
    settings = {"api_key": args.api_key, "model_name": args.model_name, "max_body": int(args.max_body_mb * 2**20)}
    if args.ray:
        from serve.ray_app import run_on_ray

        return run_on_ray(args.model, options, settings, args)
    import uvicorn

    from serve.app import create_app
    from serve.service import ModelService

    service = ModelService.load(args.model, options)  # a bad file fails here: one line, exit 2
    app = create_app(service, **settings)
    log.info("serving %s (%s, %s) on http://%s:%d/%s", args.model, args.backend, service.loaded.device, args.host,
             args.port, " (X-API-Key required)" if args.api_key else "")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    run_cli(main)
