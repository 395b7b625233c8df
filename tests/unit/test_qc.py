"""Technical QC of tiny videos made on the spot: good, black, frozen, the wrong size, length or rate, broken."""

from pathlib import Path

import av
import numpy as np
import pytest
from video_files import encode

from aiprod.common.v1 import render_pb2
from aiprod_kit.rendering import qc
from aiprod_renderers.local import synth

WIDTH, HEIGHT = 320, 180


def _scores(report: render_pb2.QcReport) -> dict[str, float]:
    return {check.name: check.score for check in report.checks}


def _moving(count: int, width: int = WIDTH, height: int = HEIGHT) -> list[np.ndarray]:
    return list(synth.render_frames("A kite over the dunes", 5, width, height, count))


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qc") / "good.mp4"
    synth.encode_video(path, "A kite over the dunes", 5, 2.0, WIDTH, HEIGHT)
    return path


def test_good_video_passes(good: Path) -> None:
    report = qc.check_video(good, duration_seconds=2.0, width=WIDTH, height=HEIGHT)
    assert report.score >= 0.95
    assert set(_scores(report)) == {"duration", "resolution", "frame_rate", "black_frames", "frozen_frames"}
    found = qc.probe(good)
    assert (found.width, found.height, found.frame_rate, found.frame_count) == (WIDTH, HEIGHT, 24.0, 48)
    assert found.duration_seconds == 2.0


def test_black_video(tmp_path: Path) -> None:
    path = encode(tmp_path / "black.mp4", [np.zeros((HEIGHT, WIDTH, 3), np.uint8)] * 48)
    report = qc.check_video(path, duration_seconds=2.0, width=WIDTH, height=HEIGHT)
    assert _scores(report)["black_frames"] == 0.0
    assert report.score < 0.95


def test_black_middle_only(tmp_path: Path) -> None:
    frames = _moving(48)
    frames[12:36] = [np.zeros((HEIGHT, WIDTH, 3), np.uint8)] * 24
    report = qc.check_video(
        encode(tmp_path / "gap.mp4", frames), duration_seconds=2.0, width=WIDTH, height=HEIGHT
    )
    assert 0.0 < _scores(report)["black_frames"] < 1.0


@pytest.mark.parametrize("noise", [0, 3], ids=["identical", "nearly-identical"])
def test_frozen_video(tmp_path: Path, noise: int) -> None:
    still = _moving(1)[0].astype(np.int16)
    rng = np.random.default_rng(0)
    frames = [
        np.clip(still + rng.integers(-noise, noise + 1, still.shape), 0, 255).astype(np.uint8)
        for _ in range(48)
    ]
    report = qc.check_video(
        encode(tmp_path / "frozen.mp4", frames), duration_seconds=2.0, width=WIDTH, height=HEIGHT
    )
    scores = _scores(report)
    assert scores["frozen_frames"] == 0.0
    assert scores["black_frames"] == 1.0
    assert report.score < 0.95


def test_wrong_duration(good: Path) -> None:
    asked_double = qc.check_video(good, duration_seconds=4.0, width=WIDTH, height=HEIGHT)
    assert _scores(asked_double)["duration"] == pytest.approx(0.5)
    # A little off scores better than far off; within half a frame is exact.
    assert _scores(qc.check_video(good, duration_seconds=2.2, width=WIDTH, height=HEIGHT))["duration"] > 0.5
    assert _scores(qc.check_video(good, duration_seconds=2.02, width=WIDTH, height=HEIGHT))["duration"] == 1.0


def test_resolution(good: Path, tmp_path: Path) -> None:
    def resolution(path: Path, width: int, height: int, exact_size: bool = True) -> float:
        report = qc.check_video(path, duration_seconds=2.0, width=width, height=height, exact_size=exact_size)
        return _scores(report)["resolution"]

    # Providers deliver any size of the asked ratio: 320x180 is fine for a 1920x1080 request...
    assert resolution(good, 1920, 1080, exact_size=False) == 1.0
    # ...but not where the exact size was asked.
    assert resolution(good, 1920, 1080) == 0.5
    # Right orientation, wrong ratio; wrong orientation.
    assert resolution(good, 640, 480, exact_size=False) == 0.25
    assert resolution(good, 1080, 1920, exact_size=False) == 0.0
    # Sizes snapped to multiples of 16 still count as the ratio.
    snapped = encode(tmp_path / "snapped.mp4", _moving(48, 832, 480))
    assert resolution(snapped, 1280, 720, exact_size=False) == 1.0


def test_frame_rate(tmp_path: Path) -> None:
    path = encode(tmp_path / "30fps.mp4", _moving(60), rate=30)
    asked_24 = _scores(qc.check_video(path, duration_seconds=2.0, width=WIDTH, height=HEIGHT))
    # A sane rate other than the asked one gets partial credit; the length is still right.
    assert asked_24["frame_rate"] == 0.75
    assert asked_24["duration"] == 1.0
    asked_30 = qc.check_video(path, duration_seconds=2.0, width=WIDTH, height=HEIGHT, frame_rate=30)
    assert _scores(asked_30)["frame_rate"] == 1.0
    assert asked_30.score >= 0.95


def _assert_undecodable(path: Path) -> None:
    report = qc.check_video(path, duration_seconds=2.0, width=WIDTH, height=HEIGHT)
    assert report.score == 0.0
    assert [(check.name, check.score) for check in report.checks] == [("decode", 0.0)]
    assert report.checks[0].detail
    with pytest.raises(qc.DecodeError):
        qc.probe(path)


def test_truncated_video(good: Path, tmp_path: Path) -> None:
    data = good.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    _assert_undecodable(truncated)


def test_corrupt_middle(good: Path, tmp_path: Path) -> None:
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = b"\xff" * 2000
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(data)
    _assert_undecodable(corrupt)


def test_garbage_and_missing(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    _assert_undecodable(garbage)
    _assert_undecodable(tmp_path / "missing.mp4")


def test_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 48000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    _assert_undecodable(path)
