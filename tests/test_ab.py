"""Annotation bootstrapping: pair packing through the method, EMA invariants, and that every ablation
switch changes what it names and nothing else."""

import tempfile

import pytest
import torch
import torch.nn.functional as F
from conftest import PROCESS_GROUP, free_port, schedule_values, tiny_ab_overrides

from wildssl.data import collate, open_source
from wildssl.data.boxes import box_iou
from wildssl.data.views import make_views
from wildssl.methods import ab as ab_module
from wildssl.methods import build_initial_method, build_method
from wildssl.methods.base import StepContext, pooled
from wildssl.train.config import build_config


def _method(base="dino", *extra, seed=0):
    config = build_config(None, tiny_ab_overrides(base, *extra))
    torch.manual_seed(seed)
    method = build_method(config)
    if base == "clip":  # the byte tokenizer: made, not trained, so no data is read
        method.prepare({}, tempfile.mkdtemp())
    return method, config


def _batches(config, size=6):
    annotation = open_source(config["data"]["annotation"], load_size=16)
    bootstrap = open_source(config["data"]["bootstrap"], load_size=16)
    return {"annotation": collate([annotation[i] for i in range(size)]),
            "bootstrap": collate([bootstrap[i] for i in range(size // 2)])}


def _step(method, step=0):
    generator = torch.Generator().manual_seed(1234 + step)
    return StepContext(step, 10, generator, schedule_values(method, step), log=True)


class _Spy:
    """Wraps a function in the ab module and keeps its last arguments."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        original = getattr(ab_module, name)

        def spy(*args, **kwargs):
            self.calls.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(ab_module, name, spy)


@pytest.mark.parametrize("base", ["dino", "simclr"])
def test_bootstrap_loss_sees_all_n2_minus_n_ordered_pairs_with_teacher_targets(monkeypatch, base):
    spy = _Spy(monkeypatch, "bootstrap_loss")
    method, config = _method(base)
    batches = _batches(config)
    output = method(batches, _step(method))
    (student_logits, teacher_logits), kwargs = spy.calls[-1]
    n, images = 3, 3
    assert student_logits.shape[:2] == (images, n * n - n) == teacher_logits.shape[:2]
    assert student_logits.shape[-1] == teacher_logits.shape[-1]
    assert student_logits.requires_grad and not teacher_logits.requires_grad
    assert torch.isfinite(output["loss"])
    expected = output["metrics"]["base_loss"] + config["method"]["ab_loss_ratio"] * output["metrics"]["bootstrap_loss"]
    torch.testing.assert_close(output["loss"].detach(), expected)
    # The logged agreement is the fraction of pairs whose student and teacher argmax coincide.
    agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).double().mean().item()
    assert output["metrics"]["agreement"] == pytest.approx(agree)


def test_teacher_targets_are_the_teachers_distribution_on_the_target_crop(monkeypatch):
    spy = _Spy(monkeypatch, "bootstrap_loss")
    space_spy = []
    method, config = _method("simclr")
    original = method.annotation_space

    def recording(networks, images, annotation_batch, step):
        space = original(networks, images, annotation_batch, step)
        space_spy.append(space)
        return space

    method.annotation_space = recording
    method(_batches(config), _step(method))
    (_, teacher_logits), _ = spy.calls[-1]
    crop_logits = space_spy[-1].logits.view(3, 3, -1)  # (crop, image, K): crop-major
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    for image in range(3):
        for p, (_, target) in enumerate(pairs):
            torch.testing.assert_close(teacher_logits[image, p], crop_logits[target, image])


def _bootstrap_head_inputs(monkeypatch, method):
    """Record (phi, psi_AB) of every call of the bootstrap head's logits."""
    calls = []
    head = method.student["bootstrap"]
    original = head.logits

    def recording(phi, annotations):
        calls.append((phi, annotations))
        return original(phi, annotations)

    monkeypatch.setattr(head, "logits", recording)
    return calls


def _grad_norms(module, loss):
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [0.0 if g is None else g.norm().item() for g in grads]


def test_simclr_psi_ab_is_its_own_head_on_the_students_features_of_the_annotation_views(monkeypatch):
    """SimCLR's annotations are the other images' views: psi_AB reads the student's features of the second
    SimCLR view of each annotation image, the view the step draws first from its generator (the bootstrap
    crops draw from a generator of their own)."""
    method, config = _method("simclr", "method.ab_base_loss=false")
    calls = _bootstrap_head_inputs(monkeypatch, method)
    batches = _batches(config)
    step = _step(method)
    loss = method(batches, step)["loss"]
    _, psi = calls[-1]
    annotation = batches["annotation"]
    redrawn = make_views(annotation["image"], method.specs, torch.Generator().manual_seed(step.generator.initial_seed()),
                         aspect=annotation["aspect"])
    assert not torch.equal(redrawn[0].images, redrawn[1].images)
    features = pooled(method.student["backbone"](redrawn[1].images), "cls")
    expected = features @ method.student["bootstrap"].annotation_head.weight.T  # (K, D): one row per image
    torch.testing.assert_close(psi, expected)
    # psi_AB carries the bootstrap loss into the student's backbone, through the annotation views ...
    assert all(g > 0 for g in _grad_norms(method.student["backbone"].blocks, psi.sum()))
    # ... and its own head, while SimCLR's projection head is the base loss's alone.
    assert _grad_norms(method.student["bootstrap"].annotation_head, loss)[0] > 0
    assert all(g == 0 for g in _grad_norms(method.student["head"], loss))


def test_ab_simclr_targets_are_over_the_same_annotation_views_that_simclr_contrasts(monkeypatch):
    """The teacher's p(l | crop) is over the second views of the annotation images: the views SimCLR's loss
    reads in that step (one draw), projected by the teacher: cos(z_crop, z_l) / temperature."""
    method, config = _method("simclr")
    batches = _batches(config)
    step = _step(method)
    heads, spaces = [], []
    original_head = method.student["head"].forward
    monkeypatch.setattr(method.student["head"], "forward", lambda x: heads.append(x) or original_head(x))
    original_space = method.annotation_space

    def recording(networks, images, annotation_batch, step):
        spaces.append((networks, images, original_space(networks, images, annotation_batch, step)))
        return spaces[-1][2]

    method.annotation_space = recording
    method(batches, step)
    annotation = batches["annotation"]
    views = make_views(annotation["image"], method.specs, torch.Generator().manual_seed(step.generator.initial_seed()),
                       aspect=annotation["aspect"])
    with torch.no_grad():  # SimCLR's loss: one head call on the student's features of both redrawn views
        both = pooled(method.student["backbone"](torch.cat([views[0].images, views[1].images])), "cls")
    torch.testing.assert_close(heads[-1].detach(), both)
    networks, crops, space = spaces[-1]
    assert networks is method.teacher
    teacher = method.teacher
    with torch.no_grad():
        z_l = F.normalize(teacher["head"](pooled(teacher["backbone"](views[1].images), "cls")).double(), dim=-1)
        z_x = F.normalize(teacher["head"](pooled(teacher["backbone"](crops), "cls")).double(), dim=-1)
    expected = z_x @ z_l.T / config["method"]["temperature"]
    torch.testing.assert_close(space.logits.double(), expected, rtol=1e-4, atol=1e-4)


def test_ab_simclr_runs_each_annotation_view_through_the_students_backbone_once_with_the_two_pass_gradient(
        monkeypatch):
    """SimCLR's loss and psi_AB read one student pass of the second views (``step.memo``); the loss and the
    gradient are those of separate passes (the feature memo switched off, the views kept)."""
    method, config = _method("simclr")
    batches = _batches(config)
    backbone = method.student["backbone"]
    images_seen = []
    original = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda images, *a, **k: images_seen.append(len(images))
                        or original(images, *a, **k))
    shared = method(batches, _step(method))["loss"]
    annotation_images = sum(images_seen)
    assert annotation_images == 2 * len(batches["annotation"]["image"])  # two views, each once
    params = [p for p in backbone.parameters() if p.requires_grad]
    shared_grads = torch.autograd.grad(shared, params)

    class ForgetFeatures(dict):  # keeps the views, forgets the features: two passes, as before the memo
        def get(self, key, default=None):
            return default if key == "simclr_view_features" else super().get(key, default)

    step = _step(method)
    step.memo = ForgetFeatures()
    images_seen.clear()
    separate = method(batches, step)["loss"]
    assert sum(images_seen) == 3 * len(batches["annotation"]["image"])
    separate_grads = torch.autograd.grad(separate, params)
    torch.testing.assert_close(shared, separate)
    for a, b in zip(shared_grads, separate_grads):  # fp32: the sums run in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_clip_psi_ab_is_its_own_head_on_the_students_text_tower(monkeypatch):
    method, config = _method("clip", "method.ab_base_loss=false")
    calls = _bootstrap_head_inputs(monkeypatch, method)
    batches = _batches(config)
    loss = method(batches, _step(method))["loss"]
    _, psi = calls[-1]
    text = method.student["text"]
    tokens = method.tokenizer.encode_batch(batches["annotation"]["caption"], 40)
    expected = text.pooled_features(tokens) @ method.student["bootstrap"].annotation_head.weight.T
    torch.testing.assert_close(psi, expected)
    assert psi.shape[0] == len(batches["annotation"]["caption"])  # K = the captions of the annotation batch
    # The bootstrap loss trains the student's text tower through psi_AB, not CLIP's projections or scale.
    assert all(g > 0 for g in _grad_norms(text.blocks, loss))
    assert _grad_norms(method.student["bootstrap"].annotation_head, loss)[0] > 0
    for name in ("image_proj", "logit_scale"):
        assert all(g == 0 for g in _grad_norms(method.student[name], loss)), name
    assert all(g == 0 for g in _grad_norms(text.projection, loss))


def test_ab_clip_runs_the_students_text_tower_once_per_step_with_the_two_pass_gradient(monkeypatch):
    """CLIP's loss and psi_AB read one pass of the student's text tower (``step.memo``); the gradient is
    the one two separate passes give (the memo switched off by a step without it)."""
    method, config = _method("clip")
    batches = _batches(config)
    text = method.student["text"]
    passes = []
    original = text.forward_tokens
    monkeypatch.setattr(text, "forward_tokens", lambda tokens: passes.append(1) or original(tokens))
    shared = method(batches, _step(method))["loss"]
    assert len(passes) == 1
    shared_grads = torch.autograd.grad(shared, list(text.parameters()))

    class NoMemo(dict):  # a memo that forgets: every read misses, as before the memo existed
        def get(self, key, default=None):
            return default

    step = _step(method)
    step.memo = NoMemo()
    passes.clear()
    separate = method(batches, step)["loss"]
    assert len(passes) == 2
    separate_grads = torch.autograd.grad(separate, list(text.parameters()))
    torch.testing.assert_close(shared, separate)
    for a, b in zip(shared_grads, separate_grads):  # fp32: the sums run in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_dino_psi_ab_is_a_learned_embedding_of_the_prototypes(monkeypatch):
    method, config = _method("dino", "method.ab_base_loss=false")
    calls = _bootstrap_head_inputs(monkeypatch, method)
    loss = method(_batches(config), _step(method))["loss"]
    _, psi = calls[-1]
    head = method.student["bootstrap"]
    assert psi is head.annotation_embedding and psi.shape == (64, 32)  # (K prototypes, decoder width)
    assert _grad_norms(head, loss)[list(dict(head.named_parameters())).index("annotation_embedding")] > 0
    assert all(g == 0 for g in _grad_norms(method.student["head"], loss))


@pytest.mark.parametrize("base", ["dino", "simclr"])
def test_student_bootstrap_logits_are_fp32_under_bf16_autocast(monkeypatch, base):
    spy = _Spy(monkeypatch, "bootstrap_loss")
    method, config = _method(base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        method(_batches(config), _step(method))
    (student_logits, _), _ = spy.calls[-1]
    assert student_logits.dtype == torch.float32


def test_teacher_with_momentum_one_never_moves(tmp_path):
    from wildssl.train.engine import train

    config = build_config(None, tiny_ab_overrides("simclr", "train.steps=3", "ema.momentum=1.0",
                                                  "ema.momentum_end=1.0"))
    # weights = parameters; BatchNorm running statistics (buffers) follow the batches as in any teacher
    initial = {k: v.detach().clone() for k, v in build_initial_method(config).teacher.named_parameters()}
    train(config, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint.safetensors"))
    for key, value in initial.items():
        assert torch.equal(saved[f"method.teacher.{key}"], value), key
    moved = [k for k in initial if not torch.equal(saved[f"method.student.{k}"], initial[k])]
    assert moved, "the student should have trained"


def test_bootstrap_batch_is_the_base_batch_over_n_crops():
    method, config = _method("dino")
    assert method.stream_batch_size("bootstrap", 16) == 16 // 3


def _shared_state(a, b, prefix):
    keys = [k for k in a.state_dict() if k.startswith(prefix)]
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in keys) and keys


def test_no_box_tokens_replaces_only_the_box_tokens(monkeypatch):
    with_boxes, config = _method("dino")
    without, _ = _method("dino", "method.ab_box_tokens=false")
    for prefix in ("student.backbone.", "student.head.", "teacher."):
        assert _shared_state(with_boxes, without, prefix)
    decoder = without.student["bootstrap"].decoder
    boxes = torch.rand(2, 6, 4)
    tokens = decoder.box_tokenizer(boxes)
    assert torch.equal(tokens[0, 0], tokens[1, 5])  # every box gets the same (mask) tokens
    with_tokens = with_boxes.student["bootstrap"].decoder.box_tokenizer(boxes)
    assert not torch.equal(with_tokens[0, 0], with_tokens[1, 5])
    batches = _batches(config)
    out_a, out_b = with_boxes(batches, _step(with_boxes)), without(batches, _step(without))
    torch.testing.assert_close(out_a["metrics"]["base_loss"], out_b["metrics"]["base_loss"])
    assert not torch.isclose(out_a["metrics"]["bootstrap_loss"], out_b["metrics"]["bootstrap_loss"])


def test_no_ema_target_takes_targets_from_the_student():
    for ema_target, should_change in (("true", True), ("false", False)):
        method, config = _method("simclr", f"method.ab_ema_target={ema_target}")
        batches = _batches(config)
        before = method.bootstrap(batches["bootstrap"], batches["annotation"], _step(method))["loss"]
        if method.teacher is not None:
            with torch.no_grad():
                for param in method.teacher.parameters():
                    param.add_(0.5 * torch.randn_like(param))
        else:
            assert not should_change  # SimCLR has no teacher of its own: without EMA targets none is made
        after = method.bootstrap(batches["bootstrap"], batches["annotation"], _step(method))["loss"]
        assert (not torch.isclose(before, after)) == should_change


def test_photometric_ablation_changes_pixels_not_boxes(monkeypatch):
    spy = _Spy(monkeypatch, "pack_pairs")
    plain, config = _method("dino")
    augmented, _ = _method("dino", "method.ab_photometric=simclr")
    batches = _batches(config)
    plain.bootstrap(batches["bootstrap"], batches["annotation"], _step(plain))
    augmented.bootstrap(batches["bootstrap"], batches["annotation"], _step(augmented))
    (boxes_plain, flips_plain), _ = spy.calls[0]
    (boxes_aug, flips_aug), _ = spy.calls[1]
    assert torch.equal(boxes_plain, boxes_aug) and torch.equal(flips_plain, flips_aug)
    views_plain = ab_module.make_views(batches["bootstrap"]["image"], plain.bootstrap_specs,
                                       plain.bootstrap_generator(_step(plain)))
    views_aug = ab_module.make_views(batches["bootstrap"]["image"], augmented.bootstrap_specs,
                                     augmented.bootstrap_generator(_step(augmented)))
    assert not torch.allclose(views_plain[0].images, views_aug[0].images)


def test_base_loss_switch_removes_only_the_base_loss():
    with_base, config = _method("dino")
    without, _ = _method("dino", "method.ab_base_loss=false")
    batches = _batches(config)
    out_a, out_b = with_base(batches, _step(with_base)), without(batches, _step(without))
    assert "base_loss" not in out_b["metrics"]
    torch.testing.assert_close(out_a["metrics"]["bootstrap_loss"], out_b["metrics"]["bootstrap_loss"])
    torch.testing.assert_close(out_b["loss"], out_b["metrics"]["bootstrap_loss"] * config["method"]["ab_loss_ratio"])


def test_iou_range_0_to_1_is_the_method_without_the_ablation(monkeypatch):
    spy = _Spy(monkeypatch, "bootstrap_loss")
    default, config = _method("dino")
    explicit, _ = _method("dino", "method.ab_iou_range=[0.0, 1.0]")
    batches = _batches(config)
    sizes = []
    original = explicit.annotation_space
    explicit.annotation_space = lambda networks, images, *rest: (sizes.append(len(images))
                                                                 or original(networks, images, *rest))
    out_a = default.bootstrap(batches["bootstrap"], batches["annotation"], _step(default))
    out_b = explicit.bootstrap(batches["bootstrap"], batches["annotation"], _step(explicit))
    assert torch.equal(out_a["loss"], out_b["loss"])
    assert sizes == [3 * 3]  # the teacher sees the n crops of each image, as without the ablation
    assert spy.calls[-1][1]["valid"] is None and "iou_range_found" not in out_b["metrics"]


def test_iou_range_keeps_the_sources_and_gives_every_pair_its_own_in_range_target(monkeypatch):
    loss_spy = _Spy(monkeypatch, "bootstrap_loss")
    pair_spy = _Spy(monkeypatch, "pack_pairs")
    everything, config = _method("simclr")
    ranged, _ = _method("simclr", "method.ab_iou_range=[0.3, 0.7]")
    batches = _batches(config)
    targets_seen = []
    original = ranged.annotation_space

    def recording(networks, images, annotation_batch, step):
        space = original(networks, images, annotation_batch, step)
        targets_seen.append((images, space.logits))
        return space

    ranged.annotation_space = recording
    everything.bootstrap(batches["bootstrap"], batches["annotation"], _step(everything))
    output = ranged.bootstrap(batches["bootstrap"], batches["annotation"], _step(ranged))
    (sources, _), _ = pair_spy.calls[0]
    (ranged_sources, _), kwargs = pair_spy.calls[1]
    assert torch.equal(sources, ranged_sources)  # the student's crops are those of the plain method
    targets = kwargs["target_boxes"]  # (B, P, 4): one target per ordered pair
    n, images, pairs = 3, 3, [(i, j) for i in range(3) for j in range(3) if i != j]
    assert targets.shape == (images, n * n - n, 4)
    iou = torch.stack([torch.stack([box_iou(sources[b, i], targets[b, p]) for p, (i, _) in enumerate(pairs)])
                       for b in range(images)])
    assert ((iou >= 0.3) & (iou <= 0.7)).all(), iou
    (student_logits, teacher_logits), loss_kwargs = loss_spy.calls[-1]
    assert student_logits.shape[:2] == (images, n * n - n) and loss_kwargs["valid"].all()
    assert output["metrics"]["iou_range_found"] == 1.0
    # The teacher ran once on the n (n - 1) target crops (pair-major), and pair p's target is crop p.
    target_images, target_logits = targets_seen[-1]
    assert target_images.shape[0] == images * (n * n - n)
    torch.testing.assert_close(teacher_logits, target_logits.view(n * n - n, images, -1).transpose(0, 1))
    expected = ab_module.crops_at_boxes(batches["bootstrap"]["image"], targets, 16, torch.Generator())
    torch.testing.assert_close(target_images, expected)


def test_pairs_without_an_in_range_target_are_left_out_of_the_loss(monkeypatch):
    loss_spy = _Spy(monkeypatch, "bootstrap_loss")
    method, config = _method("dino", "method.ab_iou_range=[0.85, 1.0]")
    batches = _batches(config)
    output = method.bootstrap(batches["bootstrap"], batches["annotation"], _step(method))
    (student_logits, teacher_logits), kwargs = loss_spy.calls[-1]
    found = kwargs["valid"]
    assert 0 < found.sum() < found.numel()  # small crops rarely find a near-identical one: some left out
    assert output["metrics"]["iou_range_found"] == pytest.approx(found.float().mean().item())
    torch.testing.assert_close(output["loss"], ab_module.bootstrap_loss(student_logits[found], teacher_logits[found]))


def test_unknown_ablation_value_is_a_config_error():
    from wildssl.errors import ConfigError

    with pytest.raises(ConfigError):
        _method("dino", "method.ab_photometric=sepia")
    with pytest.raises(ConfigError, match="ab_n_crops"):
        _method("dino", "method.ab_n_crops=1")
    for bad in ("[0.5, 0.2]", "[0.0, 0.0]", "[0.3]", "[0.0, 1.5]"):
        with pytest.raises(ConfigError, match="method.ab_iou_range"):
            _method("dino", f"method.ab_iou_range={bad}")


# -- DDP: every AB method and every ablation switch trains under 2-process gloo, ranks stay equal (bug 4) ------
# Each method once with its base loss (DDP without find_unused_parameters) and once without (with it: the
# base heads then get no gradient, which crashed here before); the other switches ride along, one per run.
DDP_CASES = [
    ("simclr", ("method.ab_ema_target=false",)),
    ("dino", ("method.ab_box_tokens=false", "method.ab_iou_range=[0.2, 0.8]")),
    ("clip", ("method.ab_photometric=simclr",)),
    ("simclr", ("method.ab_base_loss=false",)), ("dino", ("method.ab_base_loss=false",)),
    ("clip", ("method.ab_base_loss=false",)),
]


def _ddp_worker(rank: int, out_dir: str) -> None:
    import faulthandler
    import os

    import torch.distributed as torch_dist

    from wildssl.distributed import cleanup_distributed, setup_distributed
    from wildssl.train import engine

    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    # Should a worker hang (as in the gloo teardown deadlock released below), it prints its Python stack before
    # the test's 300 s deadline, and pytest shows it with the failure.
    faulthandler.dump_traceback_later(240, exit=False)
    torch.set_num_threads(1)
    setup_distributed()
    runs = []
    build_run = engine.build_run
    engine.build_run = lambda *args, **kwargs: runs.append(build_run(*args, **kwargs)) or runs[-1]
    try:
        for index, (base, extra) in enumerate(DDP_CASES):
            config = build_config(None, tiny_ab_overrides(base, "train.steps=2", "train.checkpoint_every=0",
                                                          "data.bootstrap_batch_size=4", *extra))
            initial = dict(build_initial_method(config).named_parameters())
            engine.train(config, f"{out_dir}/{index}")
            params = dict(runs[-1].method.named_parameters())
            flat = torch.cat([p.detach().flatten().double() for p in params.values()])
            gathered = [torch.empty_like(flat) for _ in range(2)]
            torch_dist.all_gather(gathered, flat)
            case = f"ab_{base} {' '.join(extra)}"
            assert torch.equal(gathered[0], gathered[1]), f"{case}: the ranks' weights differ"
            assert not torch.equal(params["student.backbone.cls_token"], initial["student.backbone.cls_token"]), case
        torch_dist.barrier()  # no rank may tear the group down while the other still talks to it
    finally:
        faulthandler.cancel_dump_traceback_later()
        engine.build_run = build_run
        cleanup_distributed()
        # The DDP wrappers hold the last reference to the group: release them while `gathered` is still alive, so
        # that gloo's worker thread never needs the GIL to drop the all_gather above while the group's destructor
        # joins it with the GIL held (the deadlock of 2 in 4 runs on a loaded machine; see cleanup_distributed).
        runs.clear()


@PROCESS_GROUP
def test_every_ab_method_and_ablation_trains_under_two_process_ddp_with_equal_weights(tmp_path, monkeypatch):
    import time

    port = free_port()
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("WORLD_SIZE", "2"),
                        ("CUDA_VISIBLE_DEVICES", ""), ("OMP_NUM_THREADS", "1")):
        monkeypatch.setenv(name, value)
    context = torch.multiprocessing.start_processes(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=False,
                                                    start_method="spawn")
    deadline = time.monotonic() + 300
    # join() re-raises a worker's exception with its traceback; the deadline guards against a hung collective.
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("DDP workers did not finish within 300 s")


def test_an_iou_range_no_pair_can_reach_raises_a_bootstrap_alarm(tmp_path):
    """ab_iou_range=[1, 1]: every pair was left out, the bootstrap loss was 0 at every step, and the run ended
    with no alarm, the same run as ab_loss_ratio=0."""
    from conftest import tiny_ab_overrides
    from wildssl.train.engine import train

    config = build_config(None, tiny_ab_overrides("simclr", "method.ab_iou_range=[1.0, 1.0]", "train.steps=3",
                                                  "train.log_every=1", "eval.knn_every=0"))
    summary = train(config, tmp_path)
    assert any(alarm.startswith("bootstrap alarm: no pair of crops found a target") for alarm in summary["alarms"])
