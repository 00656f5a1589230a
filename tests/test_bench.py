"""``wildssl bench``: the JSON carries every figure, and the bare work replays exactly the method's encoder calls.

No test here depends on timing: rates are only checked to be positive and finite.
"""

import json
import math

import numpy as np
import pytest
from conftest import TINY_METHOD, TINY_MODEL, tiny_ab_overrides, tiny_overrides
from PIL import Image

from wildssl.cli import main
from wildssl.models.text import TextTransformer
from wildssl.models.vit import VisionTransformer
from wildssl.train.bench import record_backbone_calls, replay_step
from wildssl.train.config import build_config
from wildssl.train.run import build_run, make_loaders
from wildssl.train.step import to_device, training_step

TINY_IBOT = TINY_METHOD["dino"] + ["method.patch_out_dim=64"]
NUMBERS = ("pipeline_images_per_s", "pipeline_images_per_cpu_s", "decode_images_per_cpu_s", "bare_images_per_s",
           "step_images_per_s", "step_over_bare", "pipeline_over_step")


def _jpeg_folder(root, count=24, size=(40, 48)):
    root.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"{index:03d}.jpg")
    return root


def test_bench_json_has_every_figure_and_simclr_replays_its_one_student_call_on_both_views(tmp_path, capsys,
                                                                                           caplog):
    import logging

    data = _jpeg_folder(tmp_path / "images")
    out = tmp_path / "bench.json"
    argv = ["bench", "simclr_quick", "--data", str(data), "--steps", "1", "--warmup", "1", "--json", str(out)]
    for item in tiny_overrides("simclr", "train.batch_size=8", "optim.warmup_epochs=50"):
        if not item.startswith("data.train="):
            argv += ["--set", item]
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "(c)/(b) = " in printed and "(a)/(c) = " in printed
    assert "never reaches its peak" not in caplog.text  # a few timed steps are no training run: no schedule warning
    result = json.loads(out.read_text())
    for key in NUMBERS:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["step_over_bare"] == pytest.approx(result["step_images_per_s"] / result["bare_images_per_s"])
    assert result["pipeline_over_step"] == pytest.approx(result["pipeline_images_per_s"] / result["step_images_per_s"])
    for key in ("step_peak_mib", "bare_peak_mib"):  # a rise of the resident set on the CPU: may be 0, never negative
        assert math.isfinite(result[key]) and result[key] >= 0, key
    assert result["memory_kind"] == "cpu_peak_rss_rise" and result["pipeline_views"] is True
    assert result["images_per_step"] == 8 and result["data"] == {"train": str(data)}
    # SimCLR embeds its two views of the 8 images in one student call with gradients, and nothing else
    assert result["backbone_calls"] == [{"network": "student.backbone", "entry": "forward",
                                         "input": [16, 3, 16, 16], "kwargs": {}, "grad": True}]


def test_bench_without_data_files_says_which_key_to_set(capsys):
    argv = ["bench", "simclr_quick", "--set", "data.train=", "--steps", "1"]
    assert main(argv) == 2
    assert "data.train" in capsys.readouterr().err


def test_bench_pipeline_steps_under_two_is_one_line_naming_that_option(capsys):
    """--pipeline-steps 0 was taken as "the default" without a word; the error for too few batches named --steps."""
    for value in ("0", "1"):
        argv = ["bench", "simclr_quick", "--pipeline-steps", value, "--steps", "1"]
        for item in tiny_overrides("simclr"):
            argv += ["--set", item]
        assert main(argv) == 2
        assert capsys.readouterr().err.strip() == (f"wildssl: error: --pipeline-steps {value}: the pipeline is timed "
                                                   "over at least 2 batches (the first is not timed)")


