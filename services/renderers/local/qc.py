"""Technical quality control of a stored video: decode it all and measure it against the request.

It checks what the file is, not what it shows: a broken encode, a wrong length or size, or black
frames are caught; an ugly picture is not.
"""

from dataclasses import dataclass
from pathlib import Path

import av

from aiprod.common.v1 import render_pb2

# A frame whose mean luma is below this (0..255; video range starts at 16) is called black.
_BLACK_LUMA = 20.0


@dataclass(frozen=True)
class Probe:
    """What decoding a video found."""

    width: int
    height: int
    frame_rate: float
    frame_count: int
    # Frames sampled (one a second) for the black-frame check, and how many of them were black.
    sampled_frames: int
    black_frames: int

    @property
    def duration_seconds(self) -> float:
        return self.frame_count / self.frame_rate if self.frame_rate else 0.0


def probe(path: Path) -> Probe:
    """Decodes every frame of the video at `path`. Blocking; raises av.FFmpegError on a broken file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frame_rate = float(stream.average_rate or 0)
        sample_every = max(1, round(frame_rate))
        count = sampled = black = 0
        for frame in container.decode(stream):
            if count % sample_every == 0:
                sampled += 1
                luma = frame.to_ndarray(format="gray")
                black += bool(luma.mean() < _BLACK_LUMA)
            count += 1
        return Probe(
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            frame_rate=frame_rate,
            frame_count=count,
            sampled_frames=sampled,
            black_frames=black,
        )


def report(
    found: Probe, duration_seconds: float, width: int, height: int, frame_rate: float
) -> render_pb2.QcReport:
    """Scores what was found against what was asked; the overall score is the checks' mean."""
    duration_error = abs(found.duration_seconds - duration_seconds)
    # Within half a frame is exact: durations are rounded to whole frames.
    duration_score = (
        1.0 if duration_error <= 0.5 / frame_rate else max(0.0, 1.0 - duration_error / duration_seconds)
    )
    checks = [
        render_pb2.QcCheck(
            name="duration",
            score=duration_score,
            detail=f"{found.frame_count} frames, {found.duration_seconds:.3f} s for {duration_seconds:.3f} s",
        ),
        render_pb2.QcCheck(
            name="resolution",
            score=1.0 if (found.width, found.height) == (width, height) else 0.0,
            detail=f"{found.width}x{found.height} for {width}x{height} asked",
        ),
        render_pb2.QcCheck(
            name="frame_rate",
            score=1.0 if abs(found.frame_rate - frame_rate) < 0.01 else 0.0,
            detail=f"{found.frame_rate:g} fps for {frame_rate:g} asked",
        ),
        render_pb2.QcCheck(
            name="black_frames",
            score=1.0 - found.black_frames / found.sampled_frames if found.sampled_frames else 0.0,
            detail=f"{found.black_frames} of {found.sampled_frames} sampled frames black",
        ),
    ]
    return render_pb2.QcReport(score=sum(check.score for check in checks) / len(checks), checks=checks)
