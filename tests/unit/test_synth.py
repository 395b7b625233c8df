"""The local renderer's synthesis, checked by the kit's QC, without a service around them."""

import threading
from pathlib import Path

import numpy as np
import pytest

from aiprod.common.v1 import render_pb2
from aiprod_kit.rendering import qc
from aiprod_renderers.local import synth

PROMPT = "A paper boat sails down a rainy street"


def _frames(prompt: str, seed: int, count: int = 6) -> list[np.ndarray]:
    return list(synth.render_frames(prompt, seed, 1280, 720, count))


def test_same_prompt_and_seed_same_frames() -> None:
    first, second = _frames(PROMPT, 7), _frames(PROMPT, 7)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second, strict=True))
    assert first[0].shape == (720, 1280, 3) and first[0].dtype == np.uint8
    # The picture moves from frame to frame.
    assert first[0].tobytes() != first[-1].tobytes()


def test_different_prompt_or_seed_different_frames() -> None:
    reference = _frames(PROMPT, 7, count=1)[0]
    assert _frames(PROMPT + "!", 7, count=1)[0].tobytes() != reference.tobytes()
    assert _frames(PROMPT, 8, count=1)[0].tobytes() != reference.tobytes()


def test_seed_zero_comes_from_the_prompt() -> None:
    assert synth.scene_seed(PROMPT, 0) == synth.scene_seed(PROMPT, 0) != synth.scene_seed(PROMPT + "!", 0)
    assert synth.scene_seed(PROMPT, 5) == 5
    assert _frames(PROMPT, 0, count=1)[0].tobytes() == _frames(PROMPT, 0, count=1)[0].tobytes()


@pytest.mark.parametrize(
    ("aspect", "size"),
    [
        (render_pb2.ASPECT_RATIO_UNSPECIFIED, (1280, 720)),
        (render_pb2.ASPECT_RATIO_16_9, (1280, 720)),
        (render_pb2.ASPECT_RATIO_9_16, (720, 1280)),
        (render_pb2.ASPECT_RATIO_1_1, (960, 960)),
    ],
)
def test_frame_size(aspect: int, size: tuple[int, int]) -> None:
    assert synth.frame_size(aspect) == size


def test_long_prompt_fits() -> None:
    width, height = synth.frame_size(render_pb2.ASPECT_RATIO_9_16)
    frame = next(synth.render_frames("word " * 400 + "x" * 300, 1, width, height, 1))
    assert frame.shape == (height, width, 3)


def test_encode_to_the_frame(tmp_path: Path) -> None:
    progress: list[float] = []
    path = tmp_path / "clip.mp4"
    # 1.52 s is 36.48 frames: rounded to 36.
    info = synth.encode_video(path, PROMPT, 3, 1.52, 960, 960, on_progress=progress.append)
    assert (info.frame_count, info.width, info.height, info.frame_rate) == (36, 960, 960, 24)
    assert info.duration_seconds == 1.5
    assert progress == sorted(progress) and len(progress) == 36 and progress[-1] == 1.0
    found = qc.probe(path)
    assert (found.frame_count, found.width, found.height, found.frame_rate) == (36, 960, 960, 24.0)
    assert found.black_frames == 0
    report = qc.report(found, duration_seconds=1.52, width=960, height=960, frame_rate=24)
    assert report.score == 1.0
    # The same report against a request the file does not meet scores lower.
    assert qc.report(found, duration_seconds=1.52, width=1280, height=720, frame_rate=24).score < 1.0


def test_cancel_between_frames(tmp_path: Path) -> None:
    cancel = threading.Event()
    seen: list[float] = []

    def on_progress(fraction: float) -> None:
        seen.append(fraction)
        if len(seen) == 3:
            cancel.set()

    with pytest.raises(synth.RenderCancelled):
        synth.encode_video(
            tmp_path / "clip.mp4", PROMPT, 3, 5, 1280, 720, on_progress=on_progress, cancel=cancel
        )
    assert len(seen) == 3
