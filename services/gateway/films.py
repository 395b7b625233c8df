"""A long video's film: its shots' videos joined, in order, into one H.264 MP4, stored, probed and
scored like any output; and the last frame of a shot, for the continuous shot after it.

Each shot's video was stored by its renderer, content-addressed (the same bytes, the same URI), so a
film can be made again from them at any time: a gateway that crashed before recording it stitches
again, and stores the same video. The film takes the size and frame rate most of its running time
has (the larger size on a tie); a shot of another size is scaled and padded into it. The decoding and
encoding take turns: at most `cpu_slots` at once (AIPROD_DISPATCH_CONCURRENCY), however many jobs are
driven.
"""

import asyncio
import collections
from pathlib import Path

from aiprod.common.v1 import render_pb2
from aiprod.gateway.v1 import gateway_pb2
from aiprod_kit.rendering import qc, stitching
from aiprod_kit.rendering.finishing import render_output
from aiprod_kit.rendering.stitching import StitchError
from aiprod_kit.rendering.storage import VideoStore, scratch_directory, video_store_from_settings
from aiprod_kit.settings import GatewaySettings

_DEFAULT_FRAME_RATE = 24


class Films:
    def __init__(self, store: VideoStore, work_dir: Path, cpu_slots: int = 1) -> None:
        self._store = store
        self._work_dir = work_dir
        self._cpu = asyncio.Semaphore(cpu_slots)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> "Films":
        return cls(
            video_store_from_settings(settings.data_dir, settings.gcs_bucket),
            settings.data_dir / "tmp" / "gateway",
            settings.dispatch_concurrency,
        )

    async def stitch(self, job: gateway_pb2.RenderJob) -> render_pb2.RenderOutput:
        """The job's film, from its succeeded shots (StitchError: a shot's video cannot be decoded)."""
        outputs = [shot.output for shot in job.shots]
        width, height, frame_rate = _film_format(outputs)
        planned = sum(shot.duration_seconds for shot in job.plan.shots)
        async with scratch_directory(self._work_dir, "film-") as scratch:
            paths = [
                await self._fetch(output.video.uri, scratch / f"shot-{index}.mp4", index)
                for index, output in enumerate(outputs)
            ]
            film = scratch / "film.mp4"
            async with self._cpu:
                await asyncio.to_thread(
                    stitching.stitch, paths, film, width=width, height=height, frame_rate=frame_rate
                )
                try:
                    facts = await asyncio.to_thread(qc.probe, film)
                except qc.DecodeError as error:
                    raise StitchError(f"the stitched film does not decode: {error}") from error
            stored = await self._store.put(film)
        report = qc.report(facts, duration_seconds=planned, width=width, height=height, frame_rate=frame_rate)
        output = render_output(job.backend, stored, facts, report)
        output.cost.CopyFrom(job.cost)
        return output

    async def _fetch(self, uri: str, destination: Path, index: int) -> Path:
        """A shot's video, copied here. StitchError when this store can never read it (a video on
        another pod's disk: the gateway and the renderers must share a bucket or a volume); other
        errors (the bucket unreachable now) are left to the caller to try again."""
        try:
            return await self._store.fetch(uri, destination)
        except (FileNotFoundError, ValueError) as error:
            raise StitchError(
                f"shot {index}: its video {uri} cannot be read from this gateway's video store ({error})",
                shot=index,
            ) from error

    async def last_frame(self, output: render_pb2.RenderOutput, index: int) -> render_pb2.Image:
        """Shot `index`'s last frame, as an inline PNG: the first frame of the continuous shot after it
        (StitchError when its video cannot be read or decoded)."""
        async with scratch_directory(self._work_dir, "film-") as scratch:
            path = await self._fetch(output.video.uri, scratch / "shot.mp4", index)
            async with self._cpu:
                data = await asyncio.to_thread(stitching.last_frame_png, path)
        return render_pb2.Image(data=data, mime_type="image/png")


def _film_format(outputs: list[render_pb2.RenderOutput]) -> tuple[int, int, int]:
    """The film's (width, height, frame rate): those of most of its running time."""
    sizes: collections.Counter[tuple[int, int]] = collections.Counter()
    rates: collections.Counter[int] = collections.Counter()
    for output in outputs:
        video = output.video
        sizes[(video.width, video.height)] += video.duration_seconds
        rates[round(video.frame_rate) or _DEFAULT_FRAME_RATE] += video.duration_seconds
    (width, height), _ = max(sizes.items(), key=lambda item: (item[1], item[0][0] * item[0][1]))
    frame_rate, _ = max(rates.items(), key=lambda item: (item[1], item[0]))
    return width, height, frame_rate
