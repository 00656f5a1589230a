"""End to end on the CPU: each self-supervised and bootstrapping method trains briefly on two-colour
synthetic scenes and its encoder beats the same architecture at random init on k-NN.

(CLIP, SLIP and SiLC have theirs in test_clip_method.py and test_slip_silc.py; MAE, I-JEPA, iBOT and SlotMIM
in test_mae.py, test_ijepa.py, test_ibot.py and test_slotmim.py.)

Measured (100 steps, k-NN top-1 gain of the trained encoder over its random init, 8 classes, seeds 0 / 1 / 2,
benchmarks/e2e_seeds.md): with four blocks (an AMD EPYC) SimCLR +6.4 / +8.6 / +6.4, AB_DINO +6.8 / +8.0 / +8.2; with
two (conftest.TWO_BLOCKS; an Intel Xeon) DINO +7.8 / +7.6 / +7.4, AB_SimCLR +10.8 / +7.2 / +8.4, AB_CLIP (its recipe's
bootstrap weight 0.1) +14.4 / +14.4 / +11.6.
"""

import pytest

from conftest import DISTILL, FAST_TEACHER, KNN_MARGIN, TWO_BLOCKS, assert_no_collapse, train_and_compare_knn

SSL = ["method.temperature=0.1", "method.crop_scale=[0.25, 1.0]", "optim.lr=0.003"]
# DINO's settings (DISTILL) are in conftest.py: test_ibot.py trains iBOT on them too.
# The paper's bootstrap batch (base batch / n images, each with n crops), as these figures were measured with:
# ab_dino_quick's 4 images are for its own 32-image batch.
AB = ["method.ab_decoder_depth=1", "method.ab_n_crops=3", "data.bootstrap_batch_size=null"] + FAST_TEACHER
TEXT = ["method.tokenizer=byte", "method.vocab_size=259", "method.context_length=32"]

CASES = {
    "simclr": SSL,
    "dino": DISTILL + TWO_BLOCKS,
    "ab_simclr": SSL + AB + TWO_BLOCKS,
    # AB_DINO's psi_AB is a K x D embedding of its own, random at the start, so in a short run the
    # bootstrap loss is mostly noise for the backbone (weight 1: 25.0% vs 23.2% at 150 steps; weight 0.3:
    # teacher entropy swings 0.1-4 nats, embedding std falls to 0.04, 28.0% at 100 steps). A small weight
    # keeps DINO's signal in charge while every part of the bootstrap path still trains:
    # weight 0.1, 100 steps: 28.4% vs 23.2% (seed 0, with the former views: 2 local crops, batch 64, class token).
    "ab_dino": DISTILL + AB + ["method.ab_loss_ratio=0.1"],
    "ab_clip": TEXT + AB + TWO_BLOCKS,
}
# AB_SimCLR's 100-step gain swings with the seed and the machine's CPU kernels: with four blocks +13.4 / +6.6 / +12.8
# at seeds 0 / 1 / 2 on an AMD EPYC, +3.2 / +10.6 at seeds 0 / 1 on an Intel Xeon with AVX-512 (2026-12-02,
# benchmarks/e2e_seeds.py). One seed cannot clear the margin on every machine, so its test checks the mean gain of
# two seeds (each run must still lower its loss); with two blocks the Intel read +10.8 / +7.2 (mean +9.0).
SEEDS = {"ab_simclr": (0, 1)}
# Distillation losses are no progress measure in a short run: for those the test checks that neither
# collapse happened instead (conftest.assert_no_collapse says why).
DISTILLATION = {"dino", "ab_dino"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(CASES))
def test_training_beats_random_init_on_knn(tmp_path, recipe):
    metric = "teacher_entropy" if recipe in DISTILLATION else "loss"
    gains = []
    for seed in SEEDS.get(recipe, (0,)):
        run_dir = tmp_path / f"seed{seed}"
        run_dir.mkdir()
        values, trained, initial = train_and_compare_knn(recipe, run_dir, *CASES[recipe], f"train.seed={seed}",
                                                         metric=metric)
        if recipe in DISTILLATION:
            assert_no_collapse(values, prototypes=256)
        else:
            assert sum(values[-3:]) / 3 < sum(values[:3]) / 3, (seed, values)
        gains.append((seed, trained, initial))
    mean_gain = sum(trained - initial for _, trained, initial in gains) / len(gains)
    assert mean_gain > KNN_MARGIN, gains
