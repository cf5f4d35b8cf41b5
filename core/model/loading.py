"""Read any model file for inference: a single model (``model.pt``, ``best.pt``: core/model/inference.py) or an
ensemble file (``ensemble.pt``: core/model/ensemble.py), which answers with the same interface.

A library, not a command: core.evaluate, core.predict, core.final_train and the server call
``load_for_inference(path, device)``. It lives apart from both kinds so that neither imports the other's loader.
"""

from __future__ import annotations

import os

from core.model.ensemble import EnsembleModel, ensemble_from_payload
from core.model.inference import LoadedModel, is_ensemble_payload, loaded_from
from core.model.networks import MODEL_ADVICE, model_from_payload, read_model_payload


def load_for_inference(path: str | os.PathLike, device: str = "auto",
                       advice: str = MODEL_ADVICE) -> LoadedModel | EnsembleModel:
    """Read a model file (model.pt, best.pt, ensemble.pt) onto ``device`` ('auto', 'cpu' or 'cuda'); ``advice``:
    what to do when it cannot be read."""
    payload = read_model_payload(path, advice)
    if is_ensemble_payload(payload):
        return ensemble_from_payload(payload, path, device)
    return loaded_from(*model_from_payload(payload, path), path, device)
