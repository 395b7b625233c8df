"""The gateway's checks of inline images (aiprod_gateway.images): real PNG, JPEG and WebP images pass,
bytes that are no image, a media type that is not theirs and sizes no renderer should decode are refused
naming their field, all without decoding a pixel; and validation runs them on every inline image a
request carries."""

import io
import struct
import time
import zlib

import pytest
from PIL import Image, ImageFile

from aiprod.common.v1 import render_pb2
from aiprod_gateway import images, validation
from aiprod_gateway.images import (
    MAX_IMAGE_SIDE_PIXELS,
    MAX_IMAGE_TOTAL_PIXELS,
    MIN_IMAGE_SIDE_PIXELS,
    image_violations,
    normalize_mime_type,
)
from aiprod_kit.errors import InvalidArgument

FIELD = "spec.first_frame"


def encoded(format_: str, width: int = 64, height: int = 48) -> bytes:
    """A real image made by Pillow."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format=format_)
    return buffer.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk: length, type, body and the CRC of type and body."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header (IHDR, 8-bit RGB) declares width x height, with no pixel data: what
    a decompression bomb looks like before it is decoded."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def webp_claiming(width: int, height: int) -> bytes:
    """An extended WebP (VP8X) header declaring a width x height canvas."""
    body = b"\0" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    riff = b"WEBP" + b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", len(riff)) + riff


def problems(data: bytes, mime_type: str = "") -> list[tuple[str, str]]:
    return image_violations(render_pb2.Image(data=data, mime_type=mime_type), FIELD)


@pytest.fixture
def never_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails any test that decodes pixels: the checks read headers only."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize(
    ("format_", "mime_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_real_images_pass_declared_or_not(never_decoded, format_, mime_type):
    data = encoded(format_)
    assert problems(data, mime_type) == []
    assert problems(data, mime_type.upper()) == []  # media types are case-insensitive
    assert problems(data) == []
    untyped = render_pb2.Image(data=data)
    normalize_mime_type(untyped)
    assert untyped.mime_type == mime_type
    shouted = render_pb2.Image(data=data, mime_type=mime_type.upper())
    normalize_mime_type(shouted)
    assert shouted.mime_type == mime_type


def test_bytes_that_are_no_image_are_refused_without_quoting_them():
    garbage = b"SECRET-PAYLOAD " * 100
    assert problems(garbage, "image/png") == [(f"{FIELD}.data", "is not a PNG, JPEG or WebP image")]
    html = b"<!doctype html><html><body><script>alert(1)</script></body></html>"
    assert problems(html, "image/png") == [(f"{FIELD}.data", "is not a PNG, JPEG or WebP image")]
    assert problems(html, "text/html") == [
        (f"{FIELD}.mime_type", "must be image/png, image/jpeg or image/webp (or empty), not 'text/html'"),
        (f"{FIELD}.data", "is not a PNG, JPEG or WebP image"),
    ]
    reasons = " ".join(why for _, why in problems(garbage) + problems(html))
    assert "SECRET" not in reasons and "script" not in reasons


def test_a_media_type_other_than_the_datas_is_refused():
    png = encoded("PNG")
    assert problems(png, "image/jpeg") == [(f"{FIELD}.mime_type", "is image/jpeg but the data is image/png")]
    assert problems(png, "text/html") == [
        (f"{FIELD}.mime_type", "must be image/png, image/jpeg or image/webp (or empty), not 'text/html'")
    ]
    (refused,) = problems(png, "image/" + "x" * 1000)
    assert len(refused[1]) < 120  # quoted cut short


def test_a_header_claiming_20000x20000_pixels_is_refused_quickly_without_decoding(never_decoded):
    bomb = png_claiming(20_000, 20_000)
    assert len(bomb) < 100
    started = time.perf_counter()
    assert problems(bomb, "image/png") == [
        (f"{FIELD}.data", "must have at most 40 megapixels; its header declares far more")
    ]
    # Decoding it would take 1.2 GB and seconds.
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (MAX_IMAGE_SIDE_PIXELS + 1, MIN_IMAGE_SIDE_PIXELS),
        (MIN_IMAGE_SIDE_PIXELS, MAX_IMAGE_SIDE_PIXELS + 1),
        (7000, 7000),  # each side within the limit, 49 MP in all
    ],
)
def test_sizes_over_the_limits_are_refused_from_the_header(never_decoded, width, height):
    assert problems(png_claiming(width, height)) == [
        (
            f"{FIELD}.data",
            f"must be at most 8192 pixels a side and 40 megapixels in all, not {width}x{height}",
        )
    ]


def test_sizes_up_to_the_limits_pass(never_decoded):
    height = MAX_IMAGE_TOTAL_PIXELS // MAX_IMAGE_SIDE_PIXELS
    assert problems(png_claiming(MAX_IMAGE_SIDE_PIXELS, height), "image/png") == []
    assert problems(encoded("PNG", MIN_IMAGE_SIDE_PIXELS, MIN_IMAGE_SIDE_PIXELS)) == []


def test_a_10x10_image_is_too_small():
    assert problems(encoded("PNG", 10, 10), "image/png") == [
        (f"{FIELD}.data", "must be at least 16x16 pixels, not 10x10")
    ]
    assert problems(encoded("JPEG", 64, 10)) == [
        (f"{FIELD}.data", "must be at least 16x16 pixels, not 64x10")
    ]


def test_a_webp_canvas_is_measured_before_pillow_allocates_it(monkeypatch):
    # Pillow's WebP reader allocates the canvas as it opens the file: a huge one never reaches it.
    def opened(*args: object, **kwargs: object) -> None:
        raise AssertionError("Pillow opened the WebP")

    monkeypatch.setattr(images.Image, "open", opened)
    assert problems(webp_claiming(16_000, 16_000), "image/webp") == [
        (f"{FIELD}.data", "must be at most 8192 pixels a side and 40 megapixels in all, not 16000x16000")
    ]


def test_damaged_images_are_refused():
    png = encoded("PNG")
    idat = png.index(b"IDAT")
    corrupted = png[: idat + 10] + bytes([png[idat + 10] ^ 0xFF]) + png[idat + 11 :]
    assert problems(corrupted, "image/png") == [(f"{FIELD}.data", "is not a readable PNG image")]  # its CRC
    assert problems(png[:40], "image/png") == [(f"{FIELD}.data", "is not a readable PNG image")]
    assert problems(encoded("JPEG")[:20]) == [(f"{FIELD}.data", "is not a readable JPEG image")]
    assert problems(encoded("WEBP")[:40]) == [(f"{FIELD}.data", "is not a readable WEBP image")]


def test_images_by_uri_are_left_as_they_are():
    # Not fetched at the edge: the URI checks (validation) are theirs.
    by_uri = render_pb2.Image(uri="https://images.example.com/a.png", mime_type="text/html")
    assert image_violations(by_uri, FIELD) == []
    normalize_mime_type(by_uri)
    assert by_uri.mime_type == "text/html"
    assert image_violations(render_pb2.Image(), FIELD) == []


# Through validation: every inline image of a request, named by its field.


def test_every_inline_image_of_a_request_is_checked_naming_its_field():
    png = render_pb2.Image(data=encoded("PNG"), mime_type="image/png")
    bomb = render_pb2.Image(data=png_claiming(20_000, 20_000), mime_type="image/png")
    shots = [render_pb2.Shot(prompt=f"shot {index}", duration_seconds=2) for index in range(3)]
    shots[2].first_frame.CopyFrom(bomb)
    shots[1].reference_images.extend([png, render_pb2.Image(data=encoded("JPEG"), mime_type="image/png")])
    spec = render_pb2.RenderSpec(prompt="A kite", first_frame=bomb, reference_images=[png, bomb], shots=shots)
    with pytest.raises(InvalidArgument) as raised:
        validation.normalized_spec(spec, validation.ImagePolicy())
    assert [field for field, _ in raised.value.violations] == [
        "spec.shots[1].reference_images[1].mime_type",
        "spec.shots[2].first_frame.data",
        "spec.first_frame.data",
        "spec.reference_images[1].data",
    ]
    plan = render_pb2.RenderPlan(shots=[render_pb2.Shot(prompt="a", duration_seconds=4, first_frame=bomb)])
    assert [field for field, _ in validation.shot_violations(plan.shots, "plan.shots", 30)] == [
        "plan.shots[0].first_frame.data"
    ]


def test_an_empty_media_type_is_filled_in_the_normalized_spec_and_the_request_fingerprinted_as_sent():
    jpeg, webp = encoded("JPEG"), encoded("WEBP")
    spec = render_pb2.RenderSpec(
        prompt="A kite",
        first_frame=render_pb2.Image(data=jpeg),
        reference_images=[render_pb2.Image(data=webp), render_pb2.Image(uri="https://8.8.8.8/a.png")],
        shots=[render_pb2.Shot(prompt="a", duration_seconds=4, first_frame=render_pb2.Image(data=webp))],
    )
    sent = spec.SerializeToString(deterministic=True)
    fingerprint = validation.fingerprint(spec)
    normalized, _ = validation.normalized_spec(spec, validation.ImagePolicy())
    assert normalized.first_frame.mime_type == "image/jpeg"
    assert [image.mime_type for image in normalized.reference_images] == ["image/webp", ""]
    assert normalized.shots[0].first_frame.mime_type == "image/webp"
    # The request is untouched, and fingerprinted as sent: a retry of it is the same request.
    assert spec.SerializeToString(deterministic=True) == sent
    assert validation.fingerprint(spec) == fingerprint != validation.fingerprint(normalized)
    # A spec without images gains none.
    bare, _ = validation.normalized_spec(render_pb2.RenderSpec(prompt="A kite"), validation.ImagePolicy())
    assert not bare.HasField("first_frame")
