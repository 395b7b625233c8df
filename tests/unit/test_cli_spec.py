"""How the CLI reads a render's options (aiprod_cli.spec): the images it starts from or keeps to
(`--first-frame`, `--reference-image`), its deadline, its shots, and the spec they make."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer

from aiprod.common.v1 import render_pb2
from aiprod_cli.spec import build_spec, deadline_from, image_from, shot_from
from aiprod_kit.capabilities import MAX_INLINE_IMAGE_BYTES


def test_a_file_is_sent_inline_as_its_bytes(tmp_path: Path) -> None:
    frame = tmp_path / "frame.png"
    frame.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)

    image = image_from(str(frame))

    assert (image.data, image.uri, image.mime_type) == (frame.read_bytes(), "", "")


@pytest.mark.parametrize("uri", ["gs://frames/boat.png", "https://images.example.com/boat.png"])
def test_a_uri_is_passed_on_unread(uri: str) -> None:
    image = image_from(uri)

    assert (image.uri, image.data) == (uri, b"")


def test_a_file_over_the_inline_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with big.open("wb") as file:
        file.truncate(MAX_INLINE_IMAGE_BYTES + 1)

    with pytest.raises(
        typer.BadParameter, match=f"at most {MAX_INLINE_IMAGE_BYTES}: give a gs:// or https:// URI"
    ):
        image_from(str(big))


def test_a_folder_or_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(typer.BadParameter, match="is not a file"):
        image_from(str(tmp_path))
    with pytest.raises(typer.BadParameter, match=r"cannot read .*: No such file or directory"):
        image_from(str(tmp_path / "none.png"))


def test_a_deadline_is_a_time_with_its_zone_still_to_come() -> None:
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)

    assert deadline_from(later.strftime("%Y-%m-%dT%H:%M:%SZ")).ToDatetime(UTC) == later
    # Another zone's time is the same moment.
    shifted = (later + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S") + "+01:00"
    assert deadline_from(shifted).ToDatetime(UTC) == later


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("in 30 minutes", "is not an RFC 3339 time"),
        ("30m", "is not an RFC 3339 time"),
        ("2099-01-01T10:00:00", "has no time zone"),
        ("2001-01-01T10:00:00Z", "is already past"),
    ],
)
def test_a_deadline_that_is_no_time_to_come_is_a_usage_error(value: str, why: str) -> None:
    with pytest.raises(typer.BadParameter, match=why):
        deadline_from(value)


def test_the_same_options_make_the_same_spec_and_unset_ones_stay_unset() -> None:
    deadline = deadline_from("2099-01-01T10:00:00Z")
    options = {"duration": 4.0, "quality_floor": 0.8, "deadline": deadline, "seed": 7}

    spec = build_spec("A heron", **options)

    assert spec.SerializeToString(deterministic=True) == build_spec("A heron", **options).SerializeToString(
        deterministic=True
    )
    assert (spec.constraints.quality_floor, spec.constraints.deadline, spec.seed) == (0.8, deadline, 7)
    # Nothing asked: no constraints at all, so that the preset's apply.
    assert not build_spec("A heron").HasField("constraints")


def test_a_shot_is_seconds_then_prompt() -> None:
    assert shot_from("4.5: A heron takes off ") == render_pb2.Shot(
        prompt="A heron takes off", duration_seconds=4.5
    )
    # Only the first colon separates: the prompt may hold more.
    assert shot_from("6:Dusk: the heron lands").prompt == "Dusk: the heron lands"


@pytest.mark.parametrize(
    "value", ["A heron", "four:A heron", "0:A heron", "-2:A heron", "4:", "4:  ", "nan:x", "inf:x"]
)
def test_a_shot_that_is_not_seconds_then_prompt_is_a_usage_error(value: str) -> None:
    with pytest.raises(typer.BadParameter, match="is not SECONDS:PROMPT"):
        shot_from(value)


def test_given_shots_carry_the_first_frame_and_continuity() -> None:
    frame = render_pb2.Image(uri="gs://frames/dawn.png")
    shots = [shot_from("4:Waves at dawn"), shot_from("4:Gulls at noon"), shot_from("2:Sunset")]

    spec = build_spec("A day at the beach", shots=shots, continuous=True, first_frame=frame)

    assert [shot.continuous for shot in spec.shots] == [False, True, True]
    # The gateway keeps a caller's shots as given: the first frame is the first shot's, sent once.
    assert spec.shots[0].first_frame == frame
    assert not spec.HasField("first_frame")
    assert not build_spec("A day at the beach", first_frame=frame).shots
    with pytest.raises(typer.BadParameter, match="needs the shots"):
        build_spec("A day at the beach", continuous=True)
