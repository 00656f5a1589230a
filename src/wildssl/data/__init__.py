"""Data: sources (folder, JSONL, tar shards, synthetic scenes), views that remember their boxes, box maths."""

from wildssl.data.boxes import absolute_box, box_iou, relative_box
from wildssl.data.sample import collate
from wildssl.data.spec import open_source
from wildssl.data.views import CropSpec, ViewBatch, make_views

__all__ = ["absolute_box", "box_iou", "relative_box", "collate", "open_source", "CropSpec", "ViewBatch",
           "make_views"]
