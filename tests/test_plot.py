import json

import pytest

from wildssl.errors import DataError
from wildssl.eval.plot import metrics_figure, plot_run, series
from wildssl.io import read_metrics


def _write_run(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as handle:
        for step in range(1, 6):
            handle.write(json.dumps({"step": step, "loss": 5.0 - step, "bootstrap_loss": 4.0 - step / 2,
                                     "agreement": 0.1 * step, "agreement_iou_0-0.1": 0.05 * step,
                                     "agreement_iou_0.7-1": 0.15 * step}) + "\n")
        handle.write(json.dumps({"step": 5, "knn_top1": 0.4, "knn_top5": 0.9}) + "\n")


def test_plot_draws_loss_knn_and_agreement_per_iou_bucket_from_the_logged_values(tmp_path):
    pytest.importorskip("matplotlib")
    _write_run(tmp_path)
    figure = metrics_figure(read_metrics(tmp_path))
    axes = {axis.get_title(): {line.get_label(): line for line in axis.get_lines()} for axis in figure.axes}
    assert set(axes) == {"loss", "k-NN and online probe top-1", "bootstrap top-1 agreement by IoU"}
    assert set(axes["loss"]) == {"loss", "bootstrap_loss"}
    agreement = axes["bootstrap top-1 agreement by IoU"]
    assert list(agreement) == ["agreement", "IoU 0-0.1", "IoU 0.7-1"]  # buckets in IoU order
    assert list(agreement["IoU 0.7-1"].get_ydata()) == pytest.approx([0.15 * s for s in range(1, 6)])
    assert list(axes["k-NN and online probe top-1"]["knn_top1"].get_xydata()[0]) == [5, 0.4]
    assert set(axes["k-NN and online probe top-1"]) == {"knn_top1"}  # top-5 would flatten the top-1 curve


def test_the_knn_curve_starts_at_the_random_init_floor_and_the_floor_is_drawn_across(tmp_path):
    """A run's first k-NN record is the random-init floor (step 0, knn_top1_random_init): the curve a user watches
    starts there, and a dashed line marks it, so a trained curve under it shows at a glance."""
    pytest.importorskip("matplotlib")
    records = [{"step": 0, "knn_top1_random_init": 0.25, "knn_top5_random_init": 0.7}, {"step": 5, "loss": 2.0},
               {"step": 10, "knn_top1": 0.3, "knn_top5": 0.75}, {"step": 20, "knn_top1": 0.35, "knn_top5": 0.8}]
    figure = metrics_figure(records)
    (panel,) = [axis for axis in figure.axes if axis.get_title() == "k-NN and online probe top-1"]
    lines = {line.get_label(): line for line in panel.get_lines()}
    assert set(lines) == {"knn_top1", "random init"}
    assert [tuple(xy) for xy in lines["knn_top1"].get_xydata()] == [(0, 0.25), (10, 0.3), (20, 0.35)]
    assert set(lines["random init"].get_ydata()) == {0.25} and lines["random init"].get_linestyle() == "--"


def test_plot_run_writes_the_png(tmp_path):
    pytest.importorskip("matplotlib")
    _write_run(tmp_path)
    out = plot_run(tmp_path)
    assert out == tmp_path / "metrics.png" and out.read_bytes()[:4] == b"\x89PNG"


def test_a_metrics_line_cut_short_by_a_kill_is_left_out_with_a_warning_naming_it(tmp_path, caplog):
    _write_run(tmp_path)
    whole = read_metrics(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "loss": 0.')  # the kill came while this line was written
    with caplog.at_level("WARNING", logger="wildssl"):
        records = read_metrics(tmp_path)
    assert records == whole and len(records) == 6
    assert "metrics.jsonl: left out line 7, not a JSON record" in caplog.text


def test_plot_run_draws_a_killed_run(tmp_path):
    pytest.importorskip("matplotlib")
    _write_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "lo')
    out = plot_run(tmp_path)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_series_keeps_only_records_with_the_key():
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "knn_top1": 0.5}, {"step": 3, "loss": 1.0}]
    assert series(records, "loss") == ([1, 3], [2.0, 1.0])


def test_plot_of_a_run_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no metrics to plot"):
        plot_run(tmp_path)


def test_slotmims_slots_in_use_get_a_panel(tmp_path):
    """SlotMIM logs how many of its prototypes are in use (its collapse signal), but the plot never drew them."""
    pytest.importorskip("matplotlib")
    records = [{"step": s, "loss": 1.0 / s, "active_slots": 20 - s, "active_slots_mean": 21 - s} for s in (1, 2, 3)]
    figure = metrics_figure(records)
    (panel,) = [axis for axis in figure.axes if axis.get_title() == "slots in use (collapse: few)"]
    lines = {line.get_label(): line for line in panel.get_lines()}
    assert set(lines) == {"active_slots", "active_slots_mean"}
    assert list(lines["active_slots"].get_ydata()) == [19, 18, 17]
