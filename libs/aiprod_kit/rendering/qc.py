"""Technical quality control of a finished video: decode it all and measure it against the request.

It checks what the file is, not what it shows: a broken or truncated encode, a wrong length, size or
frame rate, black frames or a frozen picture are caught; an ugly picture is not. Every frame is
decoded (a broken one anywhere fails the file), but only a sample of frames, a few a second shrunk to
a small grey image, is analysed, so that checking costs little more than decoding.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from aiprod.common.v1 import render_pb2

# Frames analysed per second of video, for the black and frozen checks.
_SAMPLES_PER_SECOND = 2
# Width of the grey image a sampled frame is shrunk to (area averaging also evens out codec noise).
_SAMPLE_WIDTH = 320
# A pixel brighter than this (0..255; video-range black is 16) is lit; a frame with almost no lit
# pixels is black, so a dark scene with a lamp in it is not.
_LIT_LUMA = 32
_BLACK_MAX_LIT_SHARE = 0.01
# A pixel that changed by more than this between two samples moved; two samples with almost no moved
# pixels show a frozen picture.
_CHANGE_LUMA = 8
_FROZEN_MAX_CHANGED_SHARE = 0.001
# Frame rates off by less than this share count as the asked one (23.976 for 24, 29.97 for 30).
_FRAME_RATE_TOLERANCE = 0.002
# Rates in this range play smoothly enough to be usable when another one was asked: partial credit.
_SANE_FRAME_RATES = (15.0, 61.0)
_OTHER_FRAME_RATE_SCORE = 0.75
# Aspect ratios off by less than this share count as the asked one: models snap sizes to multiples
# of 16 or 32 (832x480 for 16:9).
_ASPECT_TOLERANCE = 0.03
# A picture of the right orientation but another ratio (4:3 for 16:9) is usable, if poorly framed.
_SAME_ORIENTATION_SCORE = 0.25
# An exact size was asked and another one of the right ratio came.
_OTHER_SIZE_SCORE = 0.5


class DecodeError(Exception):
    """The file could not be opened or decoded to the end."""


@dataclass(frozen=True)
class Probe:
    """What decoding a video found."""

    width: int
    height: int
    frame_rate: float
    frame_count: int
    # Frames analysed, how many of them were black, and how many showed the same picture as the
    # sampled frame before them.
    sampled_frames: int
    black_frames: int
    frozen_frames: int

    @property
    def duration_seconds(self) -> float:
        return self.frame_count / self.frame_rate if self.frame_rate else 0.0


def _sample_size(width: int, height: int) -> tuple[int, int]:
    if width <= _SAMPLE_WIDTH:
        return width, height
    return _SAMPLE_WIDTH, max(2, round(height * _SAMPLE_WIDTH / width))


def probe(path: Path) -> Probe:
    """Decodes every frame of the video at `path`. Blocking; raises DecodeError on a broken file."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DecodeError("the file has no video stream")
            stream = container.streams.video[0]
            # One thread: decodes already run side by side, one a core (qc_concurrency), and FFmpeg's
            # frame threads on top cost 17% more CPU a decode (0.213 -> 0.177 CPU-s for 8 s of 720p).
            stream.thread_count = 1
            frame_rate = float(stream.average_rate or stream.guessed_rate or 0)
            sample_every = max(1, round(frame_rate / _SAMPLES_PER_SECOND))
            # Sizes come from the first frame; samples keep its size so that they compare even if the
            # stream's size changes.
            width = height = sample_width = sample_height = 0
            count = sampled = black = frozen = 0
            previous: np.ndarray | None = None
            for frame in container.decode(stream):
                if count == 0:
                    width, height = frame.width, frame.height
                    sample_width, sample_height = _sample_size(width, height)
                if count % sample_every == 0:
                    luma = frame.to_ndarray(
                        width=sample_width, height=sample_height, format="gray", interpolation="AREA"
                    ).astype(np.int16)
                    sampled += 1
                    black += int(np.count_nonzero(luma > _LIT_LUMA) <= _BLACK_MAX_LIT_SHARE * luma.size)
                    if previous is not None:
                        changed = np.count_nonzero(np.abs(luma - previous) > _CHANGE_LUMA)
                        frozen += int(changed <= _FROZEN_MAX_CHANGED_SHARE * luma.size)
                    previous = luma
                count += 1
            # The container's index tells how many frames there should be (0 where it does not know):
            # a truncated file decodes cleanly but stops short.
            if count < stream.frames:
                raise DecodeError(f"decoded {count} of the {stream.frames} frames the file lists")
    except (av.FFmpegError, OSError) as error:
        raise DecodeError(f"{type(error).__name__}: {error}") from error
    if count == 0:
        raise DecodeError("the video has no frames")
    return Probe(
        width=width,
        height=height,
        frame_rate=frame_rate,
        frame_count=count,
        sampled_frames=sampled,
        black_frames=black,
        frozen_frames=frozen,
    )


