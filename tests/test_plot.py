import json

import pytest

from wildssl.errors import DataError
from wildssl.eval.plot import plot_run, series


def test_plot_writes_a_png_with_agreement_per_iou_bucket(tmp_path):
    pytest.importorskip("matplotlib")
    with open(tmp_path / "metrics.jsonl", "w") as handle:
        for step in range(1, 6):
            handle.write(json.dumps({"step": step, "loss": 5.0 - step, "bootstrap_loss": 4.0 - step / 2,
                                     "agreement": 0.1 * step, "agreement_iou_0-0.1": 0.05 * step,
                                     "agreement_iou_0.7-1": 0.15 * step}) + "\n")
        handle.write(json.dumps({"step": 5, "knn_top1": 0.4}) + "\n")
    out = plot_run(tmp_path)
    assert out == tmp_path / "metrics.png" and out.read_bytes()[:4] == b"\x89PNG"


def test_series_keeps_only_records_with_the_key():
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "knn_top1": 0.5}, {"step": 3, "loss": 1.0}]
    assert series(records, "loss") == ([1, 3], [2.0, 1.0])


def test_plot_of_a_run_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no metrics to plot"):
        plot_run(tmp_path)
