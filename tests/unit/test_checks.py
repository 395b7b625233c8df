"""The shared checks of a caller's fields (aiprod_kit.checks): what each lets through, what it refuses
and how the refusal reads, for the hostile values the services meet (NaN, infinities, unknown enum
values, times outside protobuf's range, very long strings)."""

import math

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from aiprod.common.v1 import backend_pb2, job_pb2, render_pb2
from aiprod_kit.capabilities import MAX_INLINE_IMAGE_BYTES
from aiprod_kit.checks import (
    ECHO_CHARACTERS,
    MAX_DURATION_SECONDS,
    MAX_MIME_TYPE_CHARACTERS,
    MAX_PROMPT_CHARACTERS,
    MAX_SHOT_SECONDS,
    MAX_TASK_ID_CHARACTERS,
    MAX_TIMESTAMP_SECONDS,
    MIN_TIMESTAMP_SECONDS,
    bounded_string,
    echo,
    finite_number,
    image_violations,
    known_enum,
    shot_violations,
    task_id_violations,
    valid_duration,
    valid_timestamp,
)


def fields(violations: list[tuple[str, str]]) -> list[str]:
    return [field for field, _ in violations]


def test_echo_quotes_a_short_value_whole_and_a_long_one_by_its_prefix():
    assert echo("veo-3") == "'veo-3'"
    exactly = "k" * ECHO_CHARACTERS
    assert echo(exactly) == repr(exactly)
    long = "k" * 100_000
    assert echo(long) == repr("k" * ECHO_CHARACTERS) + "..."
    assert echo(long, 8) == "'kkkkkkkk'..."
    # Control characters are escaped, not sent raw into a message or a log line.
    assert echo("a\nb") == "'a\\nb'"


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_finite_number_takes_a_number_in_range(value):
    assert finite_number(value, "floor", 0, 1) == []


@pytest.mark.parametrize(
    ("value", "low", "high", "reason"),
    [
        (math.nan, 0, 1, "must be a finite number between 0 and 1, not nan"),
        (math.inf, 0, 1, "must be a finite number between 0 and 1, not inf"),
        (-math.inf, -math.inf, math.inf, "must be a finite number, not -inf"),
        (1.5, 0, 1, "must be a finite number between 0 and 1, not 1.5"),
        (-1, 0, math.inf, "must be a finite number of at least 0, not -1"),
        (7, -math.inf, 5, "must be a finite number of at most 5, not 7"),
    ],
)
def test_finite_number_refuses_nan_infinities_and_values_out_of_range(value, low, high, reason):
    assert finite_number(value, "floor", low, high) == [("floor", reason)]


def test_known_enum_takes_what_the_descriptor_knows():
    for value in render_pb2.AspectRatio.values():
        assert known_enum(value, render_pb2.AspectRatio, "aspect_ratio") == []
    assert known_enum(backend_pb2.BACKEND_VEO, backend_pb2.Backend, "backend") == []


def test_known_enum_refuses_an_unknown_value_and_when_asked_the_unspecified_one():
    assert known_enum(99, render_pb2.AspectRatio, "shot.aspect_ratio") == [
        ("shot.aspect_ratio", "unknown AspectRatio value 99")
    ]
    assert known_enum(-1, backend_pb2.Backend, "backend") == [("backend", "unknown Backend value -1")]
    assert known_enum(0, job_pb2.JobState, "state", allow_unspecified=False) == [
        ("state", "must be set (a JobState other than JOB_STATE_UNSPECIFIED)")
    ]
    assert known_enum(0, job_pb2.JobState, "state") == []


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (MIN_TIMESTAMP_SECONDS, 0),
        (0, 0),
        (1_700_000_000, 999_999_999),
        (MAX_TIMESTAMP_SECONDS, 999_999_999),
    ],
)
def test_valid_timestamp_takes_protobufs_whole_range(seconds, nanos):
    assert valid_timestamp(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos), "time") == []


@pytest.mark.parametrize(
    ("seconds", "nanos", "reason"),
    [
        (-70_000_000_000, 0, "must be a time between the years 1 and 9999 (RFC 3339)"),
        (MIN_TIMESTAMP_SECONDS - 1, 0, "must be a time between the years 1 and 9999 (RFC 3339)"),
        (MAX_TIMESTAMP_SECONDS + 1, 0, "must be a time between the years 1 and 9999 (RFC 3339)"),
        (0, -1, "nanos must be 0 to 999999999, not -1"),
        (0, 1_000_000_000, "nanos must be 0 to 999999999, not 1000000000"),
    ],
)
def test_valid_timestamp_refuses_times_before_year_1_after_9999_or_with_bad_nanos(seconds, nanos, reason):
    assert valid_timestamp(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos), "time") == [
        ("time", reason)
    ]


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, 0), (5, 500_000_000), (-5, -500_000_000), (MAX_DURATION_SECONDS, 0), (-MAX_DURATION_SECONDS, 0)],
)
def test_valid_duration_takes_protobufs_whole_range(seconds, nanos):
    assert valid_duration(duration_pb2.Duration(seconds=seconds, nanos=nanos), "took") == []


