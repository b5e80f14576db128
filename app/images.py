"""Reading uploads safely: size limit while streaming, an allow-list of formats, a pixel limit."""

from __future__ import annotations

import io
import warnings

from fastapi import UploadFile
from PIL import Image, UnidentifiedImageError

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


def decode_image(data: bytes, max_pixels: int, name: str = "upload") -> Image.Image:
    """Bytes -> 8-bit RGB image (first frame), or a 4xx ApiError naming what is wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
            width, height = image.size
            if width * height > max_pixels or width < 1 or height < 1:
                raise ApiError(413, "image_too_large", f"{name} is {width}x{height}: over the {max_pixels}-pixel limit")
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
