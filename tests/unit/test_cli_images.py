"""How the CLI reads the images a render starts from or keeps to (`--first-frame`, `--reference-image`)."""

from pathlib import Path

import pytest
import typer

from aiprod_cli.render import image_from
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
