"""Stitching: a long video's shots joined, in order, into one film (an H.264, yuv420p MP4).

Shots that already match the film and each other (the same encoder's output at the same settings and
size: one backend's shots, our synthetic ones) are remuxed, their packets copied without re-encoding,
which is fast and loses nothing. Anything else (mixed sizes, frame rates or codecs, as shots from
different providers come) is decoded, fitted to the film's size with black bars, resampled to its
frame rate and encoded once. Either way each shot lasts as long in the film as it did alone, to within
one frame, so the film's duration is the sum of the shots' durations within one frame per shot.

Only pictures are joined: the shots' audio streams, if any, are left out.
"""

import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import structlog

log = structlog.get_logger()

# The local renderer's (synth.X264_OPTIONS), copied: the kit must not depend on a renderer service,
# which itself depends on the kit. Fast enough for a 2-core machine; crf 23 is x264's own default.
_X264_OPTIONS = {"preset": "veryfast", "crf": "23"}
# Video-range black in YUV: the bars a frame of another aspect ratio is padded with.
_BLACK_LUMA, _NEUTRAL_CHROMA = 16, 128


class StitchError(Exception):
    """No shots, or a shot that cannot be opened or decoded; `shot` is its index (None for no shots)."""

    def __init__(self, message: str, *, shot: int | None = None) -> None:
        super().__init__(message)
        self.shot = shot


@dataclass(frozen=True)
class StitchedVideo:
    """What the film is made of."""

    width: int
    height: int
    frame_rate: int
    frame_count: int
    # True when the shots' packets were copied as they were, without re-encoding.
    remuxed: bool
    # Frames each shot contributed, in order.
    shot_frames: tuple[int, ...]

    @property
    def duration_seconds(self) -> float:
        return self.frame_count / self.frame_rate


def stitch(
    shots: Sequence[Path], output: Path, *, width: int, height: int, frame_rate: int = 24
) -> StitchedVideo:
    """Joins the shots, in order, into one H.264 (yuv420p) MP4 of width x height at frame_rate.

    Blocking and CPU-bound. Each shot contributes round(its duration * frame_rate) frames (at least
    one), so the film lasts the sum of the shots' durations within one frame per shot. Shots of
    another size are scaled to fit and centred on black (letterbox or pillarbox), of another frame
    rate have frames dropped or repeated by timestamp. Raises StitchError for no shots or a shot that
    cannot be decoded (naming its index), ValueError for an odd or empty size or a frame rate below
    1; on any error no output file is left.
    """
    if width < 2 or height < 2 or width % 2 or height % 2:
        # yuv420p halves the chroma planes: x264 needs even sizes.
        raise ValueError(f"the film's size must be even and positive, not {width}x{height}")
    if frame_rate < 1:
        raise ValueError(f"frame rate {frame_rate} is not a positive whole number")
    if not shots:
        raise StitchError("no shots to stitch")
    shots = list(shots)
    try:
        plan = _remux_plan(shots, width, height, frame_rate)
        if plan is not None:
            stitched = _remux(plan, output, width, height, frame_rate)
            if stitched is not None:
                return stitched
        return _reencode(shots, output, width, height, frame_rate)
    except BaseException:
        output.unlink(missing_ok=True)
        raise


