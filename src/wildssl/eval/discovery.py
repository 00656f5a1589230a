"""Unsupervised object discovery from the last block's cls attention (DINO, Caron et al. 2021; seed 004).

For each image, the cls token's attention to the patches in the last block, averaged over heads and
renormalized, ``a`` ``(P,)``, gives a mask: the smallest set of patches, taken from the most attended
down, that holds a fraction ``mass`` of the attention (DINO keeps 60%). Scored against the ground truth:

- **Jaccard** (where the source has masks): ``|M ∩ G| / |M ∪ G|`` between the mask upsampled (nearest)
  to the ground-truth mask and its foreground ``G`` (pixels that are not ``background`` nor
  ``ignore_index``; ignored pixels count for neither), averaged over images;
- **CorLoc** (where the image has boxes): the share of images where the box around the largest
  4-connected component of the mask has IoU >= 0.5 with at least one ground-truth box.

Attention-map pictures are written beside the numbers when the probe has an output folder.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from wildssl.data import collate, open_source
from wildssl.data.boxes import box_iou
from wildssl.data.sample import EachImageOnce, Source
from wildssl.data.views import preprocess_images
from wildssl.errors import ConfigError
from wildssl.eval.probe import ProbeContext, resolve_options
from wildssl.eval.progress import progress_bar

log = logging.getLogger("wildssl")

OPTIONS: dict[str, Any] = {
    "data": None,  # data SPEC with boxes (CorLoc) and/or masks (Jaccard)
    "mass": 0.6,  # fraction of the attention the mask keeps
    "background": 0,  # mask value of the background (Jaccard's foreground is everything else)
    "ignore_index": 255,  # mask value counted neither as foreground nor as background
    "pictures": 8,  # attention-map pictures written to the report (0: none)
    "batch_size": 64,
}

CORLOC_IOU = 0.5


def attention_mass_mask(attention: torch.Tensor, mass: float) -> torch.Tensor:
    """``attention`` ``(B, P)`` (non-negative) -> bool ``(B, P)``: per row, the most attended patches
    until their share of the row's total reaches ``mass`` (the patch that crosses it is kept)."""
    if not 0.0 < mass <= 1.0:
        raise ConfigError(f"discovery mass={mass} must be in (0, 1]")
    share = attention / attention.sum(dim=1, keepdim=True)
    ordered, order = share.sort(dim=1, descending=True)
    before = ordered.cumsum(dim=1) - ordered  # the share of the patches ranked above each one
    keep_sorted = before < mass
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool ``(h, w)`` mask (the first found on a tie, in
    row-major order of its first pixel); all False when the mask is empty."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int64)
    best_label, best_size, current = 0, 0, 0
    for row in range(h):
        for col in range(w):
            if not mask[row, col] or labels[row, col]:
                continue
            current += 1
            labels[row, col] = current
            queue, size = deque([(row, col)]), 0
            while queue:
                r, c = queue.popleft()
                size += 1
                for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= nr < h and 0 <= nc < w and mask[nr, nc] and not labels[nr, nc]:
                        labels[nr, nc] = current
                        queue.append((nr, nc))
            if size > best_size:
                best_label, best_size = current, size
    return labels == best_label if best_size else np.zeros((h, w), dtype=bool)


def mask_box(mask: np.ndarray) -> torch.Tensor:
    """Normalized ``(x0, y0, x1, y1)`` of the cells of a non-empty bool ``(h, w)`` grid mask."""
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    return torch.tensor([cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h],
                        dtype=torch.float32)


