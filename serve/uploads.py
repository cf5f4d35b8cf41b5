"""An uploaded file's bytes -> the model's uint8 input [3, S, S], exactly as core.predict decodes a file.

Bytes are checked before decoding (empty, pixel count from the header: a PNG "decompression bomb" declares
billions of pixels in a few kB) and then decoded by core.data.image_cache.decode_image, the function
core.predict and training use, so a served image and a predicted file give the same input. The client's
file name is only ever echoed back, cleaned (:func:`display_name`); it never becomes a path.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from core.errors import UserError
from core.data.image_cache import decode_image

# An image above this many pixels is refused before it is decoded. Dermoscopy cameras give at most about
# 25 megapixels; PIL's own bomb guard (MAX_IMAGE_PIXELS, 89 MP) is process-wide, so it is left as it is.
MAX_PIXELS = 40_000_000
# Part content types a browser or curl gives an image file (curl: octet-stream for an unknown suffix).
IMAGE_TYPES = ("image/", "application/octet-stream")


class BadInput(Exception):
    """A request the client must change: its HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def display_name(raw: str | None) -> str:
    """The client's file name made safe to echo: its last path component, printable, at most 100 characters."""
    last = re.split(r"[\\/]", raw or "")[-1]
    clean = "".join(ch if ch.isprintable() else "?" for ch in last).strip()[:100]
    return clean if clean not in ("", ".", "..") else "upload"


def check_part_type(content_type: str | None, name: str) -> None:
    """A part declared as something other than an image (text/plain, application/json ...) is refused: 415."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind and not kind.startswith(IMAGE_TYPES):
        raise BadInput(415, f"{name}: content type {kind!r} is not an image (send image/jpeg, image/png ...)")


class _NamedBytes(io.BytesIO):
    """In-memory bytes that print as the upload's name, so decode_image's messages name the upload."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._name = name

    def __str__(self) -> str:
        return self._name

    def __repr__(self) -> str:   # PIL's "cannot identify image file %r"
        return repr(self._name)


def decode_upload(data: bytes, name: str, image_size: int) -> np.ndarray:
    """uint8 [3, S, S] RGB of an uploaded image; BadInput (400, 413) naming the upload and what is wrong."""
    if not data:
        raise BadInput(400, f"{name}: empty file")
    try:
        with Image.open(_NamedBytes(data, name)) as image:   # reads the header only
            width, height = image.size
    except Image.DecompressionBombError as exc:   # over PIL's own guard, so over ours too
        raise BadInput(413, f"{name}: a decompression bomb ({' '.join(str(exc).split())}); the limit here is "
                            f"{MAX_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadInput(400, f"{name}: not an image ({' '.join(str(exc).split())})") from None
    if width * height > MAX_PIXELS:
        raise BadInput(413, f"{name}: {width}x{height} pixels is over the limit of {MAX_PIXELS:,} "
                            f"(a decompression bomb or a needlessly large image)")
    try:
        return decode_image(_NamedBytes(data, name), image_size)
    except UserError as exc:   # truncated, corrupt: decode_image names the file and PIL's reason
        raise BadInput(400, str(exc)) from None
