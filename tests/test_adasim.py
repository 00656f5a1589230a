import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_DATA, TINY_METHOD, TINY_MODEL
from wildssl.data.synthetic import SyntheticScenes
from wildssl.errors import ConfigError, DataError
from wildssl.methods import build_method
from wildssl.methods.adasim import AdaSimDINO
from wildssl.methods.dino import DINO
from wildssl.models.loading import CHECKPOINT_NAME
from wildssl.train.config import build_config
from wildssl.train.engine import train

# 64 images, batch 16: 4 steps per epoch. DINO-2: the two global crops only.
TINY_BASE = {"dino": TINY_METHOD["dino"] + ["method.n_local=0"], "simsiam": TINY_METHOD["simsiam"]}
RUN = ["train.checkpoint_every=0", "optim.warmup_epochs=0"]


def _config(name: str, base: str, *extra: str) -> dict:
    return build_config(None, [f"method.name={name}"] + TINY_MODEL + TINY_BASE[base] + RUN + list(extra))


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in _records(run_dir) if "loss" in r]


def _ratios(run_dir) -> list[float]:
    return [r["neighbour_ratio"] for r in _records(run_dir) if "neighbour_ratio" in r]


@pytest.mark.parametrize("base", ["dino", "simsiam"])
def test_tau_zero_reproduces_the_base_methods_loss_curve_bit_for_bit(tmp_path, base):
    steps = ["train.steps=12"]
    train(_config(base, base, *steps), tmp_path / "base")
    train(_config(f"adasim_{base}", base, "method.adasim_window=1", "method.adasim_tau=0", *steps), tmp_path / "tau0")
    assert _losses(tmp_path / "tau0") == _losses(tmp_path / "base")  # float equality of every step's loss
    assert _ratios(tmp_path / "tau0") == [0.0, 0.0, 0.0]
    # The control: with tau > 0 the curve leaves the base's once partners are drawn. Not before epoch 3:
    # in epoch 1 no image finds its own entry in the cache, so none is its own argmax in epoch 2.
    train(_config(f"adasim_{base}", base, "method.adasim_window=1", "method.adasim_tau=1.0", *steps), tmp_path / "tau1")
    ratios = _ratios(tmp_path / "tau1")
    assert ratios[:2] == [0.0, 0.0] and ratios[2] > 0
    losses, base_losses = _losses(tmp_path / "tau1"), _losses(tmp_path / "base")
    assert losses[:8] == base_losses[:8] and losses != base_losses  # epochs 1-2 (4 steps each) equal


@pytest.fixture(scope="module")
def adasim_run(tmp_path_factory):
    """An unbroken AdaSim-DINO-2 run of 5 epochs with a window of 2 epochs (bootstrapping from epoch 3)."""
    run_dir = tmp_path_factory.mktemp("adasim") / "straight"
    config = _config("adasim_dino", "dino", "method.adasim_window=2", "method.adasim_tau=0.5", "train.steps=20")
    train(config, run_dir)
    return config, run_dir


def test_resume_in_the_middle_of_a_window_is_exact(adasim_run, tmp_path, monkeypatch):
    config, straight = adasim_run
    assert max(_ratios(straight)) > 0  # the run did bootstrap, so the state being resumed matters
    original = AdaSimDINO.forward

    def forward(self, batches, step):
        if step.step == 13:  # epoch 4, step 2 of 4: the window holds epochs 2-3, epoch 4 half recorded
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batches, step)

    monkeypatch.setattr(AdaSimDINO, "forward", forward)
    with pytest.raises(KeyboardInterrupt, match="step 14"):
        train(config, tmp_path / "broken")
    monkeypatch.undo()
    train(config, tmp_path / "broken", resume=True)
    expected = load_file(str(straight / CHECKPOINT_NAME))
    resumed = load_file(str(tmp_path / "broken" / CHECKPOINT_NAME))
    assert expected.keys() == resumed.keys()
    assert {"method.cache.latents", "method.window.neighbours", "method.window.current_partnered"} <= set(expected)
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, different[:5]
    assert _records(tmp_path / "broken") and _ratios(tmp_path / "broken") == _ratios(straight)


