"""Fault injection, sections 3 and 5 of the reliability issue: output paths, disk, and checkpoints.

What must hold: a kill during a checkpoint write loses nothing and the resumed run is bit-identical to an
unbroken one; a full disk or a read-only place is one line and loses nothing (the previous file intact,
no temporary left); ``--out`` naming a file or an unwritable place is one line; a checkpoint whose metadata
is damaged or hostile is one line, and a tiny file declaring a huge encoder fails before anything large is
allocated.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import traceback
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import wildssl.io
from conftest import tiny_overrides
from wildssl.cli import main
from wildssl.errors import CheckpointError
from wildssl.io import atomic_save, read_header
from wildssl.models.loading import CHECKPOINT_NAME, load_encoder
from wildssl.train.config import build_config
from wildssl.train.engine import train
from wildssl.train.run import prepare_out_dir

DATA = "synthetic:scenes?n=32&size=16"


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line(code: int, err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("wildssl: error:"), err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


def _set(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _os_write_error(code: int) -> SafetensorError:
    """The error the safetensors writer raises when the operating system refuses a write (its wording)."""
    return SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code}) "
                           'at path "/somewhere/.tmpAbC123"')


# -- kill -9 during a checkpoint write, then --resume ----------------------------------------------------

def _train_and_get_killed_in_the_second_checkpoint_write(config: dict, out: Path) -> int:
    """Train ``config`` into ``out`` in a child process that SIGKILLs itself half-way through its second
    checkpoint write (half the bytes on the disk, nothing renamed); returns the child's wait status. The
    child is forked from this process, so it pays no second start-up of torch."""
    import torch._dynamo  # noqa: F401 (torch's optimizers import it, slowly: once, before the fork)

    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            real_save_file, calls = wildssl.io.save_file, []

            def save_file_then_die(tensors, filename, metadata=None):
                calls.append(filename)
                real_save_file(tensors, filename, metadata=metadata)
                if len(calls) == 2:
                    os.truncate(filename, os.path.getsize(filename) // 2)
                    os.kill(os.getpid(), signal.SIGKILL)

            wildssl.io.save_file = save_file_then_die
            train(config, out)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(3)  # reached only when the kill did not happen
    return os.waitpid(pid, 0)[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_9_during_a_checkpoint_write_then_resume_is_bit_identical_to_an_unbroken_run(tmp_path):
    config = build_config("dino_quick", tiny_overrides("dino", "train.steps=3", "train.checkpoint_every=1",
                                                       "model.drop_path_rate=0.1"))
    broken = tmp_path / "broken"
    status = _train_and_get_killed_in_the_second_checkpoint_write(config, broken)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    tmp = broken / (CHECKPOINT_NAME + ".tmp")
    assert tmp.is_file()  # the half-written file the kill left
    assert read_header(broken / CHECKPOINT_NAME)[0]["step"] == "1"  # the previous checkpoint, intact
    logged = [json.loads(line)["step"] for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]

    assert train(config, broken, resume=True)["start_step"] == 1
    train(config, tmp_path / "straight")
    assert not tmp.exists()
    straight = load_file(str(tmp_path / "straight" / CHECKPOINT_NAME))
    resumed = load_file(str(broken / CHECKPOINT_NAME))
    assert straight.keys() == resumed.keys() and any(k.startswith("method.teacher.") for k in straight)
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, different[:5]
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "broken")}
    assert [r["step"] for r in rows["broken"]] == [1, 2, 3]  # the replayed step logged once
    assert [r["loss"] for r in rows["broken"]] == [r["loss"] for r in rows["straight"]]


def test_stale_temporary_files_of_an_interrupted_write_are_removed_at_start(tmp_path):
    kept = ["checkpoint.safetensors", "checkpoint_0000010.safetensors", "metrics.jsonl", "notes.tmp", ".tmpfile"]
    stale = ["checkpoint.safetensors.tmp", "checkpoint_0000010.safetensors.tmp", ".tmpAb12Cd"]  # ours; the writer's
    for name in kept + stale:
        (tmp_path / name).write_bytes(b"x")
    prepare_out_dir(tmp_path, resume=True).close()  # it returns the run directory's lock, taken before the cleanup
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [".wildssl.lock"])


# -- a full disk, a read-only place ----------------------------------------------------------------------

def _failing_writer(monkeypatch, error: BaseException, after_bytes: int = 100, fail_on_call: int = 1):
    """Make wildssl.io's safetensors writer fail on its ``fail_on_call``-th call, after writing
    ``after_bytes`` of the file (a disk that fills up mid-write)."""
    real_save_file = wildssl.io.save_file
    calls = []

    def save_file_on_a_full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) < fail_on_call:
            return real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "wb") as handle:
            handle.write(b"\0" * after_bytes)
        raise error

    monkeypatch.setattr(wildssl.io, "save_file", save_file_on_a_full_disk)
    return calls


@pytest.mark.parametrize("error, reason", [
    (_os_write_error(errno.ENOSPC), "No space left on device"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    (_os_write_error(errno.EROFS), "Read-only file system"),
])
def test_a_failed_write_keeps_the_previous_file_removes_the_tmp_and_is_one_line(tmp_path, monkeypatch, error,
                                                                                reason):
    path = tmp_path / "weights.safetensors"
    atomic_save({"w": torch.arange(4.0)}, {"format": "x"}, path)
    before = path.read_bytes()
    _failing_writer(monkeypatch, error)
    with pytest.raises(CheckpointError) as info:
        atomic_save({"w": torch.zeros(1000)}, {"format": "x"}, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and reason in message and "unchanged" in message
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_full_disk_during_training_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys,
                                                                                  monkeypatch):
    out = tmp_path / "run"
    calls = _failing_writer(monkeypatch, _os_write_error(errno.ENOSPC), fail_on_call=2)
    argv = ["train", "simclr_quick", "--out", str(out),
            *_set(tiny_overrides("simclr", "train.steps=4", "train.checkpoint_every=2"))]
    code, _, err = _cli(capsys, *argv)
    line = _assert_one_line(code, err, "training stopped at step 4", "No space left on device",
                            f"the last good checkpoint is {out / CHECKPOINT_NAME}")
    assert "unchanged" in line and len(calls) == 2
    assert read_header(out / CHECKPOINT_NAME)[0]["step"] == "2" and load_file(str(out / CHECKPOINT_NAME))
    assert not list(out.glob("*.tmp"))
    monkeypatch.undo()  # space again: the run continues from the kept checkpoint
    code, out_text, err = _cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert json.loads(out_text.strip().splitlines()[-1])["start_step"] == 2


def test_a_full_disk_while_logging_metrics_stops_in_one_line_and_keeps_the_checkpoint(tmp_path, capsys,
                                                                                    monkeypatch):
    import builtins

    import wildssl.train.logging as train_logging

    appends = []

    def open_on_a_disk_that_fills(file, mode="r", *args, **kwargs):
        if mode == "a":
            appends.append(file)
            if len(appends) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(train_logging, "open", open_on_a_disk_that_fills, raising=False)
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "train", "simclr_quick", "--out", str(out),
                        *_set(tiny_overrides("simclr", "train.steps=4", "train.checkpoint_every=1")))
    _assert_one_line(code, err, "training stopped at step 3", f"cannot append to {out / 'metrics.jsonl'}",
                     "No space left on device", f"the last good checkpoint is {out / CHECKPOINT_NAME}")
    assert read_header(out / CHECKPOINT_NAME)[0]["step"] == "2"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real one-step SimCLR run directory (tiny), shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    train(build_config("simclr_quick", tiny_overrides("simclr", "train.steps=1")), run)
    return run


def test_export_to_a_read_only_place_or_below_a_file_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    code, _, err = _cli(capsys, "export", "--checkpoint", str(tiny_run), "--out", str(a_file / "e.safetensors"))
    line = _assert_one_line(code, err, f"cannot write {a_file / 'e.safetensors'}", "nothing was written")
    assert f"{a_file} is a file, not a folder" in line and "free some space" not in line  # it said "File exists"

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    if os.geteuid() == 0:  # root writes through permissions: the file system's refusal is simulated
        _failing_writer(monkeypatch, _os_write_error(errno.EROFS), after_bytes=0)
        reason = "Read-only file system"
    else:
        read_only.chmod(0o555)
        reason = "Permission denied"
    target = read_only / "encoder.safetensors"
    code, _, err = _cli(capsys, "export", "--checkpoint", str(tiny_run), "--out", str(target))
    _assert_one_line(code, err, f"cannot write {target}", reason)
    read_only.chmod(0o755)
    assert list(read_only.iterdir()) == []


def test_out_naming_a_file_or_an_unwritable_place_is_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    tiny = _set(tiny_overrides("simclr", "train.steps=1"))
    code, _, err = _cli(capsys, "train", "simclr_quick", "--out", str(a_file), *tiny)
    _assert_one_line(code, err, f"--out {a_file} is a file")
    code, _, err = _cli(capsys, "train", "simclr_quick", "--out", str(a_file / "run"), *tiny)
    _assert_one_line(code, err, f"cannot write the run directory {a_file / 'run'}")
    assert a_file.read_text() == "keep me"

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    if os.geteuid() == 0:
        def refuse(self, *args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        monkeypatch.setattr(Path, "write_text", refuse)
        reason = "Read-only file system"
    else:
        read_only.chmod(0o555)
        reason = "Permission denied"
    code, _, err = _cli(capsys, "train", "simclr_quick", "--out", str(read_only / "run"), *tiny)
    _assert_one_line(code, err, f"cannot write the run directory {read_only / 'run'}", reason)
    read_only.chmod(0o755)


# -- damaged and hostile checkpoint files ------------------------------------------------------------------

def _tampered(source: Path, target: Path, **changes) -> Path:
    """A copy of ``source`` whose metadata entries are replaced by ``changes`` (None deletes an entry)."""
    metadata, _ = read_header(source)
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file(load_file(str(source)), str(target), metadata=metadata)
    return target


def _config_with(run: Path, **model_changes) -> str:
    config = json.loads(read_header(run / CHECKPOINT_NAME)[0]["config"])
    config["model"].update(model_changes)
    return json.dumps(config)


def _tampering_cases(run: Path) -> dict[str, tuple[dict, str]]:
    config = json.loads(read_header(run / CHECKPOINT_NAME)[0]["config"])
    no_model = json.dumps({k: v for k, v in config.items() if k != "model"})
    return {
        "config not JSON": ({"config": "{'model': nope"}, "'config' entry of its metadata is not valid JSON"),
        "config missing": ({"config": None}, "has no 'config' entry"),
        "no model": ({"config": no_model}, "no 'model' section"),
        "config a list": ({"config": "[1, 2, 3]"}, "is a JSON list, expected an object"),
        "model a list": ({"config": json.dumps({**config, "model": ["tiny"]})}, "'model' section of its config is a JSON list"),
        "unknown model key": ({"config": _config_with(run, widht=64)}, "unknown model key 'widht'"),
        "bad model value": ({"config": _config_with(run, depth=True)}, "model.depth=true is invalid"),
        "unknown encoder": ({"config": _config_with(run, name="gigantic")}, "unknown encoder 'gigantic'"),
        "wrong shapes": ({"config": _config_with(run, embed_dim=64)}, "has shape"),
        "other depth": ({"config": _config_with(run, depth=2)}, "missing 12 keys (e.g. blocks.1."),
        "unknown format": ({"format": "pickle"}, "unknown format 'pickle'"),
        "bad eval_network": ({"eval_network": "both"}, "eval_network 'both'"),
    }


CASES = ["config not JSON", "config missing", "no model", "config a list", "model a list", "unknown model key",
         "bad model value", "unknown encoder", "wrong shapes", "other depth", "unknown format", "bad eval_network"]


@pytest.mark.parametrize("case", CASES)
def test_tampered_checkpoint_metadata_is_one_line_for_load_eval_and_export(tiny_run, tmp_path, capsys, case):
    changes, fragment = _tampering_cases(tiny_run)[case]
    bad = _tampered(tiny_run / CHECKPOINT_NAME, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(CheckpointError, match=None) as info:
        load_encoder(bad)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    for argv in (["eval", "knn", "--checkpoint", str(bad), "--train", DATA, "--test", DATA, "--json"],
                 ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "e.safetensors")]):
        code, out, err = _cli(capsys, *argv)
        _assert_one_line(code, err, fragment)
        assert out == ""
    assert not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize("changes, fragment", [
    ({"config": "not json"}, "not valid JSON"),
    ({"optimizer": "{"}, "'optimizer' entry of its metadata is not valid JSON"),
    ({"optimizer": "{}"}, "optimizer state"),
    ({"extra": "7"}, "'extra' entry of its metadata is a JSON int"),
    ({"step": "two"}, "step 'two'"),
    ({"format": "wildssl-encoder"}, "is not a wildssl training checkpoint"),
])
def test_resuming_from_tampered_metadata_is_one_line(tiny_run, tmp_path, capsys, changes, fragment):
    run = tmp_path / "run"
    run.mkdir()
    _tampered(tiny_run / CHECKPOINT_NAME, run / CHECKPOINT_NAME, **changes)
    argv = ["train", "simclr_quick", "--out", str(run), "--resume",
            *_set(tiny_overrides("simclr", "train.steps=2"))]
    code, _, err = _cli(capsys, *argv)
    _assert_one_line(code, err, fragment)


class _TouchWhenUnpickled:
    """A pickle payload: unpickling it creates ``marker`` (harmless, and visible)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickle_given_as_a_checkpoint_is_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"weights": _TouchWhenUnpickled(marker)}))
    zipped = tmp_path / "checkpoint.pt"
    torch.save({"weights": _TouchWhenUnpickled(marker)}, zipped)
    for path in (raw, zipped):
        for argv in (["eval", "knn", "--checkpoint", str(path), "--train", DATA, "--test", DATA],
                     ["export", "--checkpoint", str(path), "--out", str(tmp_path / "e.safetensors")]):
            code, _, err = _cli(capsys, *argv)
            # eval knn reads a file that is no wildssl safetensors as a peer's (as eval all does): torch.load's
            # weights_only reader names it in its own words
            reader = (f"cannot read {path} with torch.load(weights_only=True)" if argv[0] == "eval" and
                      path.suffix == ".pt" else f"cannot read checkpoint {path}")
            _assert_one_line(code, err, reader)
    assert not marker.exists()
    pickle.loads(raw.read_bytes())  # the payload does work when unpickled
    assert marker.exists()