def jaccard(predicted: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """``|P ∩ T| / |P ∪ T|`` of bool masks of one shape over the ``valid`` pixels (all by default);
    1.0 when both are empty."""
    if valid is not None:
        predicted, truth = predicted & valid, truth & valid
    union = (predicted | truth).sum().item()
    return 1.0 if union == 0 else (predicted & truth).sum().item() / union


def corloc_hit(box: torch.Tensor, truth_boxes: torch.Tensor) -> bool:
    """True when ``box`` ``(4,)`` has IoU >= 0.5 with one of ``truth_boxes`` ``(M, 4)``."""
    return bool(len(truth_boxes)) and bool((box_iou(box[None], truth_boxes) >= CORLOC_IOU).any())


def cls_attention(encoder, images: torch.Tensor) -> torch.Tensor:
    """The last block's cls-to-patch attention averaged over heads: ``(B, P)``."""
    if not getattr(encoder, "class_token", False):
        raise ConfigError("object discovery reads the cls token's attention; this encoder has no class token "
                          "(e.g. I-JEPA); leave the discovery probe out of its suite")
    attention = encoder.last_block_attention(images)  # (B, heads, T, T)
    return attention[:, :, 0, encoder.num_prefix_tokens:].mean(dim=1)


@torch.no_grad()
def discover(encoder, data: str | Source, *, image_size: int, load_size: int | None = None, mass: float = 0.6,
             background: int = 0, ignore_index: int = 255, pictures: int = 8, batch_size: int = 64,
             device: torch.device | str = "cpu", out_dir: Path | None = None, picture_name: str = "discovery",
             progress: bool = False) -> dict:
    """Jaccard and CorLoc of the attention masks over the images of ``data`` (a spec or a source; see the
    module docstring).

    Returns ``jaccard`` and ``num_jaccard_images`` when masks exist, ``corloc`` and ``num_corloc_images``
    when boxes exist, and ``pictures`` (``<picture_name>_attention.png`` under ``out_dir``)."""
    source = (open_source(data, load_size=load_size or image_size) if isinstance(data, (str, os.PathLike))
              else data)
    loader = EachImageOnce(DataLoader(source, batch_size=batch_size, shuffle=False, collate_fn=collate))
    encoder.eval()
    jaccards, hits, shown = [], [], []
    background_seen = False
    for batch in progress_bar(loader, "discovery", progress):
        images = preprocess_images(batch["image"].to(device), image_size)
        attention = cls_attention(encoder, images).float().cpu()
        grid = (image_size // encoder.patch_size, image_size // encoder.patch_size)
        masks = attention_mass_mask(attention, mass).reshape(-1, *grid)
        for row, index in enumerate(batch["index"].tolist()):
            component = largest_component(masks[row].numpy())
            box = mask_box(component) if component.any() else None
            truth_boxes = batch["boxes"][row]
            if len(truth_boxes):
                hits.append(box is not None and corloc_hit(box, truth_boxes))
            truth = source.mask(index)
            if truth is not None:
                grid_mask = masks[row][None, None].float()
                upsampled = F.interpolate(grid_mask, size=tuple(truth.shape), mode="nearest")[0, 0] > 0
                valid = truth != ignore_index
                background_seen = background_seen or bool((truth == background).any())
                jaccards.append(jaccard(upsampled, (truth != background) & valid, valid))
            if len(shown) < pictures:
                shown.append((batch["image"][row], attention[row].reshape(grid), box, truth_boxes))
    result: dict[str, Any] = {"mass": mass}
    if jaccards and not background_seen:
        log.warning("object discovery: no mask of %s holds the background value %d, so every pixel counts as "
                    "foreground and the Jaccard compares each attention mask with the whole image; set the "
                    "discovery option 'background' to your masks' background value", source.describe(), background)
    if jaccards:  # what the figure measures depends on which mask value is background: say it with the figure
        result.update(jaccard=float(np.mean(jaccards)), num_jaccard_images=len(jaccards), background=background)
        log.info("object discovery: Jaccard over %d masks, foreground = every mask value but background=%d (and "
                 "ignore_index=%d); if %d is an object class of these masks (CamVid's 0 is Sky), set the discovery "
                 "option 'background'", len(jaccards), background, ignore_index, background)
    if hits:
        result.update(corloc=float(np.mean(hits)), num_corloc_images=len(hits))
    if not jaccards and not hits:
        raise ConfigError(f"object discovery found neither masks nor boxes in {source.describe()}; give data with "
                          "boxes (CorLoc) or a 'mask' per image (Jaccard)")
    if out_dir is not None and shown:
        path = Path(out_dir) / f"{picture_name.replace('@', '_')}_attention.png"
        attention_pictures(shown, path)
        result["pictures"] = [path.name]
    return result


def attention_pictures(items: list, path: Path, side: int = 128) -> None:
    """One row per image: the image, its cls attention as a heat map over it, and the box of the
    largest mask component (green) with the ground-truth boxes (yellow)."""
    rows = []
    for image, attention, box, truth_boxes in items:
        picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((side, side), Image.BILINEAR)
        heat = attention / attention.max().clamp(min=1e-12)
        heat_image = Image.fromarray((heat.numpy() * 255).astype(np.uint8)).resize((side, side), Image.NEAREST)
        red = Image.merge("RGB", (heat_image, Image.new("L", heat_image.size), Image.new("L", heat_image.size)))
        overlay = Image.blend(picture, red, 0.6)
        boxed = picture.copy()
        draw = ImageDraw.Draw(boxed)
        for truth in truth_boxes.tolist():
            draw.rectangle([v * (side - 1) for v in truth], outline=(255, 220, 0))
        if box is not None:
            draw.rectangle([v * (side - 1) for v in box.tolist()], outline=(0, 255, 0), width=2)
        rows.append((picture, overlay, boxed))
    sheet = Image.new("RGB", (3 * side + 8, len(rows) * (side + 4)), (255, 255, 255))
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            sheet.paste(panel, (c * (side + 4), r * (side + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def run(context: ProbeContext, options: dict | None = None) -> dict:
    """The suite's ``discovery`` entry: options of :data:`OPTIONS`."""
    options = resolve_options("discovery", OPTIONS, options, required=("data",))
    return discover(context.store.encoder, options["data"], image_size=options["image_size"] or context.image_size,
                    load_size=options["load_size"], mass=options["mass"], background=options["background"],
                    ignore_index=options["ignore_index"], pictures=options["pictures"],
                    batch_size=options["batch_size"], device=context.store.device, out_dir=context.out_dir,
                    picture_name=context.name, progress=context.progress)
