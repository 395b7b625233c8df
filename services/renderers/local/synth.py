"""Synthetic videos made from a prompt: real H.264 MP4s, deterministic for a prompt and a seed.

Free of gRPC so that other services (the sandbox) can make the same videos. Each frame shows the
prompt's text over a moving colour gradient and a bouncing disc whose colours, speeds and paths
come from the seed, plus a progress bar along the bottom edge so cuts between shots are visible.
"""

import colorsys
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from aiprod.common.v1 import render_pb2
from aiprod_kit.capabilities import FRAME_SIZES_720P

FRAME_RATE = 24
# Fast enough for a 2-core machine, small enough files; crf 23 is x264's own default quality.
X264_OPTIONS = {"preset": "veryfast", "crf": "23"}

# Entries of the cyclic gradient palette: the gradient moves by shifting indices into it.
_PALETTE_SIZE = 1024
_MIN_FONT_SIZE = 14


class RenderCancelled(Exception):
    """The render was cancelled between two frames; nothing usable was written."""


@dataclass(frozen=True)
class VideoInfo:
    """What an encoded video is made of."""

    width: int
    height: int
    frame_rate: int
    frame_count: int

    @property
    def duration_seconds(self) -> float:
        return self.frame_count / self.frame_rate


def frame_size(aspect_ratio: int) -> tuple[int, int]:
    """(width, height) of an aspect ratio at 720p; unspecified means 16:9. KeyError if unknown."""
    return FRAME_SIZES_720P[aspect_ratio or render_pb2.ASPECT_RATIO_16_9]


def frame_count(duration_seconds: float) -> int:
    """The number of frames of a video of that length, to the nearest frame."""
    return round(duration_seconds * FRAME_RATE)


def scene_seed(prompt: str, seed: int) -> int:
    """The seed the scene is drawn with: the given one, or one derived from the prompt when it is 0."""
    if seed:
        return seed
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")


def _hsv(
    rng: np.random.Generator, hue: float, saturation: tuple[float, float], value: tuple[float, float]
) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(*saturation), rng.uniform(*value))
    return np.array([r, g, b]) * 255


