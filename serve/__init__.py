"""Serve a trained model (core.final_train's model.pt): a web page and a JSON API, on one machine or through Ray Serve.

    python -m serve results/<sweep>/final/model.pt [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    python -m serve results/<sweep>/final/model.pt --ray [--replicas N] [--gpus-per-replica F] [--address auto]

One FastAPI app (serve/app.py) either way; serve/README.md lists the routes. core/ knows nothing of the web:
this package only calls core.model.inference, core.data.image_cache and core.explain.gradcam.
"""
