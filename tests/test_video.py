"""Video frames sampled at a chosen rate: the right frames at the right times, and exact resume."""

import logging
import math

import numpy as np
import pytest

from conftest import assert_resume_is_exact, tiny_config
from wildssl.data import open_source
from wildssl.errors import DataError

av = pytest.importorskip("av")

VIDEO_FPS = 10
SIDE = 64
BITS = 8  # the frame number, drawn as 8 vertical stripes (white = 1), most significant first


def write_video(path, num_frames: int, gop: int = 10) -> None:
    """An MPEG-4 video at 10 fps whose frame n shows n in binary; a keyframe every ``gop`` frames, so a
    read between keyframes must decode forward from the one before it."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.bit_rate = 2_000_000
        for n in range(num_frames):
            pixels = np.zeros((SIDE, SIDE, 3), np.uint8)
            for bit in range(BITS):
                if n >> (BITS - 1 - bit) & 1:
                    pixels[:, bit * SIDE // BITS:(bit + 1) * SIDE // BITS] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_number(image) -> int:
    """The number drawn into a decoded (3, S, S) uint8 frame."""
    width = image.shape[-1] // BITS
    centres = image[:, :, [bit * width + width // 2 for bit in range(BITS)]].float().mean(dim=(0, 1))
    return int("".join("1" if value > 128 else "0" for value in centres.tolist()), 2)


def test_frames_sampled_at_a_rate_are_those_shown_at_the_expected_timestamps(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "a.mp4", 40)  # 4 s
    write_video(folder / "b.mp4", 25)  # 2.5 s
    for fps, expected_times in ((2.0, [k / 2 for k in range(8)] + [k / 2 for k in range(5)]),
                                (0.3, [0.0, 10 / 3, 0.0])):
        source = open_source(f"video:{folder}?fps={fps}", load_size=SIDE)
        assert len(source) == len(expected_times)
        assert [source.timestamp(i) for i in range(len(source))] == pytest.approx(expected_times)
        # read backwards, so every read seeks (never the decoder's next frame)
        for index in reversed(range(len(source))):
            sample = source[index]
            # the frame on screen at t is frame floor(t * 10) of a 10 fps video
            assert frame_number(sample["image"]) == math.floor(expected_times[index] * VIDEO_FPS + 1e-9)
            assert sample["index"] == index and sample["aspect"] == 1.0 and not sample["corrupt"]


def test_video_spec_errors_are_one_line(tmp_path):
    write_video(tmp_path / "a.mp4", 5)
    with pytest.raises(DataError, match="is a video: write video:"):
        open_source(str(tmp_path / "a.mp4"))
    with pytest.raises(DataError, match="fps=0.0 must be a positive number of frames per second"):
        open_source(f"video:{tmp_path / 'a.mp4'}?fps=0")
    with pytest.raises(DataError, match="unknown parameter 'rate'"):
        open_source(f"video:{tmp_path / 'a.mp4'}?rate=2")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    only_broken = tmp_path / "only_broken"
    only_broken.mkdir()
    (only_broken / "x.mp4").write_bytes(b"not a video")
    with pytest.raises(DataError, match="no readable video"):
        open_source(f"video:{only_broken}?fps=1")
    assert len(open_source(f"video:{tmp_path}?fps=2")) == 1  # the unreadable file is skipped


def test_a_run_killed_mid_epoch_on_video_resumes_at_the_same_frame(tmp_path, monkeypatch):
    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "a.mp4", 40)
    write_video(folder / "b.mp4", 30)
    # 5 fps: 20 + 15 = 35 frames, 4 steps of 8 per epoch
    config = tiny_config("simclr", f"data.train=video:{folder}?fps=5", "train.batch_size=8", "train.steps=6",
                         "train.checkpoint_every=2", "train.log_every=3")
    straight = assert_resume_is_exact(config, tmp_path, monkeypatch, kill_at=3)
    assert len({i for step in range(4) for i in straight[step]["train"]}) == 32  # an epoch reads distinct frames


def test_a_rate_above_the_videos_own_says_each_frame_repeats(tmp_path, caplog):
    # fps=1000 on a 10-fps clip gave 100 copies of each frame without a word
    write_video(tmp_path / "a.mp4", 20)  # 2 s at 10 fps
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        source = open_source(f"video:{tmp_path / 'a.mp4'}?fps=40", load_size=SIDE)
    assert len(source) == 80
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "video fps=40 is above the frame rate of 1 of the 1 videos" in warnings[0]
    assert "about 4 times in a row; give fps=10 or less" in warnings[0], warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        open_source(f"video:{tmp_path / 'a.mp4'}?fps=10", load_size=SIDE)
    assert not caplog.records


def test_an_unreadable_video_is_said_once_and_counted_with_the_runs_unreadable_images(tmp_path, caplog):
    """Five unusable videos were warned about twice each (the run and its online k-NN open the source) and were in
    no count: the summary's corrupt_images held only undecodable frames."""
    from wildssl.train.engine import train

    folder = tmp_path / "videos"
    folder.mkdir()
    write_video(folder / "a.mp4", 40)
    (folder / "broken.mp4").write_bytes(b"not a video")
    (folder / "empty.mkv").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="wildssl.data"):
        open_source(f"video:{folder}?fps=5")
        open_source(f"video:{folder}?fps=5")
    said = [r.getMessage() for r in caplog.records if "unreadable video" in r.getMessage()]
    assert len(said) == 2 and {"broken.mp4" in m for m in said} == {True, False}, said
    config = tiny_config("simclr", f"data.train=video:{folder}?fps=5", "train.batch_size=8", "train.steps=2")
    assert train(config, tmp_path / "run")["corrupt_images"] == 2
