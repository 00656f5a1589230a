"""End to end on the CPU: each self-supervised and bootstrapping method trains briefly on two-colour
synthetic scenes and its encoder beats the same architecture at random init on k-NN.

(CLIP, SLIP and SiLC have theirs in test_clip_method.py and test_slip_silc.py; MAE, I-JEPA and SlotMIM in
test_mae.py, test_ijepa.py and test_slotmim.py; iBOT has none yet: benchmarks/masked.md.)

Measured here (seed 0, 100 steps, k-NN top-1 trained vs random init, 8 classes): SimCLR 33% vs 23%;
DINO 30.4% vs 23.2%; AB_SimCLR and AB_CLIP pass the margin; AB_DINO (bootstrap weight 0.1) 28.4% vs 23.2%.
At seed 1 (2026-11-30, `train.seed=1`, which changes the initial weights too): SimCLR +8.6, DINO +8.6,
AB_SimCLR +6.6, AB_DINO +5.6, AB_CLIP +10.8 points. AB_DINO's headroom is thin at both seeds (+5.2 / +5.6), and
150 steps did not widen it (+2.4 / +9.4): its margin is the one to watch.
"""

import math

import pytest

from conftest import KNN_MARGIN, train_and_compare_knn

SSL = ["method.temperature=0.1", "method.crop_scale=[0.25, 1.0]", "optim.lr=0.003"]
# A 100-step run needs a fast teacher: with the recipes' 0.99+ momentum the targets stay at their
# random initialization for the whole run.
FAST_TEACHER = ["ema.momentum=0.9", "ema.momentum_end=0.9"]
# dino_quick is tuned for 32-px photos (SimCLR's CIFAR colours on every crop, mean-patch pooling); on the
# two-colour scenes of this test, 100 steps of those settings gain under 1 point. The test pins the DINO
# paper's colour pipelines and the class token, the settings it was measured with.
DISTILL = ["method.n_local=2", "method.out_dim=256", "method.teacher_temp=0.04", "optim.lr=0.002",
           "method.photometric=dino", "method.pool=cls", "eval.pool=cls"] + FAST_TEACHER
AB = ["method.ab_decoder_depth=1", "method.ab_n_crops=3"] + FAST_TEACHER
TEXT = ["method.tokenizer=byte", "method.vocab_size=259", "method.context_length=32"]

CASES = {
    "simclr": SSL,
    "dino": DISTILL,
    "ab_simclr": SSL + AB,
    # AB_DINO's psi_AB is a K x D embedding of its own, random at the start, so in a short run the
    # bootstrap loss is mostly noise for the backbone (weight 1: 25.0% vs 23.2% at 150 steps; weight 0.3:
    # teacher entropy swings 0.1-4 nats, embedding std falls to 0.04, 28.0% at 100 steps). A small weight
    # keeps DINO's signal in charge while every part of the bootstrap path still trains:
    # weight 0.1, 100 steps: 28.4% vs 23.2% (seed 0), at 2/3 of the 150-step cost.
    "ab_dino": DISTILL + AB + ["method.ab_loss_ratio=0.1"],
    "ab_clip": TEXT + AB,
}
# Distillation losses are no progress measure in a short run: at step 0 the student equals the teacher
# (loss = teacher entropy, near 0 for a fresh head at temperature 0.04), and the loss rises as the
# teacher's distribution spreads. For those the test checks that neither collapse happened instead.
DISTILLATION = {"dino", "ab_dino"}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_training_beats_random_init_on_knn(tmp_path, recipe):
    metric = "teacher_entropy" if recipe in DISTILLATION else "loss"
    values, trained, initial = train_and_compare_knn(recipe, tmp_path, *CASES[recipe], metric=metric)
    if recipe in DISTILLATION:
        uniform = math.log(256)
        assert 0.05 < values[-1] < 0.99 * uniform, values  # neither one-hot nor uniform collapse
    else:
        assert sum(values[-3:]) / 3 < sum(values[:3]) / 3, values
    assert trained > initial + KNN_MARGIN, (trained, initial)