@pytest.mark.parametrize(
    ("seconds", "nanos", "reason"),
    [
        (MAX_DURATION_SECONDS + 1, 0, "seconds must be within ±315576000000"),
        (-(10**12), 0, "seconds must be within ±315576000000"),
        (1, -1, "nanos must be within a second and of the seconds' sign"),
        (-1, 1, "nanos must be within a second and of the seconds' sign"),
        (0, 1_000_000_000, "nanos must be within a second and of the seconds' sign"),
    ],
)
def test_valid_duration_refuses_what_protobuf_does(seconds, nanos, reason):
    assert valid_duration(duration_pb2.Duration(seconds=seconds, nanos=nanos), "took") == [("took", reason)]


def test_valid_duration_holds_a_duration_to_given_bounds():
    half = duration_pb2.Duration(seconds=0, nanos=500_000_000)
    assert valid_duration(half, "took", 0, 1) == []
    assert valid_duration(duration_pb2.Duration(seconds=-1), "took", 0) == [
        ("took", "must be a number of seconds of at least 0, not -1")
    ]


def test_bounded_string():
    assert bounded_string("", "name", 5) == []
    assert bounded_string("abcde", "name", 5) == []
    assert bounded_string("k" * 100_000, "name", 5) == [("name", "must be at most 5 characters, not 100000")]
    assert bounded_string("  ", "name", 5, required=True) == [("name", "must not be empty")]
    # Characters, not bytes.
    assert bounded_string("é" * 5, "name", 5) == []


def test_task_id_violations():
    assert task_id_violations("local_0") == []
    assert task_id_violations("t" * MAX_TASK_ID_CHARACTERS) == []
    assert task_id_violations("") == [("task_id", "must not be empty")]
    assert fields(task_id_violations("t" * 100_000, "handle.task_id")) == ["handle.task_id"]


def test_image_violations():
    assert image_violations(render_pb2.Image(), "first_frame") == []
    assert image_violations(render_pb2.Image(data=b"\x89PNG", mime_type="image/png"), "first_frame") == []
    assert image_violations(render_pb2.Image(uri="gs://bucket/a.png"), "first_frame") == []
    assert image_violations(render_pb2.Image(data=b"x", uri="gs://b/a.png"), "first_frame") == [
        ("first_frame", "give data or uri, not both")
    ]
    assert image_violations(render_pb2.Image(), "reference_images[0]", required=True) == [
        ("reference_images[0]", "give data or uri")
    ]
    too_long = render_pb2.Image(data=b"x", mime_type="m" * (MAX_MIME_TYPE_CHARACTERS + 1), uri="")
    assert fields(image_violations(too_long, "first_frame")) == ["first_frame.mime_type"]
    assert fields(image_violations(render_pb2.Image(uri="https://x/" + "a" * 5000), "ff")) == ["ff.uri"]
    too_large = render_pb2.Image(data=b"\0" * (MAX_INLINE_IMAGE_BYTES + 1))
    assert fields(image_violations(too_large, "ff")) == ["ff.data"]


def a_shot(**changes: object) -> render_pb2.Shot:
    return render_pb2.Shot(**{"prompt": "A paper boat on a pond", "duration_seconds": 5, **changes})


def test_a_well_formed_shot_passes():
    assert shot_violations(a_shot()) == []
    assert (
        shot_violations(a_shot(duration_seconds=MAX_SHOT_SECONDS, aspect_ratio=render_pb2.ASPECT_RATIO_1_1))
        == []
    )
    assert shot_violations(a_shot(reference_images=[render_pb2.Image(uri="gs://b/face.png")])) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prompt": "   "}, "shot.prompt"),
        ({"prompt": "p" * (MAX_PROMPT_CHARACTERS + 1)}, "shot.prompt"),
        ({"duration_seconds": 0}, "shot.duration_seconds"),
        ({"duration_seconds": -1}, "shot.duration_seconds"),
        ({"duration_seconds": math.nan}, "shot.duration_seconds"),
        ({"duration_seconds": math.inf}, "shot.duration_seconds"),
        ({"duration_seconds": 1e300}, "shot.duration_seconds"),
        ({"aspect_ratio": 99}, "shot.aspect_ratio"),
        ({"first_frame": render_pb2.Image(data=b"x", uri="gs://b/a.png")}, "shot.first_frame"),
        ({"first_frame": render_pb2.Image(data=b"x", mime_type="m" * 1000)}, "shot.first_frame.mime_type"),
        (
            {"reference_images": [render_pb2.Image(uri="gs://b/a.png"), render_pb2.Image()]},
            "shot.reference_images[1]",
        ),
    ],
)
def test_a_misshapen_shot_names_its_field(changes, field):
    assert fields(shot_violations(a_shot(**changes))) == [field]


def test_shot_violations_name_fields_under_the_given_prefix_and_report_every_problem():
    bad = a_shot(prompt="", duration_seconds=math.nan, aspect_ratio=42)
    assert fields(shot_violations(bad, "spec.shots[3]")) == [
        "spec.shots[3].prompt",
        "spec.shots[3].duration_seconds",
        "spec.shots[3].aspect_ratio",
    ]
    # A reason never repeats a long prompt.
    [(_, reason)] = shot_violations(a_shot(prompt="p" * 100_000))
    assert len(reason) < 100
