"""An ``image_url`` -> a decoded Pillow image, within the server's limits.

Only two sources are read: ``data:`` URLs (base64, inline in the request) and, when the operator allowed a
directory with ``--allow-file-dir``, ``file://`` paths that resolve (symlinks followed) inside it. http(s)
URLs are never fetched: a server that fetched them could be made to reach the hosts of its own network.
Sizes are checked before any work they would cost: the base64 length before decoding it, the file size before
reading it, and the pixel count from the image header (Pillow reads it on open, before decoding) so a
decompression bomb is refused without decoding a byte of it.
"""

from __future__ import annotations

import base64
import binascii
import io
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mllm_deploy.serve.protocol import ApiError

PARAM = "messages"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    allowed_dirs: tuple[Path, ...] = ()  # resolved; empty: file:// refused


def check_url_scheme(url: str, limits: ImageLimits) -> None:
    """The cheap refusals, before the request takes a place in the queue."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise ApiError(400, "image URLs over http(s) are never fetched by this server; send the image inline as a"
                            " data: URL (data:image/png;base64,...)", param=PARAM, code="image_url_not_fetched")
    if scheme == "file" and not limits.allowed_dirs:
        raise ApiError(400, "file:// image URLs are refused: the server was started without --allow-file-dir;"
                            " send the image inline as a data: URL", param=PARAM, code="image_url_not_allowed")
    if scheme not in ("data", "file"):
        raise ApiError(400, "the image URL must be a data: URL (data:image/png;base64,...) or a file:// path under"
                            " an --allow-file-dir directory", param=PARAM, code="invalid_image_url")


def image_bytes(url: str, limits: ImageLimits) -> bytes:
    check_url_scheme(url, limits)
    if url[:5].lower() == "data:":
        return _data_url(url, limits.max_bytes)
    return _file_url(url, limits)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the image is {size} bytes, more than this server's limit of {limit} (--max-image-bytes)",
                    param=PARAM, code="image_too_large")


def _data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ApiError(400, "a data: image URL must be base64-encoded: data:image/<type>;base64,<data>", param=PARAM,
                       code="invalid_image_url")
    media = header[5:-7].split(";", 1)[0].strip().lower()
    if media and not media.startswith("image/"):
        raise ApiError(400, f"the data: URL holds {media!r}, not an image", param=PARAM, code="invalid_image_url")
    if len(payload) // 4 * 3 - 2 > max_bytes:  # what it would decode to, before decoding it
        raise _too_large(len(payload) // 4 * 3, max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the data: URL's base64 is not valid", param=PARAM, code="invalid_image_url") from None
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data


def _file_url(url: str, limits: ImageLimits) -> bytes:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ApiError(400, "a file:// image URL must name a local path (file:///path)", param=PARAM,
                       code="invalid_image_url")
    path = Path(unquote(parts.path))
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        real = None
    # one answer for "outside" and "missing outside": the client learns nothing about the rest of the disk
    if real is None or not path.is_absolute() or not any(real.is_relative_to(d) for d in limits.allowed_dirs):
        raise ApiError(400, "file:// images must lie under a directory the server allows (--allow-file-dir)",
                       param=PARAM, code="image_url_not_allowed")
    try:
        info = real.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ApiError(400, f"{path} is not a file", param=PARAM, code="invalid_image_url")
        if info.st_size > limits.max_bytes:
            raise _too_large(info.st_size, limits.max_bytes)
        with open(real, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise ApiError(400, f"image file not found: {path}", param=PARAM, code="invalid_image_url") from None
    except OSError as exc:
        raise ApiError(400, f"cannot read image file {path}: {exc.strerror}", param=PARAM,
                       code="invalid_image_url") from None
    if len(data) > limits.max_bytes:  # grew since the stat
        raise _too_large(len(data), limits.max_bytes)
    return data


def decode_image(data: bytes, max_pixels: int):
    """Open (header only), check the pixel count, then decode. Pillow's own bomb check is switched off in the
    server process (cli.py) so that this limit, with its clear message, is the one that applies."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"the image is too large: {exc}", param=PARAM, code="image_too_large") from None
    except Exception:  # UnidentifiedImageError, and the many errors of broken headers
        raise ApiError(400, "the image is not in a format this server can read (PNG, JPEG, WebP, GIF, BMP, ...)",
                       param=PARAM, code="invalid_image") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ApiError(400, f"the image is empty ({width}x{height} pixels)", param=PARAM, code="invalid_image")
    if width * height > max_pixels:
        raise ApiError(413, f"the image declares {width}x{height} = {width * height} pixels, more than this server's"
                            f" limit of {max_pixels} (--max-image-pixels); it was refused before decoding",
                       param=PARAM, code="image_too_large")
    try:
        image.load()
    except Exception as exc:  # truncated or corrupt data: Pillow's decoders raise many types
        problem = " ".join(str(exc).split()) or type(exc).__name__
        raise ApiError(400, f"cannot decode the image: {problem}", param=PARAM, code="invalid_image") from None
    return image
