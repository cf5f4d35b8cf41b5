"""Copy a sweep, a run or one file from object storage to this machine, for the commands that read local files.

    python -m core.download s3://bucket/prefix/<sweep> results/<sweep>     # then: python -m core.final_train
                                                                            #   results/<sweep>/best.json
    python -m core.download s3://bucket/prefix/<sweep>/trials/<id>/best.pt models/  # one file (core.predict)
    python -m core.download s3://bucket/prefix/<sweep>/trials/<id> runs/<id> --include-models

A folder comes without Ray Tune's state (``ray/``, ``ray-confirm/``: ``sweep.run --resume --storage`` reads
that from the bucket itself) and without its trials' model files (``trials/*/*.pt``, about 45 MB each) unless
``--include-models``; a single file keeps its name inside DEST. Endpoint and credentials as for
``sweep.run --storage`` (core/io/storage.py): ``--storage-endpoint URL`` or ``AWS_ENDPOINT_URL``, and
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``. Why a download instead of every command reading
``s3://``: core.final_train writes ``final/`` beside best.json and core.evaluate/core.predict read the model
many times (and the coming server keeps it loaded), so a local copy is what they work on anyway.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Sequence

from core.errors import UserError, run_cli
from core.io.state_files import check_output_dir
from core.io.storage import open_store

SKIPPED = ("ray/*", "ray-confirm/*")          # Ray Tune's experiment state of a sweep's stages
MODELS = "trials/*/*.pt"                      # each trial's best.pt in a sweep's folder


def download(uri: str, dest: str | Path, endpoint: str | None = None, include_models: bool = False,
             exclude: Iterable[str] = ()) -> int:
    """Copy ``uri`` (a file or a folder) into ``dest``; the number of files. ``exclude``: more globs of a
    folder's files (relative paths) to leave."""
    store = open_store(uri, endpoint)
    dest = check_output_dir(dest, "DEST")
    name = store.uri.rsplit("/", 1)[-1]
    parent = open_store(store.uri.rsplit("/", 1)[0], endpoint) if "/" in store.root else None
    if parent is not None and parent.exists(name):
        parent.download_file(name, dest / name)
        return 1
    store.check()
    skips = (*SKIPPED, *exclude) if include_models else (*SKIPPED, MODELS, *exclude)
    count = store.download_tree("", dest, exclude=skips)
    if count == 0:
        raise UserError(f"{store.uri}: nothing there to download (no such file or folder)")
    return count


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.download", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Copy a sweep, a run or one file from s3:// to a local folder.",
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("uri", help="s3://bucket/prefix/... : a file or a folder")
    p.add_argument("dest", help="local folder to copy into (created)")
    p.add_argument("--storage-endpoint", metavar="URL", help="URL of an S3-compatible server (default: "
                                                             "AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--include-models", action="store_true", help="also the trials' best.pt files")
    args = p.parse_args(argv)
    count = download(args.uri, args.dest, args.storage_endpoint, args.include_models)
    print(f"{count} file(s) of {args.uri.rstrip('/')} in {args.dest}")
    return 0


if __name__ == "__main__":
    run_cli(main)
