"""The stitcher on tiny videos made on the spot: remuxed when the shots match, re-encoded (fitted to the
film's size, resampled to its frame rate) when they do not, and broken shots named."""

import io
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from video_files import encode

from aiprod_kit.rendering import qc
from aiprod_kit.rendering.stitching import StitchError, last_frame_png, stitch
from aiprod_renderers.local import synth

WIDTH, HEIGHT = 160, 90


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.mean(np.abs(first.astype(np.int16) - second.astype(np.int16))))


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three synth shots of one size: 1 s, 0.5 s and 1 s at 24 fps."""
    directory = tmp_path_factory.mktemp("shots")
    made = []
    for number, (prompt, seconds) in enumerate([("A harbour", 1.0), ("A lighthouse", 0.5), ("A gull", 1.0)]):
        path = directory / f"shot{number}.mp4"
        synth.encode_video(path, prompt, number + 1, seconds, WIDTH, HEIGHT)
        made.append(path)
    return made


@pytest.fixture(scope="module")
def portrait(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("portrait") / "portrait.mp4"
    synth.encode_video(path, "A tall tower", 9, 0.5, HEIGHT, WIDTH)
    return path


@pytest.fixture(scope="module")
def thirty_fps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s at 30 fps, made with PyAV directly (synth only makes 24 fps)."""
    frames = list(synth.render_frames("A fast train", 4, WIDTH, HEIGHT, 60))
    return encode(tmp_path_factory.mktemp("rate") / "thirty.mp4", frames, 30, synth.X264_OPTIONS)


def test_same_shots_are_remuxed_frame_for_frame(shots: list[Path], tmp_path: Path) -> None:
    output = tmp_path / "film.mp4"
    film = stitch(shots, output, width=WIDTH, height=HEIGHT)
    assert film.remuxed
    assert film.shot_frames == (24, 12, 24)
    assert film.frame_count == 60 and film.duration_seconds == 2.5
    found = qc.probe(output)
    assert (found.width, found.height, found.frame_rate, found.frame_count) == (WIDTH, HEIGHT, 24.0, 60)
    assert found.duration_seconds == 2.5
    # Copied packets decode to the very pictures of the shots, each shot right after the one before.
    inputs = [frame for shot in shots for frame in _frames(shot)]
    outputs = _frames(output)
    assert len(outputs) == len(inputs)
    assert _difference(outputs[24 + 6], inputs[24 + 6]) < 1.0  # the middle of shot 2
    assert all(np.array_equal(out, expected) for out, expected in zip(outputs, inputs, strict=True))


def test_single_shot(shots: list[Path], tmp_path: Path) -> None:
    output = tmp_path / "film.mp4"
    film = stitch(shots[1:2], output, width=WIDTH, height=HEIGHT)
    assert film.remuxed and film.shot_frames == (12,)
    assert qc.probe(output).frame_count == 12
    assert all(np.array_equal(a, b) for a, b in zip(_frames(output), _frames(shots[1]), strict=True))


def test_mixed_sizes_are_fitted_with_black_bars(shots: list[Path], portrait: Path, tmp_path: Path) -> None:
    output = tmp_path / "film.mp4"
    film = stitch([shots[1], portrait], output, width=WIDTH, height=HEIGHT)
    assert not film.remuxed
    assert film.shot_frames == (12, 12)
    found = qc.probe(output)
    assert (found.width, found.height, found.frame_rate, found.frame_count) == (WIDTH, HEIGHT, 24.0, 24)
    outputs = _frames(output)
    # The landscape shot fills the frame, re-encoded but the same picture.
    assert _difference(outputs[6], _frames(shots[1])[6]) < 4.0
    # The portrait one is 90x160 scaled to 50x90 and centred (at x 54, even for the chroma): black
    # columns at both sides.
    pillarboxed = outputs[12 + 6]
    assert pillarboxed[:, :50].max() <= 24 and pillarboxed[:, 112:].max() <= 24
    centre = pillarboxed[:, 58:104]
    assert centre.mean() > 40
    expected = np.asarray(
        Image.fromarray(_frames(portrait)[6]).resize((50, 90), Image.Resampling.BICUBIC), dtype=np.uint8
    )
    assert _difference(pillarboxed[:, 54:104], expected) < 6.0


