"""Reading uploads safely: size limit while streaming, an allow-list of formats, a pixel limit per image and
one per request (its decoded pixels together), and a downscale of what is larger than any use of it needs."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from fastapi import UploadFile
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from app.errors import ApiError
from models import to_rgb

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_CHUNK = 1 << 16


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    """The upload's bytes, refused (413) as soon as they pass ``max_bytes``."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = await upload.read(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise ApiError(413, "file_too_large", f"file {upload.filename!r} is over the {max_bytes}-byte limit")
        chunks.append(chunk)
    if total == 0:
        raise ApiError(400, "empty_file", f"file {upload.filename!r} is empty")
    return b"".join(chunks)


def decode_image(
    data: bytes, max_pixels: int, name: str = "upload", request_pixels_left: int | None = None
) -> Image.Image:
    """Bytes -> 8-bit RGB image (first frame), or a 4xx ApiError naming what is wrong. Both pixel limits are
    checked from the header, before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            width, height = image.size
            if width * height > max_pixels or width < 1 or height < 1:
                raise ApiError(413, "image_too_large", f"{name} is {width}x{height}: over the {max_pixels}-pixel limit")
            if request_pixels_left is not None and width * height > request_pixels_left:
                raise ApiError(
                    413,
                    "request_too_many_pixels",
                    f"{name} ({width}x{height}) takes the request's images over their decoded-pixel limit "
                    "(REID_MAX_REQUEST_PIXELS); send fewer or smaller images per request",
                )
            image.seek(0)
            image.load()
            return to_rgb(image).copy()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(413, "image_too_large", f"{name}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ApiError(
            415, "unsupported_image", f"{name} is not an image of an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(400, "corrupt_image", f"{name} is truncated or corrupt: {exc}") from exc


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` with its longer side at most ``max_side`` pixels, aspect kept (each side at least 1 pixel).
    The network sees 256x128 crops: a larger image only costs memory, storage and time downstream."""
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: a cheap integer reduce first, then Lanczos on an image at most twice the target.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)


@dataclass
class Upload:
    data: bytes
    image: Image.Image  # 8-bit RGB, its longer side at most max_side
    filename: str | None


async def read_images(
    files: list[UploadFile],
    max_files: int,
    max_bytes: int,
    max_pixels: int,
    max_request_pixels: int,
    max_side: int | None = None,
) -> list[Upload]:
    """Every upload of a request read and decoded, off the event loop in one thread-pool call, within the
    file-count, byte and pixel limits (a 4xx ApiError otherwise), then downscaled to ``max_side`` (the request's
    pixel budget counts the decoded size: that is what was held in memory)."""
    if len(files) > max_files:
        raise ApiError(413, "too_many_files", f"{len(files)} files: at most {max_files} a request")
    read = [(await read_upload(upload, max_bytes), upload.filename) for upload in files]
    return await run_in_threadpool(_decode_all, read, max_pixels, max_request_pixels, max_side or 2**31)


def _decode_all(
    read: list[tuple[bytes, str | None]], max_pixels: int, max_request_pixels: int, max_side: int
) -> list[Upload]:
    out: list[Upload] = []
    left = max_request_pixels
    for data, filename in read:
        image = decode_image(data, max_pixels, filename or "upload", left)
        left -= image.width * image.height
        out.append(Upload(data, downscale(image, max_side), filename))
    return out
