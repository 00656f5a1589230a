import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_feature_set
from wildssl.data import open_source
from wildssl.errors import DataError
from wildssl.eval.segmentation import PatchLinear, mean_iou, segmentation_confusion, segmentation_probe


def test_miou_matches_a_hand_computed_value():
    # truth rows, prediction columns: class 0: TP 3, FN 1, FP 2; class 1: TP 2, FN 2, FP 1;
    # class 2 never appears in truth or prediction and is left out of the mean
    confusion = torch.tensor([[3, 1, 0], [2, 2, 0], [0, 0, 0]])
    miou, per_class = mean_iou(confusion)
    assert per_class[0] == pytest.approx(3 / (3 + 1 + 2)) and per_class[1] == pytest.approx(2 / (2 + 2 + 1))
    assert per_class[2] is None
    assert miou == pytest.approx((3 / 6 + 2 / 5) / 2)


def test_confusion_upsamples_patch_logits_to_the_mask_and_skips_ignored_pixels():
    # 2x2 patch grid, 4x4 masks: each patch's token is the one-hot of its class, the probe is the identity
    model = PatchLinear(3, 3, (2, 2))
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(3))
        model.head.bias.zero_()
    model.norm.running_mean.zero_()
    model.norm.running_var.fill_(1.0)
    patch_classes = torch.tensor([0, 1, 2, 1])
    tokens = torch.eye(3)[patch_classes][None]  # (1, 4, 3)
    mask = torch.tensor([[0, 0, 1, 1],
                         [0, 2, 1, 255],
                         [2, 2, 1, 1],
                         [2, 255, 0, 1]])
    confusion = segmentation_confusion(model, tokens, [mask], torch.tensor([0]), 3, ignore_index=255)
    # bilinear upsampling of one-hot logits keeps each 2x2 quadrant's argmax: predicted
    # [[0,0,1,1],[0,0,1,1],[2,2,1,1],[2,2,1,1]]; the two 255 pixels count for nothing
    expected = torch.tensor([[3, 1, 0],   # truth 0: three predicted 0, one (bottom right) predicted 1
                             [0, 6, 0],   # truth 1
                             [1, 0, 3]])  # truth 2: one inside the top-left quadrant predicted 0
    assert torch.equal(confusion, expected)
    miou, _ = mean_iou(confusion)
    assert miou == pytest.approx((3 / 5 + 6 / 7 + 3 / 4) / 3)


def test_segmentation_probe_learns_patch_classes_from_separable_tokens():
    generator = torch.Generator().manual_seed(0)
    codes = 3.0 * torch.randn(4, 16, generator=generator)

    def make(n):
        classes = torch.randint(0, 4, (n, 16), generator=generator)  # 4x4 grid of patch classes
        tokens = codes[classes] + 0.2 * torch.randn(n, 16, 16, generator=generator)
        masks = [c.reshape(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1) for c in classes]  # 8x8 masks
        for m in masks:
            m[0, 0] = 9  # an ignored pixel per image
        return make_feature_set(tokens.mean(1), torch.zeros(n), patch=tokens, masks=masks)

    result = segmentation_probe(make(40), make(20), ignore_index=9, lrs=[1e-2], epochs=6, batch_size=8)
    assert result["num_classes"] == 4 and result["miou"] >= 0.9  # bilinear borders cost a little


def test_manifest_masks_are_read_as_class_maps(tmp_path):
    Image.new("RGB", (6, 4), (10, 20, 30)).save(tmp_path / "a.jpg")
    classes = np.array([[0, 1, 1, 2, 2, 11]] * 4, dtype=np.uint8)
    Image.fromarray(classes, mode="L").save(tmp_path / "a.png")
    Image.new("RGB", (6, 4)).save(tmp_path / "rgb.png")
    lines = [{"file": "a.jpg", "mask": "a.png", "label": 0}, {"file": "a.jpg", "label": 1},
             {"file": "a.jpg", "mask": "rgb.png"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    source = open_source(str(tmp_path / "m.jsonl"), load_size=8)
    assert torch.equal(source.mask(0), torch.from_numpy(classes.astype(np.int64)))
    assert source.mask(1) is None and "masks" not in source[0]  # masks stay out of the sample dict
    with pytest.raises(DataError, match="rgb.png .* RGB image; a mask must have one channel"):
        source.mask(2)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"file": "a.jpg", "mask": 3}))
    with pytest.raises(DataError, match='bad.jsonl:1: "mask" must be the path'):
        open_source(str(tmp_path / "bad.jsonl"))


def test_synthetic_scene_masks_mark_each_object_with_its_shape_inside_its_box():
    source = open_source("synthetic:scenes?n=6&size=32")
    for index in range(6):
        sample, mask = source[index], source.mask(index)
        assert mask.shape == (32, 32)
        for box, shape in zip(sample["boxes"], sample["box_labels"]):
            x0, y0, x1, y1 = (box * 32).tolist()
            inside = mask[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
            assert (inside == shape + 1).any()
        assert set(mask.unique().tolist()) <= {0} | {int(s) + 1 for s in sample["box_labels"]}