def test_another_frame_rate_is_resampled_by_timestamp(
    shots: list[Path], thirty_fps: Path, tmp_path: Path
) -> None:
    output = tmp_path / "film.mp4"
    # 0.9 s at 30 fps is 21.6 frames at 24: rounded to 22.
    short = encode(tmp_path / "short.mp4", _frames(thirty_fps)[:27], 30, synth.X264_OPTIONS)
    film = stitch([thirty_fps, short, shots[1]], output, width=WIDTH, height=HEIGHT)
    assert not film.remuxed
    assert film.shot_frames == (48, 22, 12)
    found = qc.probe(output)
    assert (found.frame_rate, found.frame_count) == (24.0, 82)
    # The film lasts the shots' total within one frame per shot.
    assert abs(found.duration_seconds - (2.0 + 0.9 + 0.5)) <= 3 / 24
    # Output frame 10 (its slot's middle at 10.5 / 24 s) shows the 30 fps frame on screen then: 13.
    source, outputs = _frames(thirty_fps), _frames(output)
    assert _difference(outputs[10], source[13]) < _difference(outputs[10], source[10])
    assert _difference(outputs[10], source[13]) < _difference(outputs[10], source[15])


@pytest.mark.parametrize("case", ["other_film_size", "other_frame_rate", "other_encoder_settings"])
def test_not_remuxed_unless_everything_matches(shots: list[Path], tmp_path: Path, case: str) -> None:
    output = tmp_path / "film.mp4"
    width, height, frame_rate = WIDTH, HEIGHT, 24
    inputs = shots[1:2]
    if case == "other_film_size":
        width, height = 2 * WIDTH, 2 * HEIGHT
    elif case == "other_frame_rate":
        frame_rate = 12
    else:
        # Same size and rate, but another crf: another PPS in the avcC, which one decoder cannot share.
        inputs = [shots[1], encode(tmp_path / "crf.mp4", _frames(shots[1]), 24, {"crf": "30"})]
    film = stitch(inputs, output, width=width, height=height, frame_rate=frame_rate)
    assert not film.remuxed
    found = qc.probe(output)
    assert (found.width, found.height, found.frame_rate) == (width, height, frame_rate)
    assert found.frame_count == film.frame_count == round(0.5 * frame_rate) * len(inputs)


def test_broken_shot_is_named_and_no_output_left(shots: list[Path], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    data = shots[0].read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    output = tmp_path / "film.mp4"
    for broken in (garbage, truncated):
        with pytest.raises(StitchError, match=r"shot 1 \(") as raised:
            stitch([shots[1], broken, shots[2]], output, width=WIDTH, height=HEIGHT)
        assert raised.value.shot == 1
        assert not output.exists()
    # The re-encoding path names it too (the film's size rules out remuxing).
    with pytest.raises(StitchError, match="shot 2") as raised:
        stitch([shots[1], shots[2], truncated], output, width=2 * WIDTH, height=2 * HEIGHT)
    assert raised.value.shot == 2
    assert not output.exists()


def test_no_shots(tmp_path: Path) -> None:
    output = tmp_path / "film.mp4"
    with pytest.raises(StitchError, match="no shots"):
        stitch([], output, width=WIDTH, height=HEIGHT)
    assert not output.exists()


def test_last_frame_png(shots: list[Path], tmp_path: Path) -> None:
    film = tmp_path / "film.mp4"
    stitch(shots, film, width=WIDTH, height=HEIGHT)
    # The film has a keyframe at each shot's start: the seek lands in shot 3.
    for video in (shots[0], film):
        image = Image.open(io.BytesIO(last_frame_png(video)))
        assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
        last = _frames(video)[-1]
        assert _difference(np.asarray(image.convert("RGB")), last) < 1.0
        assert _difference(np.asarray(image.convert("RGB")), _frames(video)[-12]) > 1.0
    with pytest.raises(StitchError):
        last_frame_png(tmp_path / "missing.mp4")
