"""Video files as a data source: frames sampled at a fixed rate, decoded on demand with PyAV.

``video:PATH?fps=0.2`` (a video file, or a folder searched recursively for them) samples every video at
``fps`` frames per second, as the seed papers sample Ego4D and Epic-Kitchens. The index is map-style:
item ``i`` is a ``(video, k)`` pair, built once from each container's duration, and its frame is the one
on screen at time ``start + k / fps`` (the last frame whose presentation time is at or before it). Reading
an item seeks to the nearest keyframe before that time and decodes forward; no frame is ever extracted to
disk. Because an item is a pure function of its index, the step sampler's exact resume holds unchanged:
a resumed run reads the same frames (:mod:`wildssl.data.sampler`).

Timestamps are compared as integers in the stream's time base (``fps`` is taken as an exact fraction),
so a sample time that falls exactly on a frame selects that frame, never its predecessor.

PyAV is an optional dependency: ``pip install wildssl[video]``.
"""

from __future__ import annotations

import bisect
import math
import os
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from wildssl.data.decode import DEFAULT_MAX_PIXELS, FileSource, ImageTooLarge, _to_rgb, logger, warn_once
from wildssl.data.sample import DEFAULT_LOAD_SIZE
from wildssl.errors import DataError

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")
DEFAULT_FPS = 1.0
_MAX_OPEN_VIDEOS = 8  # containers kept open per process (each holds a decoder)


def _import_av():
    try:
        import av
    except ImportError:
        raise DataError("video sources need PyAV: pip install 'wildssl[video]' (or pip install av)") from None
    return av


class _Video(NamedTuple):
    path: Path
    num_frames: int  # sampled frames, not the container's frames
    start_pts: int  # first presentation time, in time-base units
    time_base: Fraction
    width: int
    height: int


def _video_paths(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in VIDEO_EXTENSIONS)
        if not found:
            raise DataError(f"no video files in folder {path} (searched recursively for "
                            f"{', '.join(VIDEO_EXTENSIONS)})")
        return found
    raise DataError(f"video path not found: {path} (expected video:FILE_OR_FOLDER?fps=0.2)")