def _wrap(text: str, font: ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """Greedy word wrap by measured width; words wider than a line are cut by characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if font.getlength(line + char) > max_width and line:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def _fit_text(
    text: str, max_width: float, max_height: float, start_size: int
) -> tuple[ImageFont.FreeTypeFont, int, list[str]]:
    """The largest font (down to a minimum) whose wrapped text fits; cut with an ellipsis otherwise."""
    size = start_size
    while True:
        font = ImageFont.load_default(size=size)
        line_height = round(size * 1.25)
        lines = _wrap(text, font, max_width)
        max_lines = max(1, int(max_height // line_height))
        if len(lines) <= max_lines:
            return font, line_height, lines
        if size <= _MIN_FONT_SIZE:
            kept = lines[:max_lines]
            last = kept[-1]
            while last and font.getlength(last + "…") > max_width:
                last = last[:-1]
            kept[-1] = last + "…"
            return font, line_height, kept
        size = max(_MIN_FONT_SIZE, int(size * 0.85))


class _Scene:
    """Everything that does not change from frame to frame, prepared once."""

    def __init__(self, prompt: str, seed: int, width: int, height: int, count: int) -> None:
        rng = np.random.default_rng(scene_seed(prompt, seed))
        self.width, self.height, self.count = width, height, count

        # Background: a cyclic two-colour palette indexed by position along a seeded direction;
        # shifting the indices each frame makes the bands drift.
        hue = rng.random()
        first = _hsv(rng, hue, (0.5, 0.85), (0.25, 0.5))
        second = _hsv(rng, hue + rng.uniform(0.2, 0.5), (0.5, 0.85), (0.35, 0.6))
        mix = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_PALETTE_SIZE) / _PALETTE_SIZE)
        self.palette = np.rint(first + mix[:, None] * (second - first)).astype(np.uint8)
        angle = rng.uniform(0, 2 * np.pi)
        bands = rng.uniform(0.8, 2.0)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        along = (xs * math.cos(angle) + ys * math.sin(angle)) / math.hypot(width, height)
        steps = np.floor(along * bands * _PALETTE_SIZE).astype(np.int64)
        self.index = (steps % _PALETTE_SIZE).astype(np.uint16)
        self.drift = int(rng.integers(3, 12)) * int(rng.choice([-1, 1]))  # palette entries per frame

        # The disc: a bright accent on a Lissajous path.
        self.disc_colour = _hsv(rng, hue + 0.5, (0.3, 0.6), (0.9, 1.0))
        self.radius = rng.uniform(0.07, 0.13) * min(width, height)
        self.path = rng.uniform([0.08, 0.08, 0.0, 0.0], [0.25, 0.25, 1.0, 1.0])  # Hz x, Hz y, phases

        # The prompt: white text on a translucent dark panel, composited with premultiplied alpha.
        margin = round(min(width, height) * 0.06)
        padding = round(min(width, height) * 0.03)
        font, line_height, lines = _fit_text(
            prompt.strip(),
            max_width=width - 2 * (margin + padding),
            max_height=height * 0.55,
            start_size=max(_MIN_FONT_SIZE, round(min(width, height) / 16)),
        )
        text_width = max(font.getlength(line) for line in lines)
        panel_w = min(width - 2 * margin, math.ceil(text_width) + 2 * padding)
        panel_h = line_height * len(lines) + 2 * padding
        panel = Image.new("RGBA", (panel_w, panel_h), (0, 0, 0, 0))
        draw = ImageDraw.Draw(panel)
        draw.rounded_rectangle((0, 0, panel_w - 1, panel_h - 1), radius=padding, fill=(0, 0, 0, 150))
        for number, line in enumerate(lines):
            draw.text((padding, padding + number * line_height), line, font=font, fill=(255, 255, 255, 255))
        rgba = np.asarray(panel, dtype=np.uint16)
        alpha = rgba[..., 3:4]
        # Pillow's draw.text replaces the panel's pixels, so colour and alpha are already "over" it.
        self.panel_premultiplied = rgba[..., :3] * alpha
        self.panel_inverse_alpha = 255 - alpha
        self.panel_y = (height - panel_h) // 2
        self.panel_x = (width - panel_w) // 2

        self.bar_colour = np.rint(self.disc_colour).astype(np.uint8)
        self.bar_height = max(4, height // 120)

    def frame(self, number: int) -> np.ndarray:
        """Frame `number` (from 0) as an (height, width, 3) uint8 RGB array."""
        shift = (number * self.drift) % _PALETTE_SIZE
        image = np.take(np.roll(self.palette, -shift, axis=0), self.index, axis=0)
        self._draw_disc(image, number / FRAME_RATE)
        self._draw_panel(image)
        filled = round(self.width * (number + 1) / self.count)
        image[self.height - self.bar_height :, :filled] = self.bar_colour
        return image

    def _draw_disc(self, image: np.ndarray, seconds: float) -> None:
        hz_x, hz_y, phase_x, phase_y = self.path
        r = self.radius
        cx = r + (self.width - 2 * r) * (0.5 + 0.5 * math.sin(2 * math.pi * (hz_x * seconds + phase_x)))
        cy = r + (self.height - 2 * r) * (0.5 + 0.5 * math.sin(2 * math.pi * (hz_y * seconds + phase_y)))
        x0, x1 = max(0, int(cx - r - 1)), min(self.width, int(cx + r + 2))
        y0, y1 = max(0, int(cy - r - 1)), min(self.height, int(cy + r + 2))
        ys, xs = np.ogrid[y0:y1, x0:x1]
        # Coverage of each pixel by the disc, with a one-pixel soft edge against aliasing.
        distance = np.sqrt((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2)
        coverage = np.clip(r + 0.5 - distance, 0.0, 1.0)[..., None]
        region = image[y0:y1, x0:x1]
        region[...] = np.rint(region * (1 - coverage) + self.disc_colour * coverage).astype(np.uint8)

    def _draw_panel(self, image: np.ndarray) -> None:
        h, w = self.panel_inverse_alpha.shape[:2]
        region = image[self.panel_y : self.panel_y + h, self.panel_x : self.panel_x + w]
        blended = (region * self.panel_inverse_alpha + self.panel_premultiplied + 127) // 255
        region[...] = blended.astype(np.uint8)


def render_frames(prompt: str, seed: int, width: int, height: int, count: int) -> Iterator[np.ndarray]:
    """The `count` frames of the video as (height, width, 3) uint8 RGB arrays, without encoding them."""
    scene = _Scene(prompt, seed, width, height, count)
    for number in range(count):
        yield scene.frame(number)


def encode_video(
    path: Path,
    prompt: str,
    seed: int,
    duration_seconds: float,
    width: int,
    height: int,
    *,
    on_progress: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
    pace_fps: float = 0.0,
) -> VideoInfo:
    """Writes the video to `path` as an H.264 (yuv420p) MP4 at 24 fps. Blocking and CPU-bound.

    on_progress gets the fraction of frames encoded after each frame. Setting `cancel` stops the
    render before the next frame with RenderCancelled (the partial file is left for the caller to
    remove). pace_fps > 0 encodes at most that many frames per second of wall time.
    """
    count = frame_count(duration_seconds)
    if count < 1:
        raise ValueError(f"a {duration_seconds} s video has no frames")
    scene = _Scene(prompt, seed, width, height, count)
    # Without a caller's event, one nobody sets: pacing waits on it either way.
    cancel = cancel or threading.Event()
    started = time.monotonic()
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=FRAME_RATE, options=X264_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for number in range(count):
            if pace_fps > 0:
                # Waiting on the cancel event rather than sleeping keeps a paced render cancellable.
                delay = started + number / pace_fps - time.monotonic()
                if delay > 0 and cancel.wait(delay):
                    raise RenderCancelled
            if cancel.is_set():
                raise RenderCancelled
            frame = av.VideoFrame.from_ndarray(scene.frame(number), format="rgb24")
            frame.pts, frame.time_base = number, Fraction(1, FRAME_RATE)
            container.mux(stream.encode(frame))
            if on_progress is not None:
                on_progress((number + 1) / count)
        container.mux(stream.encode(None))
    return VideoInfo(width=width, height=height, frame_rate=FRAME_RATE, frame_count=count)