def last_frame_png(path: Path) -> bytes:
    """The video's last frame as PNG bytes at the video's size (for a continuous shot's first frame).

    Blocking. Seeks to the last keyframe and decodes from there, so it costs at most one keyframe
    interval (x264's default: about 10 s at 24 fps) however long the file is. Raises StitchError if
    the file cannot be opened or has no frames.
    """
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise StitchError(f"{path.name} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            last = None
            if stream.duration:
                try:
                    # Backward to the keyframe before the end: the last frame is decoded from there.
                    container.seek((stream.start_time or 0) + stream.duration, backward=True, stream=stream)
                    last = _last(container.decode(stream))
                except av.FFmpegError:
                    last = None
                if last is None:
                    # The seek found nothing to decode (a file without an index): from the start.
                    container.seek(0, stream=stream)
            if last is None:
                last = _last(container.decode(stream))
    except (av.FFmpegError, OSError) as error:
        raise StitchError(f"{path.name}: {type(error).__name__}: {error}") from error
    if last is None:
        raise StitchError(f"{path.name} has no frames")
    buffer = io.BytesIO()
    last.to_image().save(buffer, format="PNG")
    return buffer.getvalue()


def _last(frames: Iterable[av.VideoFrame]) -> av.VideoFrame | None:
    last = None
    for last in frames:  # noqa: B007 - the loop is for its last value
        pass
    return last


# The fast path: packets copied, timestamps shifted.


@dataclass(frozen=True)
class _RemuxShot:
    path: Path
    time_base: Fraction
    extradata: bytes
    # Presentation time of the first frame and the number of frames, in the stream's time base.
    start: int
    frames: int


def _open_error(index: int, path: Path, error: Exception) -> StitchError:
    return StitchError(f"shot {index} ({path.name}): {type(error).__name__}: {error}", shot=index)


def _remux_plan(shots: list[Path], width: int, height: int, frame_rate: int) -> list[_RemuxShot] | None:
    """The shots as they would be copied, or None when any of them needs re-encoding.

    Reads the packets, not the pictures: cheap. A shot that cannot be opened or has no video stream
    raises StitchError here already.
    """
    plan: list[_RemuxShot] = []
    eligible = True
    for index, path in enumerate(shots):
        try:
            shot = _remux_shot(index, path, width, height, frame_rate)
        except (av.FFmpegError, OSError) as error:
            raise _open_error(index, path, error) from error
        # Keep looking after an ineligible shot: a later one without a video stream fails now.
        eligible = eligible and shot is not None
        if shot is not None:
            plan.append(shot)
    if not eligible:
        return None
    first = plan[0]
    # Identical SPS/PPS (avcC) and time base: one decoder configuration reads every shot's packets.
    if any(shot.extradata != first.extradata or shot.time_base != first.time_base for shot in plan):
        return None
    return plan


def _remux_shot(index: int, path: Path, width: int, height: int, frame_rate: int) -> _RemuxShot | None:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise StitchError(f"shot {index} ({path.name}) has no video stream", shot=index)
        stream = container.streams.video[0]
        context = stream.codec_context
        time_base = stream.time_base
        if (
            context.name != "h264"
            or context.pix_fmt != "yuv420p"
            or (context.width, context.height) != (width, height)
            or stream.average_rate != frame_rate
            or not context.extradata
            or time_base is None
            or (1 / (time_base * frame_rate)).denominator != 1
        ):
            return None
        step = int(1 / (time_base * frame_rate))  # one frame, in the time base
        pts: list[int] = []
        first_is_key = None
        for packet in container.demux(stream):
            if packet.dts is None:
                continue  # the demuxer's end-of-stream marker
            if packet.pts is None:
                return None
            if first_is_key is None:
                first_is_key = packet.is_keyframe
            pts.append(packet.pts)
        if len(pts) < stream.frames:
            # The container's index lists more frames than there are: a truncated file.
            raise StitchError(
                f"shot {index} ({path.name}) is truncated: {len(pts)} of the {stream.frames} frames it lists",
                shot=index,
            )
        # The shot must start on a keyframe (to be decodable after another shot) and be constant
        # rate: a frame every `step`, no gaps nor repeats.
        if not pts or not first_is_key:
            return None
        pts.sort()
        if any(later - earlier != step for earlier, later in pairwise(pts)):
            return None
        return _RemuxShot(
            path=path, time_base=time_base, extradata=bytes(context.extradata), start=pts[0], frames=len(pts)
        )


def _remux(
    plan: list[_RemuxShot], output: Path, width: int, height: int, frame_rate: int
) -> StitchedVideo | None:
    """Copies the shots' packets into `output`, each shot right after the one before; None (and a
    log line) if that fails or the result does not hold every frame: then re-encode."""
    step = int(1 / (plan[0].time_base * frame_rate))
    expected = sum(shot.frames for shot in plan)
    try:
        with av.open(str(output), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            target = None
            offset = 0  # the shots before this one's total duration, in the time base
            for shot in plan:
                with av.open(str(shot.path)) as source:
                    stream = source.streams.video[0]
                    if target is None:
                        target = container.add_stream_from_template(stream)
                    for packet in source.demux(stream):
                        if packet.dts is None:
                            continue
                        # Decode order is kept; both stamps move by the same amount, so the B-frame
                        # delay (negative first dts) stays and the shots neither overlap nor gap.
                        shift = offset - shot.start
                        packet.pts += shift
                        packet.dts += shift
                        packet.stream = target
                        container.mux(packet)
                offset += shot.frames * step
        decoded = _count_frames(output)
    except (av.FFmpegError, OSError) as error:
        log.warning("stitch_remux_failed", error=f"{type(error).__name__}: {error}", shots=len(plan))
        return None
    if decoded != expected:
        # A shot with broken packets: re-encoding decodes each shot and says which one.
        log.warning("stitch_remux_incomplete", decoded=decoded, expected=expected, shots=len(plan))
        return None
    return StitchedVideo(
        width=width,
        height=height,
        frame_rate=frame_rate,
        frame_count=expected,
        remuxed=True,
        shot_frames=tuple(shot.frames for shot in plan),
    )


def _count_frames(path: Path) -> int:
    """The film's frames, as its packets (one per frame in H.264 MP4): demuxed, not decoded. The shots'
    packets were decoded by their renderers' QC, and the film's QC decodes it once more."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


# The general path: decoded, fitted, resampled, encoded.


class _Fitter:
    """Frames of any size and format as yuv420p frames of width x height: scaled to fit, keeping their
    aspect ratio, and centred on black."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        # Per source size: the scaled size, its offset and a canvas whose bars are already black.
        self._layouts: dict[tuple[int, int], tuple[int, int, int, int, np.ndarray]] = {}

    def __call__(self, frame: av.VideoFrame) -> av.VideoFrame:
        if (frame.width, frame.height) == (self.width, self.height):
            return frame.reformat(format="yuv420p")
        scaled_w, scaled_h, x, y, canvas = self._layout(frame.width, frame.height)
        scaled = frame.reformat(width=scaled_w, height=scaled_h, format="yuv420p", interpolation="BICUBIC")
        # PyAV's yuv420p arrays are the Y, U and V planes back to back, without line padding.
        planes = scaled.to_ndarray().ravel()
        luma_size, chroma_size = scaled_w * scaled_h, scaled_w * scaled_h // 4
        y_plane, u_plane, v_plane = self._planes(canvas)
        y_plane[y : y + scaled_h, x : x + scaled_w] = planes[:luma_size].reshape(scaled_h, scaled_w)
        cx, cy, cw, ch = x // 2, y // 2, scaled_w // 2, scaled_h // 2
        u_plane[cy : cy + ch, cx : cx + cw] = planes[luma_size : luma_size + chroma_size].reshape(ch, cw)
        v_plane[cy : cy + ch, cx : cx + cw] = planes[luma_size + chroma_size :].reshape(ch, cw)
        # from_ndarray copies, so the canvas is reused for the next frame.
        return av.VideoFrame.from_ndarray(canvas.reshape(self.height * 3 // 2, self.width), format="yuv420p")

    def _planes(self, canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        luma_size, chroma_size = self.width * self.height, self.width * self.height // 4
        chroma_shape = (self.height // 2, self.width // 2)
        return (
            canvas[:luma_size].reshape(self.height, self.width),
            canvas[luma_size : luma_size + chroma_size].reshape(chroma_shape),
            canvas[luma_size + chroma_size :].reshape(chroma_shape),
        )

    def _layout(self, width: int, height: int) -> tuple[int, int, int, int, np.ndarray]:
        layout = self._layouts.get((width, height))
        if layout is None:
            scale = min(self.width / width, self.height / height)
            # Even sizes and offsets, so that the half-size chroma planes line up with the luma.
            scaled_w = min(self.width, max(2, 2 * round(width * scale / 2)))
            scaled_h = min(self.height, max(2, 2 * round(height * scale / 2)))
            x = (self.width - scaled_w) // 4 * 2
            y = (self.height - scaled_h) // 4 * 2
            canvas = np.empty(self.width * self.height * 3 // 2, np.uint8)
            y_plane, u_plane, v_plane = self._planes(canvas)
            y_plane[...] = _BLACK_LUMA
            u_plane[...] = v_plane[...] = _NEUTRAL_CHROMA
            layout = self._layouts[width, height] = (scaled_w, scaled_h, x, y, canvas)
        return layout


def _reencode(shots: list[Path], output: Path, width: int, height: int, frame_rate: int) -> StitchedVideo:
    fit = _Fitter(width, height)
    time_base = Fraction(1, frame_rate)
    counts: list[int] = []
    written = 0
    with av.open(str(output), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=frame_rate, options=_X264_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index, path in enumerate(shots):
            count = 0
            previous: av.VideoFrame | None = None
            fitted: av.VideoFrame | None = None
            for frame in _resampled(index, path, frame_rate):
                # A repeated frame is fitted once; a dropped one never.
                if frame is not previous:
                    previous, fitted = frame, fit(frame)
                assert fitted is not None
                fitted.pts, fitted.time_base = written, time_base
                container.mux(stream.encode(fitted))
                written += 1
                count += 1
            counts.append(count)
        container.mux(stream.encode(None))
    return StitchedVideo(
        width=width,
        height=height,
        frame_rate=frame_rate,
        frame_count=written,
        remuxed=False,
        shot_frames=tuple(counts),
    )


def _resampled(index: int, path: Path, frame_rate: int) -> Iterator[av.VideoFrame]:
    """The shot's decoded frames at frame_rate: output frame i shows the source frame on screen at the
    middle of its slot, [i, i + 1) / frame_rate from the shot's first frame; round(duration *
    frame_rate) of them. Decoding errors become StitchError (errors of the consumer, the encoder, do
    not pass through here)."""
    slot_twice = Fraction(1, 2 * frame_rate)  # half a slot: slot i's middle is (2i + 1) of these
    slot = 0
    current: av.VideoFrame | None = None
    start = last_time = Fraction(0)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise StitchError(f"shot {index} ({path.name}) has no video stream", shot=index)
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            nominal = stream.average_rate or stream.guessed_rate or frame_rate
            decoded = 0
            for number, frame in enumerate(container.decode(stream)):
                decoded = number + 1
                if frame.pts is None or frame.time_base is None:
                    time = Fraction(number) / Fraction(nominal)
                else:
                    time = frame.pts * frame.time_base
                if current is None:
                    start = time
                time -= start
                # Slots whose middle comes before this frame show the frame before it.
                while current is not None and (2 * slot + 1) * slot_twice < time:
                    yield current
                    slot += 1
                current, last_time = frame, time
            if current is None:
                raise StitchError(f"shot {index} ({path.name}) has no frames", shot=index)
            if decoded < stream.frames:
                # A truncated file decodes cleanly but stops short of what its index lists.
                raise StitchError(
                    f"shot {index} ({path.name}) is truncated: decoded {decoded} of the {stream.frames} "
                    "frames it lists",
                    shot=index,
                )
            if current.duration and current.time_base is not None:
                last_duration = current.duration * current.time_base
            else:
                last_duration = 1 / Fraction(nominal)
    except (av.FFmpegError, OSError) as error:
        raise _open_error(index, path, error) from error
    # The last frame lasts until the shot's end; a shot shorter than half a frame still shows once.
    total = max(1, round((last_time + last_duration) * frame_rate))
    while slot < total:
        yield current
        slot += 1