class VideoFrames(FileSource):
    """Frames of one video file or of every video under a folder, sampled at ``fps`` frames per second.

    Item ``i`` is frame ``k`` of video ``v`` (videos in sorted path order, ``k`` in time order): the frame
    shown at ``start + k / fps`` seconds, for every ``k`` with ``k / fps < duration``. Samples follow
    :class:`~wildssl.data.sample.Source` (no labels, no captions, ``aspect`` = frame W/H). A video that
    cannot be opened, or has no video stream, is skipped at construction and logged; a frame that cannot
    be decoded is skipped at read time like an unreadable image (:mod:`wildssl.data.decode`).
    """

    QUERY_PARAMETERS = {"fps": float}
    image_files = False  # frames come from the video decoder: data.decode=gpu leaves them on the CPU

    def __init__(self, path: str | os.PathLike, fps: float = DEFAULT_FPS, load_size: int = DEFAULT_LOAD_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__(load_size, max_pixels)
        self.av = _import_av()
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise DataError(f"video fps={fps!r} must be a positive number of frames per second (e.g. fps=0.2)")
        self.path = Path(path)
        self.fps = float(fps)
        self.rate = Fraction(self.fps).limit_denominator(1_000_000)  # sampled frames per second, exact
        self.videos: list[_Video] = []
        self.num_unreadable = 0
        self._slower: list[tuple[Path, Fraction]] = []  # videos whose own frame rate is below fps
        for video_path in _video_paths(self.path):
            video = self._index_video(video_path)
            if video is not None and video.num_frames > 0:
                self.videos.append(video)
        if not self.videos:
            raise DataError(f"no readable video in {self.path} ({self.num_unreadable} files could not be opened)")
        if self._slower:
            path, native = self._slower[0]
            warn_once(logger, ("slower videos", str(self.path), self.fps), "video fps=%g is above the frame rate of %d of the %d videos (%s: %g fps), so each of "
                           "their frames is sampled about %d times in a row; give fps=%g or less to sample each "
                           "frame at most once", self.fps, len(self._slower), len(self.videos), path, float(native),
                           round(self.rate / native), float(min(rate for _, rate in self._slower)))
        self.starts = [0] + [int(n) for n in np.cumsum([v.num_frames for v in self.videos])]
        self._containers: OrderedDict[int, Any] = OrderedDict()
        self._containers_pid = os.getpid()

    def _index_video(self, path: Path) -> _Video | None:
        try:
            with self.av.open(str(path)) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
                stream = container.streams.video[0]
                time_base = Fraction(stream.time_base)
                if stream.duration is not None:
                    duration = stream.duration * time_base
                elif container.duration is not None:  # microseconds (AV_TIME_BASE)
                    duration = Fraction(container.duration, 1_000_000)
                else:
                    raise ValueError("the container states no duration")
                width, height = stream.codec_context.width, stream.codec_context.height
                start = stream.start_time or 0
                native = Fraction(stream.average_rate) if stream.average_rate else None
        except (self.av.FFmpegError, OSError, ValueError) as error:
            self.num_unreadable += 1  # the run counts it with its unreadable images (corrupt_images)
            warn_once(logger, ("unreadable video", str(path)), "skipping unreadable video %s (%s: %s)", path,
                      type(error).__name__, error)  # once: the online k-NN opens the source again
            return None
        if native is not None and native > 0 and self.rate > native:
            self._slower.append((path, native))
        # k / fps < duration  <=>  k < duration * fps
        count = math.ceil(duration * self.rate)
        return _Video(path, max(count, 0), int(start), time_base, width, height)

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """``(video, k)`` of item ``index``."""
        video = bisect.bisect_right(self.starts, index) - 1
        return video, index - self.starts[video]

    def timestamp(self, index: int) -> float:
        """Seconds from the start of its video at which item ``index`` is sampled (``k / fps``)."""
        return float(self.locate(index)[1] / self.rate)

    def _target_pts(self, video: _Video, k: int) -> int:
        # the last time-base tick at or before start + k / fps
        return video.start_pts + math.floor(Fraction(k) / self.rate / video.time_base)

    def _container(self, video_index: int):
        if self._containers_pid != os.getpid():  # forked: the parent's decoders are not ours
            self._containers = OrderedDict()
            self._containers_pid = os.getpid()
        container = self._containers.get(video_index)
        if container is None:
            container = self.av.open(str(self.videos[video_index].path))
            container.streams.video[0].thread_count = 1  # parallelism comes from the loader's workers
            self._containers[video_index] = container
            if len(self._containers) > _MAX_OPEN_VIDEOS:
                self._containers.popitem(last=False)[1].close()
        else:
            self._containers.move_to_end(video_index)
        return container

    def frame_at(self, index: int):
        """The decoded ``av.VideoFrame`` of item ``index``: the last frame presented at or before its time."""
        video_index, k = self.locate(index)
        video = self.videos[video_index]
        target = self._target_pts(video, k)
        container = self._container(video_index)
        stream = container.streams.video[0]
        try:
            frame = self._decode_until(container, stream, target, seek_to=target)
            if frame is None:  # the seek landed after the target: decode from the start instead
                frame = self._decode_until(container, stream, target, seek_to=video.start_pts)
        except self.av.FFmpegError as error:
            self._containers.pop(video_index).close()  # a decoder after an error is not trusted again
            raise OSError(f"cannot decode frame {k} at {float(k / self.rate):.3f} s: {error}") from None
        if frame is None:
            raise OSError(f"no frame at or before {float(k / self.rate):.3f} s")
        return frame

    @staticmethod
    def _decode_until(container, stream, target: int, seek_to: int):
        container.seek(seek_to, stream=stream, backward=True, any_frame=False)
        chosen = None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            if frame.pts > target:
                break
            chosen = frame
        return chosen

    def _decode(self, index: int) -> tuple[torch.Tensor, int, int]:
        frame = self.frame_at(index)
        width, height = frame.width, frame.height
        if width * height > self.max_pixels:
            raise ImageTooLarge(f"{width}x{height} frame is above data.max_pixels={self.max_pixels}")
        pixels = np.array(_to_rgb(frame.to_image(), self.load_size), dtype=np.uint8)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), width, height

    def _open(self, index: int) -> str:  # frames are decoded by _decode, never opened as image files
        raise NotImplementedError

    def _name(self, index: int) -> str:
        video_index, k = self.locate(index)
        return f"{self.videos[video_index].path}@{float(k / self.rate):.3f}s"

    def _annotations(self, index: int, width: int, height: int) -> dict[str, Any]:
        return {}

    def class_labels(self) -> list[int]:
        return [-1] * len(self)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # open containers and the module cannot be pickled (spawned workers)
        state["_containers"] = OrderedDict()
        state["av"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.av = _import_av()

    def close(self) -> None:
        """Close this process's open videos (reopened on the next read)."""
        for container in self._containers.values():
            container.close()
        self._containers.clear()

    def describe(self) -> str:
        skipped = f", {self.num_unreadable} unreadable files skipped" if self.num_unreadable else ""
        return (f"video {self.path}: {len(self)} frames at {self.fps:g} fps from {len(self.videos)} videos"
                f"{skipped}")
