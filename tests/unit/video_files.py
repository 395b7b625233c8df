"""Small H.264 MP4s made frame by frame, for the tests of what reads videos (QC, stitching)."""

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from aiprod_renderers.local import synth


def encode(
    path: Path, frames: Sequence[np.ndarray], rate: int = 24, options: dict[str, str] = synth.X264_OPTIONS
) -> Path:
    """Writes the (height, width, 3) RGB frames as a yuv420p H.264 MP4 at `rate`, one frame per tick."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate, options=options)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for number, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = number, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
