"""``python -m serve MODEL --ray``: the same FastAPI app (serve/app.py), run by Ray Serve replicas.

Each replica builds the app around its own loaded model (``__serve_build_asgi_app__``, Ray Serve's late-bound
ingress), so the routes, the micro-batcher and the error handling are those of the uvicorn server.
``--replicas N`` replicas, each with ``--gpus-per-replica F`` GPUs (0: CPU); ``--address`` joins a running
Ray cluster (every node needs this project and the model file at the same path), else a local Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from serve.service import ServeOptions

log = logging.getLogger(__name__)

APP_NAME = "lesion-serve"


class LesionServer:
    """A Ray Serve replica: loads the model file, then hands Ray Serve the app serving it."""

    def __init__(self, model_path: str, options: ServeOptions, settings: dict[str, Any]) -> None:
        self.model_path, self.options, self.settings = model_path, options, settings
        self.service: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        from serve.app import create_app
        from serve.service import ModelService

        self.service = ModelService.load(self.model_path, self.options)
        return create_app(self.service, **self.settings)


def build_application(model_path: str | Path, options: ServeOptions, settings: dict[str, Any], replicas: int = 1,
                      gpus_per_replica: float = 0.0) -> Any:
    """The Ray Serve application (``serve.run`` it) of ``replicas`` LesionServer replicas."""
    from ray import serve

    ingress = serve.ingress()(LesionServer)
    deployment = serve.deployment(name="LesionServer", num_replicas=replicas,
                                  ray_actor_options={"num_gpus": gpus_per_replica})(ingress)
    return deployment.bind(str(Path(model_path).resolve()), options, settings)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_on_ray(model_path: str, options: ServeOptions, settings: dict[str, Any], args: argparse.Namespace) -> int:
    """Start (or join) Ray, serve the app on ``args.host:args.port`` until interrupted, then shut Serve down."""
    import ray
    from ray import serve

    from core.model.loading import load_for_inference

    load_for_inference(model_path, "cpu")  # a bad model file fails here, in one line, before Ray starts
    # without --address, a Ray of our own: a plain ray.init() would join whatever `ray start` last recorded
    ray.init(address=args.address or "local", include_dashboard=False)
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which sets its own: a `kill` shuts Serve down too
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_application(model_path, options, settings, args.replicas, args.gpus_per_replica)
        log.info("Ray Serve: %d replica(s) of %s on http://%s:%d/", args.replicas, model_path, args.host, args.port)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        log.info("stopping Ray Serve")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
