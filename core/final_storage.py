"""The final training of a sweep kept in a bucket: ``final/`` goes back into the bucket beside the sweep.

    python -m core.final_train s3://bucket/prefix/<sweep>/best.json [--storage-endpoint URL] [--epochs N] ...

Not a command of its own (core/final_train.py calls :func:`final_train_in_bucket`). The sweep's files (without
Ray's state and the trials' models, as ``python -m core.download`` copies them) come into a temporary folder,
the training runs there as for a local best.json, and its outputs go to ``s3://bucket/prefix/<sweep>/final/``:
first the old ``final/`` is deleted, then every file but ``metrics.json`` (last.pt, the resume state, stays
behind), then ``metrics.json`` (the completion marker, as in a local final/: a folder holding one is complete),
then the sweep's report.html with its new final-model section. A run cut short leaves a ``final/`` without
metrics.json, which reads as unfinished. The temporary folder goes once everything is uploaded (``--out DIR``
keeps the outputs on this machine too). Endpoint and credentials as for ``sweep.run --storage``
(core/io/storage.py).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from core import filenames
from core.download import download
from core.errors import UserError
from core.io.storage import Store, open_store

log = logging.getLogger(__name__)

MARKER = filenames.EVALUATION                     # written last by core.final_train: a folder holding it is whole
LEFT_BEHIND = (filenames.LAST_CHECKPOINT,)        # resume state of this machine's training, not an output
Result = TypeVar("Result")


def final_train_in_bucket(best_uri: str, endpoint: str | None, out_dir: str | Path | None,
                          train: Callable[[Path, Path], Result]) -> tuple[Result, str]:
    """Download the sweep of ``best_uri``, ``train(best.json, out folder)`` there, upload the outputs; returns
    the training's result and the URI of the uploaded final/."""
    name = best_uri.rstrip("/").rsplit("/", 1)[-1]
    sweep = open_store(best_uri.rstrip("/").rsplit("/", 1)[0], endpoint)
    if name != filenames.BEST_TRIAL or not sweep.exists(name):
        raise UserError(f"{best_uri}: expected a sweep's best.json in the bucket (s3://bucket/prefix/<sweep>/"
                        f"{filenames.BEST_TRIAL}); it is not there")
    work = Path(tempfile.mkdtemp(prefix="final-train-"))
    try:
        local = work / sweep.uri.rsplit("/", 1)[-1]
        download(sweep.uri, local, endpoint, exclude=(f"{filenames.FINAL_DIR}/*",))
        out = Path(out_dir) if out_dir is not None else local / filenames.FINAL_DIR
        result = train(local / filenames.BEST_TRIAL, out)
        upload_final(out, sweep, local)
        return result, sweep.child(filenames.FINAL_DIR).uri
    finally:
        shutil.rmtree(work, ignore_errors=True)


def upload_final(out: Path, sweep: Store, local: Path) -> None:
    """``out`` to the sweep's final/ in the bucket, metrics.json last; then the sweep's updated page."""
    final = sweep.child(filenames.FINAL_DIR)
    final.delete("")  # an older final/: its metrics.json would make a half-finished upload look complete
    sent = final.upload_tree(out, exclude=(MARKER, *LEFT_BEHIND))
    sent += final.upload_file(out / MARKER, MARKER)
    page = local / filenames.REPORT_HTML
    if page.is_file():
        sent += sweep.upload_file(page, filenames.REPORT_HTML)
    log.info("uploaded %s (%.1f MB) and the sweep's report.html", final.uri, sent / 1e6)
