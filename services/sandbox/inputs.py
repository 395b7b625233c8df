"""Checks of image inputs as the providers make them: an inline image must decode; URLs are not fetched."""

import base64
import binascii
import io
import re

from PIL import Image, UnidentifiedImageError

_DATA_URI = re.compile(r"data:(image/[\w.+-]+);base64,(.*)", re.DOTALL)
IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/webp")


def decodes_as_image(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False
    return True


def base64_image(text: str) -> bool:
    """Whether base64 text holds an image."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return decodes_as_image(data)


def image_reference(value: object) -> bool:
    """Whether a prompt image given by reference is acceptable: an http(s) URL or an image data URI."""
    if not isinstance(value, str):
        return False
    if value.startswith(("https://", "http://")):
        return True
    match = _DATA_URI.fullmatch(value)
    return match is not None and match.group(1) in IMAGE_MIME_TYPES and base64_image(match.group(2))
