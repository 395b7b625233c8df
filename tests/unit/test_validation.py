"""The gateway's checks of a first frame's URI: where an untrusted caller may point a renderer.

No test resolves a name other than localhost: public names go through a stand-in resolver.
"""

import base64
import io
import socket
import struct
import zlib

import pytest
from google.protobuf import timestamp_pb2
from PIL import Image

from aiprod.common.v1 import render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_gateway import validation
from aiprod_gateway.validation import (
    MAX_FIRST_FRAME_BYTES,
    MAX_REFERENCE_IMAGES,
    ImagePolicy,
    check_image_host,
    check_shot_hosts,
    checked_spec,
    image_uri_violations,
    list_query,
    normalized_spec,
    page_token,
    shot_violations,
)
from aiprod_kit.errors import InvalidArgument, Unavailable
from aiprod_kit.settings import GatewaySettings

FIELD = "spec.first_frame.uri"
POLICY = ImagePolicy(buckets=frozenset({"frames-ok"}))


def problems(uri: str, policy: ImagePolicy = POLICY) -> list[str]:
    violations = image_uri_violations(uri, policy, FIELD)
    assert all(field == FIELD for field, _ in violations)
    return [why for _, why in violations]


def png_bytes(size: int = 0) -> bytes:
    """A real 16x16 PNG (the smallest image taken), padded to `size` bytes with a private chunk if given."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (40, 120, 200)).save(buffer, format="PNG")
    image = buffer.getvalue()
    if not size:
        return image
    padding = b"\0" * (size - len(image) - 12)
    crc = zlib.crc32(b"paDd" + padding)
    chunk = struct.pack(">I", len(padding)) + b"paDd" + padding + struct.pack(">I", crc)
    return image[:-12] + chunk + image[-12:]  # before IEND, the last 12 bytes


def spec(uri: str = "", data: bytes = b"") -> render_pb2.RenderSpec:
    return render_pb2.RenderSpec(prompt="A kite", first_frame=render_pb2.Image(uri=uri, data=data))


@pytest.mark.parametrize(
    "uri",
    [
        "gs://frames-ok/a/b.png",
        "https://images.example.com/a.png",
        "https://images.example.com:8443/a.png?size=large",
        "https://8.8.8.8/a.png",
        "https://[2001:4860:4860::8888]/a.png",
        "https://images.example.com./a.png",
    ],
)
def test_accepted_uris(uri):
    assert problems(uri) == []


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        # Cloud Storage: configured buckets only.
        ("gs://other-bucket/a.png", "bucket 'other-bucket' is not one this gateway takes first frames from"),
        ("gs://frames-ok", "must be gs://BUCKET/OBJECT"),
        ("gs://frames-ok/", "must be gs://BUCKET/OBJECT"),
        # https: public hosts only, named or literal, in every spelling.
        ("https://localhost/a.png", "this machine"),
        ("https://LOCALHOST./a.png", "this machine"),
        ("https://api.localhost/a.png", "this machine"),
        ("https://127.0.0.1/a.png", "loopback"),
        ("https://127.8.9.10:8080/a.png", "loopback"),
        ("https://[::1]/a.png", "loopback"),
        ("https://[::ffff:127.0.0.1]/a.png", "loopback"),
        ("https://10.1.2.3/a.png", "private"),
        ("https://172.16.0.1/a.png", "private"),
        ("https://192.168.1.1/a.png", "private"),
        ("https://[fd00::1]/a.png", "private"),
        ("https://169.254.169.254/computeMetadata/v1/", "link-local"),
        ("https://[fe80::1]/a.png", "link-local"),
        ("https://0.0.0.0/a.png", "unspecified"),
        ("https://224.0.0.1/a.png", "multicast"),
        ("https://100.64.0.1/a.png", "non-public"),
        ("https://2130706433/a.png", "neither a DNS name nor an IP address"),
        ("https://0x7f.1/a.png", "neither a DNS name nor an IP address"),
        ("https://127.1/a.png", "neither a DNS name nor an IP address"),
        ("https://user:secret@images.example.com/a.png", "user name or password"),
        ("https://images.example.com@127.0.0.1/a.png", "user name or password"),
        ("https:///a.png", "must name a host"),
        ("https://images.example.com:99999/a.png", "is not a valid URI"),
        # Other schemes.
        ("http://images.example.com/a.png", "must use https://"),
        ("file:///tmp/a.png", "file:// first frames are not accepted here"),
        ("ftp://images.example.com/a.png", "must be a gs://, https:// or file:// URI"),
        ("data:image/png;base64,AAAA", "must be a gs://, https:// or file:// URI"),
        ("https://images.example.com/a b.png", "printable ASCII"),
        ("https://images.ex\u0430mple.com/a.png", "printable ASCII"),  # a Cyrillic look-alike
    ],
)
def test_refused_uris_say_why(uri, why):
    found = problems(uri)
    assert len(found) == 1 and why in found[0], found


def test_no_gs_bucket_configured_takes_no_gs_uri():
    assert "gs:// first frames are not accepted here" in problems("gs://frames-ok/a.png", ImagePolicy())[0]


def test_file_uris_only_where_the_operator_allows_them():
    local = ImagePolicy(allow_files=True)
    assert problems("file:///home/dev/first.png", local) == []
    assert problems("file://localhost/home/dev/first.png", local) == []
    assert "ABSOLUTE/PATH" in problems("file://otherhost/first.png", local)[0]


def test_errors_quote_a_bounded_prefix_of_the_input():
    long_scheme = "x" * 5000 + "://a"
    (why,) = problems(long_scheme[:2000])
    assert len(why) < 200 and why.endswith("...")
    (why,) = problems("https://a.example.com/" + "p" * 5000)
    assert why == "must be at most 2048 characters, not 5022"
    assert len(problems("gs://" + "b" * 1000 + "/a.png")[0]) < 300


def test_a_spec_names_every_bad_first_frame_field():
    with pytest.raises(InvalidArgument) as raised:
        normalized_spec(spec("https://127.0.0.1/a.png"), POLICY)
    assert [field for field, _ in raised.value.violations] == [FIELD]
    with pytest.raises(InvalidArgument) as raised:
        normalized_spec(spec(data=b"x" * (MAX_FIRST_FRAME_BYTES + 1)), POLICY)
    assert [field for field, _ in raised.value.violations] == ["spec.first_frame.data"]
    normalized_spec(spec(data=png_bytes(MAX_FIRST_FRAME_BYTES)), POLICY)


def test_the_policy_comes_from_the_gateway_settings(monkeypatch):
    monkeypatch.setenv("AIPROD_GATEWAY_IMAGE_BUCKETS", " frames-a, frames-b ,")
    monkeypatch.setenv("AIPROD_GATEWAY_ALLOW_FILE_IMAGES", "true")
    assert ImagePolicy.from_settings(GatewaySettings()) == ImagePolicy(
        frozenset({"frames-a", "frames-b"}), True
    )
    monkeypatch.setenv("AIPROD_GATEWAY_IMAGE_BUCKETS", "gs://frames-a")
    with pytest.raises(ValueError, match="not a Cloud Storage bucket name"):
        GatewaySettings()
    monkeypatch.delenv("AIPROD_GATEWAY_IMAGE_BUCKETS")
    monkeypatch.delenv("AIPROD_GATEWAY_ALLOW_FILE_IMAGES")
    assert ImagePolicy.from_settings(GatewaySettings()) == ImagePolicy(frozenset(), False)


# Host names: resolved with the event loop's getaddrinfo; every address must be public.


def resolver(*addresses: str):
    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


def failing_resolver(errno: int):
    async def resolve(host: str, port: int) -> list[str]:
        raise socket.gaierror(errno, "stand-in")

    return resolve


async def test_a_name_resolving_to_public_addresses_passes():
    normalized, _ = await checked_spec(
        spec("https://images.example.com/a.png"), POLICY, resolver("93.184.215.14", "2606:2800:21f:cb07::1")
    )
    assert normalized.first_frame.uri == "https://images.example.com/a.png"


@pytest.mark.parametrize(
    ("addresses", "kind"),
    [
        (("10.0.0.7",), "private"),
        (("93.184.215.14", "127.0.0.1"), "loopback"),
        (("fe80::1%eth0",), "link-local"),
    ],
)
async def test_a_name_resolving_to_any_non_public_address_is_refused(addresses, kind):
    with pytest.raises(InvalidArgument) as raised:
        await checked_spec(spec("https://rebind.example.com/a.png"), POLICY, resolver(*addresses))
    ((field, why),) = raised.value.violations
    assert field == FIELD and f"resolves to a {kind} address" in why


async def test_names_are_resolved_by_the_event_loop():
    # The real resolver, on the one name it answers from the hosts file, without the network (the name
    # check alone refuses localhost already; this checks the resolution behind it).
    with pytest.raises(InvalidArgument, match="resolves to a loopback address"):
        await check_image_host("https://localhost/a.png", FIELD)


async def test_unknown_names_are_invalid_and_resolver_trouble_is_unavailable():
    with pytest.raises(InvalidArgument, match="does not resolve"):
        await checked_spec(spec("https://nx.example.com/a.png"), POLICY, failing_resolver(socket.EAI_NONAME))
    with pytest.raises(Unavailable):
        await checked_spec(spec("https://slow.example.com/a.png"), POLICY, failing_resolver(socket.EAI_AGAIN))


async def test_literals_and_other_schemes_need_no_resolution():
    await checked_spec(spec("https://8.8.8.8/a.png"), POLICY, failing_resolver(socket.EAI_AGAIN))
    await checked_spec(spec("gs://frames-ok/a.png"), POLICY, failing_resolver(socket.EAI_AGAIN))


async def test_an_edited_plan_is_held_to_the_same_rules():
    plan = render_pb2.RenderPlan(
        shots=[
            render_pb2.Shot(
                prompt="a", duration_seconds=4, first_frame=render_pb2.Image(uri="gs://frames-ok/a.png")
            ),
            render_pb2.Shot(
                prompt="b", duration_seconds=4, first_frame=render_pb2.Image(uri="file:///etc/passwd")
            ),
            render_pb2.Shot(
                prompt="c",
                duration_seconds=4,
                first_frame=render_pb2.Image(data=b"x" * (MAX_FIRST_FRAME_BYTES + 1)),
            ),
        ]
    )
    assert [field for field, _ in shot_violations(plan.shots, "plan.shots", 30, POLICY)] == [
        "plan.shots[1].first_frame.uri",
        "plan.shots[2].first_frame.data",
    ]
    del plan.shots[1:]
    plan.shots.add(
        prompt="d", duration_seconds=4, first_frame=render_pb2.Image(uri="https://internal.example.com/a.png")
    )
    assert shot_violations(plan.shots, "plan.shots", 30, POLICY) == []
    with pytest.raises(InvalidArgument) as raised:
        await check_shot_hosts(plan.shots, "plan.shots", resolver("10.1.1.1"))
    assert [field for field, _ in raised.value.violations] == ["plan.shots[1].first_frame.uri"]


def test_shots_are_checked_one_by_one_and_in_all():
    shots = [
        render_pb2.Shot(prompt=" ", duration_seconds=8),
        render_pb2.Shot(prompt="b", duration_seconds=float("nan")),
        render_pb2.Shot(prompt="c", duration_seconds=-1, aspect_ratio=99),
        render_pb2.Shot(prompt="d", duration_seconds=25),
    ]
    assert shot_violations(shots, "spec.shots", 30, POLICY) == [
        ("spec.shots[0].prompt", "must hold 1 to 2000 characters"),
        ("spec.shots[1].duration_seconds", "must be a positive number of seconds"),
        ("spec.shots[2].duration_seconds", "must be a positive number of seconds"),
        ("spec.shots[2].aspect_ratio", "unknown aspect ratio 99"),
        ("spec.shots", "must last at most 30 s in all, not 33 s"),
    ]


@pytest.mark.parametrize(
    ("seconds", "why"),
    [
        (-1, "must be a positive number of seconds, not -1"),
        (float("inf"), "must be a positive number of seconds, not inf"),
        (31, "must be at most 30 s for preset quick_social, not 31"),
    ],
)
def test_a_bad_duration_says_what_is_wrong_with_it(seconds, why):
    with pytest.raises(InvalidArgument) as raised:
        normalized_spec(render_pb2.RenderSpec(prompt="a", duration_seconds=seconds), POLICY)
    assert raised.value.violations == [("spec.duration_seconds", why)]


def test_a_requests_own_shots_must_add_up_to_its_duration():
    shots = [render_pb2.Shot(prompt="a", duration_seconds=8), render_pb2.Shot(prompt="b", duration_seconds=6)]
    normalized, _ = normalized_spec(render_pb2.RenderSpec(prompt="film", shots=shots), POLICY)
    assert normalized.duration_seconds == 14
    with pytest.raises(InvalidArgument) as raised:
        normalized_spec(render_pb2.RenderSpec(prompt="film", duration_seconds=20, shots=shots), POLICY)
    assert raised.value.violations == [
        ("spec.shots", "must add up to spec.duration_seconds (20 s), not 14 s")
    ]


@pytest.mark.parametrize("cursor", ["9" * 30, str(2**63), "²", "-1", ""])
def test_a_forged_page_token_is_refused_not_a_database_error(cursor):
    raw = f"{validation._PAGE_TOKEN_PREFIX}{cursor}:"
    token = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    with pytest.raises(InvalidArgument) as refused:
        list_query(gateway_pb2.ListRenderJobsRequest(page_token=token))
    assert [field for field, _ in refused.value.violations] == ["page_token"]


def test_the_largest_cursor_a_store_holds_is_a_valid_page_token():
    token = page_token(2**63 - 1, [])
    assert list_query(gateway_pb2.ListRenderJobsRequest(page_token=token))[2] == 2**63 - 1


# Reference images: at most MAX_REFERENCE_IMAGES, each held to a first frame's rules.


def test_reference_images_are_counted_and_each_checked_like_a_first_frame():
    png = render_pb2.Image(data=png_bytes(), mime_type="image/png")
    references = [
        png,
        render_pb2.Image(data=b"x", uri="https://images.example.com/a.png"),
        render_pb2.Image(data=b"x" * (MAX_FIRST_FRAME_BYTES + 1)),
        render_pb2.Image(uri="file:///etc/passwd"),
        render_pb2.Image(mime_type="image/png"),
    ]
    assert len(references) > MAX_REFERENCE_IMAGES
    with pytest.raises(InvalidArgument) as raised:
        normalized_spec(render_pb2.RenderSpec(prompt="A kite", reference_images=references), POLICY)
    assert raised.value.violations == [
        ("spec.reference_images", "must hold at most 3 images, not 5"),
        ("spec.reference_images[1]", "give data or uri, not both"),
        (
            "spec.reference_images[2].data",
            f"must be at most {MAX_FIRST_FRAME_BYTES} bytes, not {MAX_FIRST_FRAME_BYTES + 1}",
        ),
        (
            "spec.reference_images[3].uri",
            "file:// reference images are not accepted here; send the image inline or by https://",
        ),
        ("spec.reference_images[4]", "give data or uri"),
    ]
    good = [png, render_pb2.Image(uri="gs://frames-ok/b.png"), render_pb2.Image(uri="https://8.8.8.8/c.png")]
    normalized, _ = normalized_spec(render_pb2.RenderSpec(prompt="A kite", reference_images=good), POLICY)
    assert list(normalized.reference_images) == good
    shots = [
        render_pb2.Shot(prompt="a", duration_seconds=8, reference_images=good),
        render_pb2.Shot(
            prompt="b", duration_seconds=8, reference_images=[png, render_pb2.Image(uri="gs://x/y.png")]
        ),
    ]
    assert shot_violations(shots, "spec.shots", 30, POLICY) == [
        (
            "spec.shots[1].reference_images[1].uri",
            "bucket 'x' is not one this gateway takes reference images from (frames-ok)",
        )
    ]


async def test_reference_image_hosts_are_resolved_like_a_first_frames():
    private = render_pb2.Image(uri="https://internal.example.com/face.png")
    with pytest.raises(InvalidArgument) as raised:
        await checked_spec(
            render_pb2.RenderSpec(
                prompt="A kite", reference_images=[render_pb2.Image(data=png_bytes()), private]
            ),
            POLICY,
            resolver("10.0.0.7"),
        )
    assert [field for field, _ in raised.value.violations] == ["spec.reference_images[1].uri"]
    shots = [render_pb2.Shot(prompt="a", duration_seconds=4, reference_images=[private])]
    with pytest.raises(InvalidArgument) as raised:
        await check_shot_hosts(shots, "plan.shots", resolver("127.0.0.1"))
    assert [field for field, _ in raised.value.violations] == ["plan.shots[0].reference_images[0].uri"]


@pytest.mark.parametrize(
    "deadline",
    [
        timestamp_pb2.Timestamp(seconds=253_402_300_800),
        timestamp_pb2.Timestamp(seconds=-62_135_596_801),
        timestamp_pb2.Timestamp(seconds=0, nanos=-1),
        timestamp_pb2.Timestamp(seconds=0, nanos=1_000_000_000),
    ],
)
def test_a_deadline_outside_the_timestamp_range_is_refused_at_the_edge(deadline):
    spec = render_pb2.RenderSpec(prompt="a", constraints=render_pb2.RenderConstraints(deadline=deadline))
    with pytest.raises(InvalidArgument) as refused:
        normalized_spec(spec, POLICY)
    assert [field for field, _ in refused.value.violations] == ["spec.constraints.deadline"]


def test_an_unknown_preset_is_echoed_cut_short():
    with pytest.raises(InvalidArgument) as refused:
        normalized_spec(render_pb2.RenderSpec(prompt="a", preset="x" * 100_000), POLICY)
    ((field, why),) = refused.value.violations
    assert field == "spec.preset" and len(why) < 300, why
