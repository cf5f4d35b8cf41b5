"""Object storage (S3 and S3-compatible servers) for runs and sweeps: one place that parses ``s3://`` URIs,
builds the pyarrow file system, copies files and folders both ways and turns every storage failure into a
one-line error.

Not a command (``python -m core.download`` and ``python -m sweep.run --storage`` use it).

Credentials come from the usual AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, optionally
``AWS_SESSION_TOKEN``; without them pyarrow's default chain, e.g. an instance role), the region from
``AWS_REGION``/``AWS_DEFAULT_REGION``. The endpoint of an S3-compatible server (SeaweedFS, MinIO, Ceph) is
``--storage-endpoint URL``, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``: pyarrow itself ignores those
variables, so they are read here. Keys given in the environment are stored in the file system object, so a
:class:`Store` pickled to a Ray worker works there without the variables (as Ray's own checkpoint upload does).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from contextlib import contextmanager

from core.io import atomic
from core.errors import UserError

SCHEME = "s3://"
# pyarrow's AWS error names -> what the user should do about them
_REASONS = (
    (("NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "curlCode", "Timeout", "timed out"),
     "cannot reach the endpoint {endpoint} (is the server running? the endpoint is --storage-endpoint URL)"),
    (("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "AccessDenied",
      "MISSING_AUTHENTICATION_TOKEN"),
     "access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    (("NO_SUCH_BUCKET", "NoSuchBucket"), "the bucket '{bucket}' does not exist: create it first"),
)


class StorageError(UserError):
    """Object storage failed (unreachable, access denied, no bucket); the message is one line naming the URI."""


def storage_fault(error: str | None) -> bool:
    """Whether a trial's recorded error (sweep/recorder.py's one line) is a storage failure: a StorageError of
    this module, or pyarrow's own (Ray's checkpoint upload) naming an AWS error. Such a trial did nothing wrong:
    ``sweep.run --resume`` trains it again from its last checkpoint, unlike a trial that raised for itself."""
    text = error or ""
    return text.startswith(f"{StorageError.__name__}: ") or "AWS Error" in text


def is_uri(text: str | os.PathLike | None) -> bool:
    return isinstance(text, str) and text.startswith(SCHEME)


@dataclass(frozen=True)
class Store:
    """A folder in a bucket: ``uri`` is ``s3://bucket/prefix``; paths given to the methods are relative to it."""

    uri: str
    fs: Any                           # pyarrow.fs.S3FileSystem (picklable, keys included)
    endpoint: str | None = None

    @property
    def bucket(self) -> str:
        return self.uri[len(SCHEME):].split("/", 1)[0]

    @property
    def root(self) -> str:
        return self.uri[len(SCHEME):]

    def child(self, *parts: str) -> "Store":
        return Store(_join(self.uri, *parts), self.fs, self.endpoint)

    def path(self, rel: str = "") -> str:
        return _join(self.root, rel) if rel else self.root

    def check(self) -> None:
        """The bucket exists and these credentials may list it (one request; before any work)."""
        from pyarrow import fs as pafs

        with self.failing("cannot use it"):
            info = self.fs.get_file_info(self.bucket)
            if info.type == pafs.FileType.NotFound:
                raise StorageError(f"{self.uri}: the bucket '{self.bucket}' does not exist: create it first")
            self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False, allow_not_found=True))

    def exists(self, rel: str) -> bool:
        from pyarrow import fs as pafs

        with self.failing(f"cannot read {rel}"):
            return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def files(self, rel: str = "") -> list[str]:
        """Every file below ``rel``, as paths relative to this store (sorted)."""
        from pyarrow import fs as pafs

        with self.failing(f"cannot list {rel or 'it'}"):
            found = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True))
        return sorted(str(PurePosixPath(f.path).relative_to(self.root)) for f in found
                      if f.type == pafs.FileType.File)

    def folders(self, rel: str = "") -> list[str]:
        """The names of the folders right below ``rel`` (sorted; one listing request, not a walk)."""
        from pyarrow import fs as pafs

        with self.failing(f"cannot list {rel or 'it'}"):
            found = self.fs.get_file_info(pafs.FileSelector(self.path(rel), recursive=False, allow_not_found=True))
        return sorted(PurePosixPath(f.path).name for f in found if f.type == pafs.FileType.Directory)

    def read_bytes(self, rel: str) -> bytes:
        with self.failing(f"cannot read {rel}"):
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()

    def upload_file(self, local: str | os.PathLike, rel: str) -> int:
        """Copy one local file to ``rel`` (an S3 PUT is atomic: readers see the old or the new object)."""
        with self.failing(f"cannot upload {rel}"):
            with open(local, "rb") as src, self.fs.open_output_stream(self.path(rel)) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        return Path(local).stat().st_size

    def download_file(self, rel: str, local: str | os.PathLike) -> None:
        with self.failing(f"cannot download {rel}"):
            with atomic.atomic_path(local) as tmp, self.fs.open_input_stream(self.path(rel)) as src, \
                    open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)

    def upload_tree(self, local: str | os.PathLike, rel: str = "", exclude: Iterable[str] = ()) -> int:
        """Upload the files below ``local`` (relative paths matching an ``exclude`` glob stay); bytes sent."""
        root, patterns, sent = Path(local), tuple(exclude), 0
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            name = path.relative_to(root).as_posix()
            if not excluded(name, patterns) and not atomic_temp(path.name):
                sent += self.upload_file(path, _join(rel, name) if rel else name)
        return sent

    def download_tree(self, rel: str, local: str | os.PathLike, exclude: Iterable[str] = ()) -> int:
        """Download the files below ``rel`` into ``local`` (kept relative); the number of files."""
        patterns, count = tuple(exclude), 0
        for name in self.files(rel):
            inner = str(PurePosixPath(name).relative_to(rel)) if rel else name
            if not excluded(inner, patterns):
                self.download_file(name, Path(local) / inner)
                count += 1
        return count

    def delete(self, rel: str) -> None:
        """Remove a file, or a folder and everything below it; nothing there is fine."""
        from pyarrow import fs as pafs

        with self.failing(f"cannot delete {rel}"):
            kind = self.fs.get_file_info(self.path(rel)).type
            if kind == pafs.FileType.File:
                self.fs.delete_file(self.path(rel))
            elif kind == pafs.FileType.Directory:
                self.fs.delete_dir(self.path(rel))

    @contextmanager
    def failing(self, doing: str) -> Iterator[None]:
        """Turn pyarrow's OSError into a one-line :class:`StorageError` saying what to do."""
        try:
            yield
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(f"{self.uri}: {doing}: {describe(exc, self.bucket, self.endpoint)}") from None