class LargeAllocationGuard(TorchDispatchMode):
    """Fails any tensor creation on a real device larger than ``limit`` bytes, before it allocates:
    each factory call is first run on the meta device to learn its size."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.largest = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if any(a.name == "device" for a in func._schema.arguments) and (
                device is None or torch.device(device).type != "meta"):
            probe = func(*args, **{**kwargs, "device": torch.device("meta")})
            size = sum(t.numel() * t.element_size() for t in tree_leaves(probe) if isinstance(t, torch.Tensor))
            self.largest = max(self.largest, size)
            if size > self.limit:
                raise AssertionError(f"{func} would allocate {size / 2**20:.0f} MiB")
        return func(*args, **kwargs)


def test_a_100_byte_file_declaring_a_6_5b_encoder_fails_in_one_line_without_allocating(tmp_path, capsys):
    bomb = tmp_path / "bomb.safetensors"
    save_file({}, str(bomb), metadata={"format": "wildssl-encoder",
                                       "config": json.dumps({"model": {"name": "6.5b"}})})
    assert bomb.stat().st_size < 150
    guard = LargeAllocationGuard(limit=16 * 2**20)
    with guard, pytest.raises(CheckpointError, match="does not match the model: missing 390 keys"):
        load_encoder(bomb)
    assert guard.largest < 2**20
    with LargeAllocationGuard(limit=16 * 2**20):  # even for a random initialization of what it declares
        code, _, err = _cli(capsys, "eval", "knn", "--checkpoint", str(bomb), "--random-init", "--train", DATA,
                            "--test", DATA)
    _assert_one_line(code, err, "missing 390 keys")


def test_every_test_cited_in_docs_reliability_exists():
    tests = Path(__file__).resolve().parent
    text = (tests.parent / "docs" / "reliability.md").read_text()
    cited = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", text)
    assert len(cited) > 20
    sources = {path.name: path.read_text() for path in tests.glob("test_*.py")}
    for file, name in cited:
        where = [sources[file]] if file else list(sources.values())
        assert any(re.search(rf"^def {name}\(", source, re.M) for source in where), (file, name)


def test_a_run_of_the_other_sharding_is_not_trained_over(tmp_path):
    """A folder holding an FSDP run (checkpoint.dcp/) was trained over from step 0 by a run without that switch,
    even with --resume ("no checkpoint yet"): its metrics and config were rewritten."""
    from conftest import tiny_config
    from wildssl.errors import CheckpointError
    from wildssl.train import fsdp
    from wildssl.train.engine import train

    run = tmp_path / "run"
    (run / fsdp.SHARDED_CHECKPOINT).mkdir(parents=True)
    (run / fsdp.SHARDED_CHECKPOINT / fsdp.RUN_STATE).write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for resume in (False, True):
        with pytest.raises(CheckpointError, match=r"holds a run written as checkpoint.dcp/ \(train.sharding=fsdp\); "
                                                  r".*--set train.sharding=fsdp"):
            train(tiny_config("simclr", "train.steps=1"), run, resume=resume)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_eval_encoder_teacher_on_a_method_without_one_is_refused_before_training(tmp_path):
    """eval.encoder=teacher on SimCLR ended in a raw ValueError at the first online k-NN."""
    from conftest import tiny_config
    from wildssl.errors import ConfigError
    from wildssl.train.engine import train

    with pytest.raises(ConfigError, match="^eval.encoder=teacher, but method simclr has no teacher encoder"):
        train(tiny_config("simclr", "train.steps=1", "eval.encoder=teacher"), tmp_path / "run")


def test_a_second_process_cannot_train_a_run_directory_that_is_being_trained(tmp_path, capsys):
    """Two `wildssl train` of one --out at once interleaved their metrics rows (steps 0, 0, 10, 10, ...), a later
    start dropped the first's rows, and both exited 0 while the checkpoint on the disk was only one of them: the
    run directory is locked while a process trains it, and the lock goes with the process."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from wildssl.train.run import prepare_out_dir
        lock = prepare_out_dir(Path({str(out)!r}), False)
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = _cli(capsys, "train", "simclr_quick", "--out", str(out), *_set(tiny_overrides("simclr")))
        _assert_one_line(code, err, f"run directory {out} is being trained by process {holder.pid} on ",
                         "wait for it to end")
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = _cli(capsys, "train", "simclr_quick", "--out", str(out), *_set(tiny_overrides("simclr", "train.steps=1")))
    assert code == 0, err  # the lock went with the process that held it
    code, _, err = _cli(capsys, "train", "simclr_quick", "--out", str(out), "--resume",
                        *_set(tiny_overrides("simclr", "train.steps=2")))
    assert code == 0, err  # and with this one, at the end of its run