def test_neighbour_picture_shows_queries_with_their_sampling_probabilities(adasim_run):
    pytest.importorskip("matplotlib")
    from wildssl.eval.neighbour_plot import neighbour_queries, plot_neighbours

    _, run_dir = adasim_run
    queries = neighbour_queries(run_dir, 3)
    assert len(queries) == 3
    for query in queries:
        assert sum(query["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert query["probabilities"] == sorted(query["probabilities"], reverse=True)
        assert query["index"] in query["support"] or not query["self_is_argmax"]
    out = plot_neighbours(run_dir, 2)
    assert out == run_dir / "neighbours.png" and out.read_bytes()[:4] == b"\x89PNG"


def test_an_epoch_whose_cache_has_collapsed_raises_the_collapse_alarm_in_the_run_log(tmp_path, monkeypatch):
    import wildssl.methods.adasim as adasim

    monkeypatch.setattr(adasim, "spread_of", lambda *args: {"cache_embedding_std": 0.001, "cache_effective_rank": 1.0})
    summary = train(_config("nn_dino", "dino", "train.steps=16"), tmp_path)
    assert any("cache embedding std" in alarm for alarm in summary["alarms"])
    assert [r["cache_embedding_std"] for r in _records(tmp_path) if "cache_embedding_std" in r] == [0.001] * 4


def test_dino_second_global_crop_comes_from_the_partner_and_a_self_partner_gives_the_standard_views():
    torch.manual_seed(0)
    method = build_method(_config("dino", "dino", "method.n_local=2"))
    source = SyntheticScenes(n=8, size=16)
    images = torch.stack([source[i]["image"] for i in range(8)])
    batch = {"image": images[:4], "aspect": torch.ones(4)}
    plain = method.step_views(batch, torch.Generator().manual_seed(1))
    same = method.step_views({**batch, "partner_image": images[:4], "partner_aspect": torch.ones(4)},
                             torch.Generator().manual_seed(1))
    other = method.step_views({**batch, "partner_image": images[4:], "partner_aspect": torch.ones(4)},
                              torch.Generator().manual_seed(1))
    assert len(plain) == 4 and all(torch.equal(a.images, b.images) for a, b in zip(plain, same))
    changed = [not torch.equal(a.images, b.images) for a, b in zip(plain, other)]
    assert changed == [False, True, False, False]  # global 1 and the local crops stay on x_i


def _prepared(name: str, base: str, *extra: str, labels_source=None):
    torch.manual_seed(0)
    method = build_method(_config(name, base, *extra))
    method.prepare({"train": labels_source or SyntheticScenes(n=64, size=16)}, None)
    method.schedules(100, 4)
    return method


def test_oracle_partners_share_the_class_and_follow_the_probability_schedule():
    source = SyntheticScenes(n=64, size=16)
    labels = torch.tensor(source.class_labels())
    method = _prepared("oracle_dino", "dino", "method.oracle_p_start=1.0", "method.oracle_p=0.0", labels_source=source)
    images = torch.arange(64)
    first = method.choose_partners(0, images)
    assert torch.equal(labels[first], labels) and (first != images).all()  # every class here has >= 2 images
    assert torch.equal(method.choose_partners(99, images), images)  # p = 0 at the last step: standard pairs
    middle = method.choose_partners(50, images)
    assert 0 < int((middle != images).sum()) < 64


def test_nn_partner_is_the_nearest_other_image_of_the_last_epoch_from_the_second_epoch_on():
    method = _prepared("nn_dino", "dino", "method.neighbour_topk=2")
    images = torch.tensor([0, 1, 2])
    assert torch.equal(method.choose_partners(0, images), images)  # no epoch recorded yet
    method.window.observe(images, torch.tensor([[0, 5], [7, 1], [2, -1]]), torch.ones(3, 2),
                          torch.zeros(3, dtype=torch.bool))
    method.window.commit_step()
    method.window.push_epoch()
    assert method.choose_partners(4, images).tolist() == [5, 7, 2]


def test_invalid_pairing_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="adasim_tau"):
        build_method(_config("adasim_dino", "dino", "method.adasim_tau=-0.1"))
    with pytest.raises(ConfigError, match="neighbour_topk"):
        build_method(_config("nn_dino", "dino", "method.neighbour_topk=1"))
    with pytest.raises(ConfigError, match="neighbour_cache_dtype"):
        build_method(_config("adasim_simsiam", "simsiam", "method.neighbour_cache_dtype=float8"))
    with pytest.raises(ConfigError, match="oracle_p"):
        build_method(_config("oracle_simsiam", "simsiam", "method.oracle_p=1.5"))
    method = build_method(_config("oracle_dino", "dino"))

    class Unlabelled(SyntheticScenes):
        def class_labels(self):
            return [-1] * len(self)

    with pytest.raises(DataError, match="needs class labels"):
        method.prepare({"train": Unlabelled(n=8, size=16)}, None)


def test_pair_methods_keep_their_base_evaluation_network():
    assert AdaSimDINO.eval_network == DINO.eval_network == "teacher"
    assert build_method(_config("adasim_simsiam", "simsiam")).eval_network == "student"
    assert TINY_DATA in _config("adasim_dino", "dino")["data"]["train"]


def test_a_neighbour_topk_above_the_data_size_keeps_every_image_with_a_warning(caplog):
    """neighbour_topk=100000 on 2,000 images allocated window x N x K records: a 3-step run wrote a 6.4 GB checkpoint."""
    import logging

    with caplog.at_level(logging.WARNING, logger="wildssl"):
        method = _prepared("adasim_dino", "dino", "method.neighbour_topk=100000")
    assert method.topk == 64 and method.window.state_dict()
    assert max(t.numel() for t in method.window.state_dict().values()) <= 64 * 64 * method.window_size
    assert "method.neighbour_topk=100000 is above the 64 images" in caplog.text


def test_a_run_shorter_than_the_window_is_told_it_trains_standard_pairs_only(tmp_path, caplog):
    """110 steps against a 3-epoch window: adasim_simsiam_quick ended identical to simsiam_quick to the last digit,
    every neighbour ratio 0, and nothing said why."""
    import logging

    steps_per_epoch = 64 // 16  # TINY_DATA's 64 images at the tiny batch of 16
    short = _config("adasim_dino", "dino", "method.adasim_window=3", f"train.steps={3 * steps_per_epoch}")
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        train(short, tmp_path / "short")
    said = [r.getMessage() for r in caplog.records if "draws a neighbour" in r.getMessage()]
    assert said == [f"method adasim_dino draws a neighbour as an image's partner only after 3 completed epochs "
                    f"(method.adasim_window), {3 * steps_per_epoch} steps, and the run has {3 * steps_per_epoch}: every "
                    "step trains on standard pairs, as its base method would; lengthen the run or lower "
                    "method.adasim_window"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        train(_config("adasim_dino", "dino", "method.adasim_window=3", f"train.steps={3 * steps_per_epoch + 1}"),
              tmp_path / "long")
    assert not [r for r in caplog.records if "draws a neighbour" in r.getMessage()]