def _orientation(width: int, height: int) -> int:
    return (width > height) - (width < height)


def _resolution_score(found: Probe, width: int, height: int, exact_size: bool) -> float:
    found_ratio = found.width / found.height if found.height else 0.0
    if found_ratio and abs(math.log(found_ratio / (width / height))) <= _ASPECT_TOLERANCE:
        return 1.0 if not exact_size or (found.width, found.height) == (width, height) else _OTHER_SIZE_SCORE
    return (
        _SAME_ORIENTATION_SCORE
        if _orientation(found.width, found.height) == _orientation(width, height)
        else 0.0
    )


def _frame_rate_score(found: float, asked: float) -> float:
    if abs(found - asked) <= _FRAME_RATE_TOLERANCE * asked:
        return 1.0
    low, high = _SANE_FRAME_RATES
    return _OTHER_FRAME_RATE_SCORE if low <= found <= high else 0.0


def report(
    found: Probe,
    *,
    duration_seconds: float,
    width: int,
    height: int,
    frame_rate: float = 24.0,
    exact_size: bool = True,
) -> render_pb2.QcReport:
    """Scores what was found against what was asked; the overall score is the checks' mean.

    With exact_size false, any size of the asked aspect ratio passes (providers deliver 720p or 1080p
    for the same request); width and height then only give the ratio.
    """
    duration_error = abs(found.duration_seconds - duration_seconds)
    # Within half a frame is exact: a length can only be met to the nearest whole frame.
    half_frame = 0.5 / (found.frame_rate or frame_rate)
    duration_score = (
        1.0
        if duration_error <= half_frame
        else max(0.0, 1.0 - duration_error / max(duration_seconds, half_frame))
    )
    pairs = found.sampled_frames - 1
    checks = [
        render_pb2.QcCheck(
            name="duration",
            score=duration_score,
            detail=f"{found.frame_count} frames, {found.duration_seconds:.3f} s for {duration_seconds:.3f} s",
        ),
        render_pb2.QcCheck(
            name="resolution",
            score=_resolution_score(found, width, height, exact_size),
            detail=f"{found.width}x{found.height} for {width}x{height} asked"
            + ("" if exact_size else " (any size of that ratio)"),
        ),
        render_pb2.QcCheck(
            name="frame_rate",
            score=_frame_rate_score(found.frame_rate, frame_rate),
            detail=f"{found.frame_rate:g} fps for {frame_rate:g} asked",
        ),
        render_pb2.QcCheck(
            name="black_frames",
            score=1.0 - found.black_frames / found.sampled_frames,
            detail=f"{found.black_frames} of {found.sampled_frames} sampled frames black",
        ),
        render_pb2.QcCheck(
            name="frozen_frames",
            # One sampled frame has nothing to compare with: nothing seen frozen.
            score=1.0 - found.frozen_frames / pairs if pairs else 1.0,
            detail=f"{found.frozen_frames} of {pairs} sampled frames same as the one before",
        ),
    ]
    return render_pb2.QcReport(score=sum(check.score for check in checks) / len(checks), checks=checks)


def check_video(
    path: Path,
    *,
    duration_seconds: float,
    width: int,
    height: int,
    frame_rate: float = 24.0,
    exact_size: bool = True,
) -> render_pb2.QcReport:
    """Decodes the video at `path` and scores it against the request. Blocking; never raises for a
    broken file: that scores 0 with a "decode" check telling why."""
    try:
        found = probe(path)
    except DecodeError as error:
        return render_pb2.QcReport(
            score=0.0, checks=[render_pb2.QcCheck(name="decode", score=0.0, detail=str(error))]
        )
    return report(
        found,
        duration_seconds=duration_seconds,
        width=width,
        height=height,
        frame_rate=frame_rate,
        exact_size=exact_size,
    )
