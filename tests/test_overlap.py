import torch
import torch.nn.functional as F

from wildssl.data.boxes import box_area
from wildssl.data.overlap import intersection_box, overlap_in_views, overlapping_views
from wildssl.data.views import CropSpec, crop_and_resize, make_views
from wildssl.models.roi_align import align_to_overlap

PATCH = 8  # pixels per patch of the 32 px views: a 4 x 4 patch grid


def _coordinate_image(size: int = 64) -> torch.Tensor:
    """(1, 2, size, size): channel 0 holds the x and channel 1 the y of each pixel centre, in [0, 1]."""
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    return torch.stack((centres.expand(size, size), centres[:, None].expand(size, size))).unsqueeze(0)


def _patch_map(view: torch.Tensor) -> torch.Tensor:
    """A translation-equivariant 'encoder': the mean of each patch, (B, C, 4, 4). On the coordinate
    image it returns where in the image each patch of the view lies."""
    return F.avg_pool2d(view, PATCH)


def _aligned_locations(box_a, box_b, flip_a, flip_b):
    image = _coordinate_image().expand(len(flip_a), -1, -1, -1)
    view_a = crop_and_resize(image, box_a, 32, flip_a)  # what the encoder sees (mirrored where flipped)
    view_b = crop_and_resize(image, box_b, 32, flip_b)
    overlap = overlap_in_views(box_a, box_b, flip_a, flip_b)
    return (align_to_overlap(_patch_map(view_a), overlap.in_a, flip_a),
            align_to_overlap(_patch_map(view_b), overlap.in_b, flip_b), overlap)


def test_overlap_alignment_maps_a_patch_to_the_same_place_in_the_other_view():
    # Known crops of a known image: view a is the top-left 3/4, view b the bottom-right 3/4, every flip
    # combination; they share the centre (0.25, 0.25, 0.75, 0.75) of the image.
    flip_a = torch.tensor([False, True, False, True])
    flip_b = torch.tensor([False, False, True, True])
    box_a = torch.tensor([[0.0, 0.0, 0.75, 0.75]] * 4, dtype=torch.float64)
    box_b = torch.tensor([[0.25, 0.25, 1.0, 1.0]] * 4, dtype=torch.float64)
    aligned_a, aligned_b, overlap = _aligned_locations(box_a, box_b, flip_a, flip_b)
    assert overlap.valid.all()
    # Cell (i, j) of the aligned grid is the (i, j)-th quarter of the shared region, in image orientation.
    centres = 0.25 + (torch.arange(4, dtype=torch.float64) + 0.5) / 4 * 0.5
    expected = torch.stack((centres.expand(4, 4), centres[:, None].expand(4, 4))).expand(4, -1, -1, -1)
    # A view patch is 0.75 / 4 of the image wide: each cell reads the patches around the place it stands for,
    # exactly inside the views; at a view's edge RoIAlign reads the edge patch (its centre is off by less
    # than half a patch).
    half_patch = 0.75 / 4 / 2
    for aligned in (aligned_a, aligned_b):
        assert (aligned - expected).abs().max() < half_patch
        assert torch.allclose(aligned[..., 1:3, 1:3], expected[..., 1:3, 1:3], atol=1e-9)
    # Both views agree cell by cell; ignoring the flips would put mirrored places side by side.
    assert (aligned_a - aligned_b).abs().max() < half_patch
    view_b = crop_and_resize(_coordinate_image().expand(4, -1, -1, -1), box_b, 32, flip_b)
    unflipped = align_to_overlap(_patch_map(view_b), overlap.in_b, torch.zeros(4, dtype=torch.bool))
    assert (unflipped[2:] - aligned_a[2:]).abs().max() > 0.2


def test_views_that_share_no_region_are_marked_invalid():
    box_a = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.0, 0.0, 0.5, 0.5]])
    box_b = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75]])
    no_flip = torch.zeros(2, dtype=torch.bool)
    overlap = overlap_in_views(box_a, box_b, no_flip, no_flip)
    assert overlap.valid.tolist() == [False, True]
    assert torch.allclose(overlap.in_a[1], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert torch.allclose(overlap.in_b[1], torch.tensor([0.0, 0.0, 0.5, 0.5]))


def test_second_crop_overlaps_the_first_by_the_requested_share_of_its_area():
    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    specs = [CropSpec(16, (0.05, 0.2))] * 2
    views = overlapping_views(images, specs, torch.Generator().manual_seed(0), min_overlap=0.3)
    covered = box_area(intersection_box(views[0].boxes, views[1].boxes)) / box_area(views[1].boxes)
    independent = make_views(images, specs, torch.Generator().manual_seed(0))
    covered_independent = (box_area(intersection_box(independent[0].boxes, independent[1].boxes))
                           / box_area(independent[1].boxes))
    # About a third of independent pairs qualify (measured 31%); ten attempts give 1 - 0.69^10 = 98%.
    assert (covered_independent >= 0.3).float().mean() < 0.45
    assert (covered >= 0.3 - 1e-6).float().mean() > 0.9
    # The first view is the one make_views draws from the same generator state.
    assert torch.equal(views[0].boxes, independent[0].boxes)
    assert views[1].images.shape == (400, 3, 16, 16)