def open_store(uri: str, endpoint: str | None = None) -> Store:
    """The :class:`Store` of ``s3://bucket[/prefix]``; the endpoint as the module docstring says."""
    try:
        from pyarrow import fs as pafs
    except ImportError:
        raise UserError(f"{uri}: object storage needs pyarrow: pip install -c constraints.txt -e .") from None
    if not is_uri(uri) or not uri[len(SCHEME):].split("/", 1)[0]:
        raise UserError(f"{uri!r}: expected s3://bucket or s3://bucket/prefix")
    uri = uri.rstrip("/")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {"connect_timeout": 5, "request_timeout": 30,
                               "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise UserError(f"--storage-endpoint {endpoint!r}: expected http://host:port or https://host:port")
        scheme, _, address = endpoint.partition("://")
        options.update(endpoint_override=address.rstrip("/"), scheme=scheme, region=region or "us-east-1")
    elif region:
        options["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        options.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                       session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return Store(uri, pafs.S3FileSystem(**options), endpoint)


def describe(exc: BaseException, bucket: str, endpoint: str | None) -> str:
    """One line: what went wrong with the storage, and what to do; pyarrow's own text where it is unknown."""
    text = " ".join(str(exc).split())
    for markers, reason in _REASONS:
        if any(m in text for m in markers):
            return reason.format(endpoint=endpoint or "(AWS's default)", bucket=bucket)
    return text[:300]


def atomic_temp(name: str) -> bool:
    """Whether ``name`` is a temporary file of core/io/atomic.py (a write in progress: never uploaded)."""
    return name.startswith(".") and name.endswith(".tmp")


def excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