def test_a_run_started_with_a_relative_data_path_resumes_from_another_working_directory(tmp_path, monkeypatch, capsys):
    """A requeued job starts in another directory: the relative --data was "not found" there, and the absolute path
    was refused as another config ('images' -> '/.../images'). A path that ends with the recorded one is the same."""
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "project" / "images" / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (16, 16), (30 * i, 90, 10)).save(tmp_path / "project" / "images" / name / f"{i}.png")
    (tmp_path / "elsewhere").mkdir()
    argv = ["train", "simclr_quick", "--out", str(tmp_path / "run"),
            *_set(tiny_overrides("simclr", "train.batch_size=8", "eval.knn_every=0"))]
    monkeypatch.chdir(tmp_path / "project")
    code, _, err = _cli(capsys, *argv, "--data", "images", "--set", "train.steps=2")
    assert code == 0, err
    monkeypatch.chdir(tmp_path / "elsewhere")
    for spelling in (str(tmp_path / "project" / "images"), "../project/images"):
        steps = 3 if spelling.startswith("/") else 4
        code, out, err = _cli(capsys, *argv, "--data", spelling, "--set", f"train.steps={steps}", "--resume")
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["start_step"] == steps - 1
    import shutil

    shutil.copytree(tmp_path / "project" / "images", tmp_path / "other" / "data")  # other files: not the same path
    code, _, err = _cli(capsys, *argv, "--data", str(tmp_path / "other" / "data"), "--set", "train.steps=5", "--resume")
    assert code == 2 and "the config differs from the checkpoint's (data.train:" in err