def test_bench_steps_beyond_a_runs_limit_and_a_json_path_it_cannot_write_fail_before_it_runs(tmp_path, capsys):
    """--steps 1000000000 tried to allocate 7.5 GiB of schedules; --json under a file failed after the whole bench."""
    for steps in ("1000000000", "99999999999999999999"):
        assert main(["bench", "simclr_quick", "--steps", steps]) == 2
        err = capsys.readouterr().err
        assert "need more than the 10000000 steps a run supports" in err and "Traceback" not in err, err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["bench", "simclr_quick", "--steps", "1", "--json", str(blocker / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wildssl: error: --json {blocker / 'b.json'}: cannot make its folder"), err


CASES = {
    "dino": ("dino_quick", tiny_overrides("dino")),
    "ibot": ("ibot_quick", TINY_MODEL + TINY_IBOT),
    "mae": ("mae_quick", tiny_overrides("mae")),
    "ijepa": ("ijepa_quick", tiny_overrides("ijepa")),
    "ab_dino": ("ab_dino_quick", tiny_ab_overrides("dino")),
    "clip": ("clip_quick", tiny_overrides("clip")),
    "ab_clip": ("ab_clip_quick", tiny_ab_overrides("clip")),
}


class _EmbeddingCounter:
    """Counts forward and backward passes through every encoder's input embedding (a ViT's patch embedding,
    a text tower's token embedding): an independent count of the encoder calls (each call embeds its
    inputs once) and of the calls that were backpropagated."""

    def __init__(self, method):
        self.forward, self.backward, self.handles = {}, {}, []
        for name, module in method.named_modules():
            embedding = {VisionTransformer: "patch_embed", TextTransformer: "token_embedding"}.get(type(module))
            if embedding is not None:
                embedding = getattr(module, embedding)
                self.forward[name] = self.backward[name] = 0
                self.handles.append(embedding.register_forward_hook(self._bump(self.forward, name)))
                self.handles.append(embedding.register_full_backward_hook(self._bump(self.backward, name)))

    @staticmethod
    def _bump(counts, name):
        def hook(*_):
            counts[name] += 1
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


# the counter's backward hooks on the embeddings warn that the images need no gradient: they never do
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("case", sorted(CASES))
def test_replay_makes_the_same_backbone_calls_as_the_method_step_and_backpropagates_only_the_gradient_ones(
        case, tmp_path):
    recipe, overrides = CASES[case]
    config = build_config(recipe, overrides + ["train.steps=2"])
    run = build_run(config, tmp_path / "run")
    run.method.train()
    batches = {name: to_device(batch, run.device)
               for name, batch in zip(run.streams, next(zip(*make_loaders(run, 0, 1).values())))}
    counter = _EmbeddingCounter(run.method)
    try:
        with record_backbone_calls(run.method) as calls:
            training_step(run, batches, 0)
        method_calls, method_backward = dict(counter.forward), dict(counter.backward)
        for counts in (counter.forward, counter.backward):
            counts.update(dict.fromkeys(counts, 0))
        replay_step(run.method, calls, config["train"]["precision"], run.device)()
    finally:
        counter.close()
    recorded = {name: sum(call.network == name for call in calls) for name in method_calls}
    assert recorded == method_calls and sum(recorded.values()) > 0
    assert counter.forward == method_calls  # every recorded call replayed once
    assert counter.backward == method_backward  # the student's calls backpropagated, the teacher's not
    assert all(not call.grad for call in calls if call.network.startswith("teacher."))
    assert all(p.grad is None for p in run.method.parameters())  # the replay leaves no gradients behind
    kwargs = {name for call in calls for name in call.kwargs}
    expected = {"dino": set(), "ab_dino": set(), "ibot": {"mask"}, "mae": {"keep_indices"},
                "ijepa": {"keep_indices", "keep_valid"}, "clip": set(), "ab_clip": set()}[case]
    assert kwargs == expected
    if case in ("clip", "ab_clip"):  # the text tower is part of the network work, with gradients
        assert any(call.network == "student.text" and call.grad for call in calls)
    if case in ("dino", "ibot"):  # 2 global crops to the teacher; 2 global + 2 local crops to the student
        batch = run.batch_sizes["train"]
        images = {name: sum(len(c.inputs) for c in calls if c.network == name) for name in recorded}
        assert images == {"student.backbone": 4 * batch, "teacher.backbone": 2 * batch}
