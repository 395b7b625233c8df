"""Checks of the images a caller sends inline, at the gateway's edge, before any provider sees them.

A first frame or a reference image's `data` is untrusted bytes that a renderer hands to a provider. Bytes
that were no image, a media type that was not an image's, a PNG header claiming 20000x20000 pixels all
reached the provider; the last made it answer 500 and left the job uncertain with money reserved. Here,
without decoding a pixel:

- the format is sniffed from the bytes' signature, PNG, JPEG or WebP only, and only that format's Pillow
  reader parses them;
- a declared `mime_type` must be that format's (image/png, image/jpeg, image/webp; any case); an empty
  one is filled in from the bytes (`normalize_mime_type`);
- Pillow reads the header (`Image.open`, which is lazy: a JPEG's markers up to its scan, a WebP's
  container through libwebp) and `verify()` checks what it can without decoding: a PNG's chunks and
  their checksums up to IEND (for JPEG and WebP, nothing more than opening did);
- width, height and total pixels are held to the limits below. A header claiming more than twice
  Pillow's `Image.MAX_IMAGE_PIXELS` makes `Image.open` raise DecompressionBombError before anything is
  allocated; a WebP's canvas size is read from its header before Pillow opens it, because Pillow's
  WebP reader allocates the whole canvas as it opens the file.

The byte size of `data` is capped by the caller of these functions (`validation.MAX_FIRST_FRAME_BYTES`).
Images given by URI (https://, gs://, file://) are left as they are: checking them would mean fetching
them at the edge, and whoever fetches them reads at most the same byte cap.
"""

import io
import struct
import warnings

from PIL import Image

from aiprod.common.v1 import render_pb2

# A side longer than any video a provider makes (4K is 3840 px), with room for a high-resolution photo:
# the image is scaled to the video's frame anyway, and a bound keeps every decode of it small.
MAX_IMAGE_SIDE_PIXELS = 8192
# Less than an 8192x8192 image (67 MP): decoding an accepted image takes at most 160 MB (four
# bytes a pixel), in the gateway (Pillow's WebP reader) and in every renderer.
MAX_IMAGE_TOTAL_PIXELS = 40_000_000
# Smaller holds nothing a video can start from: such an image is a mistake or a probe.
MIN_IMAGE_SIDE_PIXELS = 16

# Pillow's names of the formats taken, and their media types.
_MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
ACCEPTED_MIME_TYPES = tuple(_MIME_TYPES.values())
_ACCEPTED = "image/png, image/jpeg or image/webp"
# How much of a declared media type an error quotes.
_ECHO_CHARS = 32


def sniffed_format(data: bytes) -> str | None:
    """The Pillow format the bytes' signature names ("PNG", "JPEG" or "WEBP"), else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def normalize_mime_type(image: render_pb2.Image) -> None:
    """Sets the mime_type of an inline image that image_violations passed to the media type its bytes
    hold ("" or "IMAGE/PNG" becomes "image/png"), so that no renderer guesses it. A URI image is left
    as it is."""
    if not image.data or image.uri:
        return
    format_ = sniffed_format(image.data)
    if format_ is not None and image.mime_type != _MIME_TYPES[format_]:
        image.mime_type = _MIME_TYPES[format_]


def image_violations(image: render_pb2.Image, field: str) -> list[tuple[str, str]]:
    """What is wrong with an image's inline data, at most its byte cap, without decoding it, as (field,
    reason) naming `field.data` or `field.mime_type`; nothing for an image without data or with a URI
    (the caller refuses both at once). No reason quotes the data."""
    if not image.data or image.uri:
        return []
    violations: list[tuple[str, str]] = []
    declared = image.mime_type.lower()
    if declared and declared not in ACCEPTED_MIME_TYPES:
        violations.append(
            (f"{field}.mime_type", f"must be {_ACCEPTED} (or empty), not {_echo(image.mime_type)}")
        )
    format_ = sniffed_format(image.data)
    if format_ is None:
        return [*violations, (f"{field}.data", "is not a PNG, JPEG or WebP image")]
    if declared in ACCEPTED_MIME_TYPES and declared != _MIME_TYPES[format_]:
        violations.append((f"{field}.mime_type", f"is {declared} but the data is {_MIME_TYPES[format_]}"))
    problem = _header_problem(image.data, format_)
    if problem:
        violations.append((f"{field}.data", problem))
    return violations


def _header_problem(data: bytes, format_: str) -> str | None:
    """Why the bytes, whose signature is format_'s, are not an image to accept; None when they are."""
    if format_ == "WEBP":
        size = _webp_canvas_size(data)
        if size is None:
            return "is not a readable WEBP image"
        if problem := _size_problem(*size):
            return problem
    try:
        # Opening hostile bytes warns of what is refused here anyway (a large image, a malformed MPO):
        # not for the gateway's log. (The filters are the process's: images are checked on the event
        # loop's thread alone.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=[format_]) as opened:
                if problem := _size_problem(*opened.size):
                    return problem
                opened.verify()
    except Image.DecompressionBombError:
        return f"must have at most {MAX_IMAGE_TOTAL_PIXELS // 1_000_000} megapixels; its header declares far more"
    except Exception:
        # Pillow's readers raise many kinds of error on broken bytes (SyntaxError, OSError, ValueError,
        # struct.error, EOFError...): each means the same to the caller.
        return f"is not a readable {format_} image"
    return None


def _size_problem(width: int, height: int) -> str | None:
    if width < MIN_IMAGE_SIDE_PIXELS or height < MIN_IMAGE_SIDE_PIXELS:
        return (
            f"must be at least {MIN_IMAGE_SIDE_PIXELS}x{MIN_IMAGE_SIDE_PIXELS} pixels, not {width}x{height}"
        )
    if max(width, height) > MAX_IMAGE_SIDE_PIXELS or width * height > MAX_IMAGE_TOTAL_PIXELS:
        return (
            f"must be at most {MAX_IMAGE_SIDE_PIXELS} pixels a side and"
            f" {MAX_IMAGE_TOTAL_PIXELS // 1_000_000} megapixels in all, not {width}x{height}"
        )
    return None


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """A WebP's (width, height) as its first chunk declares it (RFC 9649), without libwebp; None when
    the header is not one of a simple (VP8, VP8L) or an extended (VP8X) WebP."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _echo(value: str) -> str:
    return repr(value[:_ECHO_CHARS]) + ("..." if len(value) > _ECHO_CHARS else "")
