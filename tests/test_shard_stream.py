"""Streamed tar shards: split over ranks and workers, shuffled, and resumed mid-epoch at the next unseen sample."""

import io
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import assert_resume_is_exact, tiny_config
from wildssl.data import open_source
from wildssl.data.shard_stream import SHARD_ID_STRIDE, ShardStream, StreamBatches
from wildssl.data.shards import TarShards
from wildssl.errors import DataError

COUNTS = [5, 3, 6, 4, 5, 2, 6]  # uneven shards: ranks' shares differ in size


def write_shards(folder, counts=COUNTS, size=16):
    """One tar per count, img2dataset layout: ``key.png`` + ``key.txt`` (caption) + ``key.cls`` (label)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for shard, count in enumerate(counts):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(count):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(buffer, "PNG")
                for extension, data in (("png", buffer.getvalue()), ("txt", f"caption {shard} {i}".encode()),
                                        ("cls", str((shard + i) % 3).encode())):
                    info = tarfile.TarInfo(f"{shard:05d}{i:04d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def _id(shard, ordinal):
    return shard * SHARD_ID_STRIDE + ordinal


def test_split_over_two_ranks_and_two_workers_reads_every_sample_once_per_epoch(tmp_path):
    stream = ShardStream(write_shards(tmp_path / "shards"), load_size=16, shuffle_shards=2)
    everything = {_id(s, i) for s, count in enumerate(COUNTS) for i in range(count)}
    assert len(stream) == len(everything)
    num_batches, batch = 14, 2  # 28 samples per rank: more than any rank's share of one epoch (at most 20)
    per_epoch: dict[int, Counter] = defaultdict(Counter)
    for rank in range(2):
        by_worker = [list(stream.batches(7, rank, 2, batch, num_batches, worker=w, num_workers=2)) for w in range(2)]
        assert [b["batch_number"] for b in by_worker[0]] == list(range(0, num_batches, 2))
        assert [b["batch_number"] for b in by_worker[1]] == list(range(1, num_batches, 2))
        merged = sorted(by_worker[0] + by_worker[1], key=lambda b: b["batch_number"])
        # the rank's stream does not depend on the number of workers
        alone = list(stream.batches(7, rank, 2, batch, num_batches))
        assert [b["index"].tolist() for b in merged] == [b["index"].tolist() for b in alone]
        epochs = torch.cat([b["epoch"] for b in merged]).tolist()
        assert epochs == sorted(epochs) and epochs[-1] >= 1  # epoch 0 finished on this rank
        for b in merged:
            for epoch, index, caption, label in zip(b["epoch"].tolist(), b["index"].tolist(), b["caption"],
                                                    b["label"].tolist()):
                per_epoch[epoch][index] += 1
                shard, ordinal = divmod(index, SHARD_ID_STRIDE)
                assert (caption, label) == (f"caption {shard} {ordinal}", (shard + ordinal) % 3)
    assert set(per_epoch[0]) == everything and set(per_epoch[0].values()) == {1}
    assert max(per_epoch[1].values()) == 1  # no duplicates in the next epoch either
    # shuffled: the order differs between the epochs and from the shards' order
    rank0 = [i for b in stream.batches(7, 0, 2, batch, num_batches) for i in b["index"].tolist()]
    assert rank0 != sorted(rank0)


def test_dataloader_workers_deliver_the_stream_in_order(tmp_path):
    stream = ShardStream(write_shards(tmp_path / "shards"), load_size=16, shuffle_shards=3)
    batches = StreamBatches(stream, seed=1, rank=0, world=1, batch_size=3, num_batches=9)
    expected = [b["index"].tolist() for b in stream.batches(1, 0, 1, 3, 9)]
    loader = DataLoader(batches, batch_size=None, num_workers=2, prefetch_factor=2)
    got = list(loader)
    assert [b["batch_number"] for b in got] == list(range(9))
    assert [b["index"].tolist() for b in got] == expected


def test_stream_starts_at_a_saved_position_without_replaying_the_epoch(tmp_path):
    stream = ShardStream(write_shards(tmp_path / "shards"), load_size=16, shuffle_shards=2)
    full = list(stream.batches(3, 0, 1, 4, 8))
    middle = full[2]["position"]  # after batch 2: mid-group, mid-epoch
    assert middle[0] == 0 and middle[2] > 0
    rest = list(stream.batches(3, 0, 1, 4, 5, start=tuple(middle)))
    assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in full[3:]]


def test_a_run_killed_mid_epoch_on_streamed_shards_resumes_at_the_next_unseen_sample(tmp_path, monkeypatch):
    folder = write_shards(tmp_path / "shards", counts=[8] * 6)  # 48 samples: 6 steps of 8 per epoch
    config = tiny_config("simclr", f"data.train=stream:{folder}", "data.shuffle_shards=2",
                         "train.batch_size=8", "train.steps=9", "train.checkpoint_every=4", "train.log_every=3")
    straight = assert_resume_is_exact(config, tmp_path, monkeypatch, kill_at=5)
    first_epoch = [i for step in range(6) for i in straight[step]["train"]]
    assert sorted(first_epoch) == sorted(_id(s, i) for s in range(6) for i in range(8))


def test_stream_prefix_is_map_style_outside_training_and_needs_shards(tmp_path):
    folder = write_shards(tmp_path / "shards", counts=[2, 2])
    assert isinstance(open_source(f"stream:{folder}", load_size=16), TarShards)
    assert isinstance(open_source(f"stream:{folder}", load_size=16, stream=True), ShardStream)
    assert isinstance(open_source(str(folder), load_size=16, stream=True), TarShards)  # few shards: map-style
    with pytest.raises(DataError, match="cannot be split over 3 ranks"):
        next(ShardStream(folder, load_size=16).batches(0, 0, 3, 1, 1))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    with pytest.raises(DataError, match="only tar shards can be streamed"):
        open_source(f"stream:{tmp_path / 'images'}", stream=True)
