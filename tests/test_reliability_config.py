"""Fault injection, section 2 of the reliability issue: config values.

What must hold: numbers in any usual spelling parse as numbers; every key is checked against its type and
a sane range when the config is built, with one line naming the key, the value and what would be right;
a bool is not an int.
"""

from __future__ import annotations

import pytest
import yaml

from wildssl.cli import main
from wildssl.errors import ConfigError
from wildssl.methods import method_names
from wildssl.schema import MAX_STEPS, Rule, rule_for
from wildssl.train.config import build_config, default_config, dump_config, flatten
from wildssl.train.run import total_steps_of


def _value(config: dict, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _one_line_error(overrides: list[str], recipe: str | None = "simclr_quick") -> str:
    with pytest.raises(ConfigError) as info:
        build_config(recipe, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key, typed, expected", [
    ("optim.lr", "1e-4", 1e-4), ("optim.lr", "1E-4", 1e-4), ("optim.lr", "+2.5e+1", 25.0),
    ("optim.lr", ".5", 0.5), ("optim.lr", "5.", 5.0), ("optim.weight_decay", "1e-4", 1e-4),
    ("optim.min_lr", "1e-7", 1e-7), ("train.steps", "1_000", 1000), ("train.steps", "1e3", 1000),
    ("train.images", "2.5e6", 2_500_000), ("optim.lr", "3", 3.0), ("method.temperature", "2e-1", 0.2),
    ("method.crop_scale", "[1e-1, 1]", [0.1, 1.0]),
])
def test_numbers_in_every_usual_spelling_parse_as_numbers_of_the_keys_type(key, typed, expected):
    value = _value(build_config("simclr_quick", [f"{key}={typed}"]), key)
    assert value == expected and type(value) is type(expected)
    if isinstance(value, list):
        assert all(type(v) is float for v in value)


def test_recipe_files_read_numbers_as_yaml_1_2_does(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: {name: simclr, temperature: 1E-1}\noptim: {lr: 1e-4, min_lr: 1e-7}\n"
                      "train: {steps: 1_000}\n")
    config = build_config(str(recipe))
    assert (config["optim"]["lr"], config["optim"]["min_lr"]) == (1e-4, 1e-7)
    assert config["method"]["temperature"] == 0.1 and config["train"]["steps"] == 1000
    written = tmp_path / "config.yaml"  # the resolved config written beside a run reads back the same
    written.write_text(dump_config(config))
    assert build_config(str(written)) == config


def test_another_method_set_over_a_recipe_names_the_recipes_key_and_what_to_do():
    """``--set method.name=simclr`` on dino_quick used to fail on "unknown config key 'method.out_dim' ... (did you
    mean 'method.proj_dim'?)", which points at the key, not at the method swap."""
    with pytest.raises(ConfigError) as info:
        build_config("dino_quick", ["method.name=simclr"])
    assert str(info.value) == ("--set method.name=simclr on recipe dino_quick (method dino): its key "
                               "method.bottleneck_dim is dino's, not simclr's; start from a simclr recipe instead "
                               "(see `wildssl recipes`)")
    assert build_config("dino_quick", ["method.name=dino"]) == build_config("dino_quick")
    # a method whose keys include the recipe's still takes it (AdaSim over DINO: dino_quick plus its own keys)
    assert build_config("dino_quick", ["method.name=adasim_dino"])["method"]["out_dim"] == 256


def test_a_key_given_twice_in_a_recipe_or_suite_file_is_one_line_error_naming_both_lines(tmp_path, capsys):
    """PyYAML keeps the last of two equal keys without a word: a recipe with a forgotten ``steps: 4`` below
    ``steps: 3`` trained 4 steps, and a second ``train:`` section replaced the first one whole."""
    recipe = tmp_path / "recipe.yaml"
    for text, key, lines in (("inherit: simclr_quick\ntrain:\n  steps: 3\n  steps: 4\n", "steps", (3, 4)),
                             ("train:\n  steps: 3\nmethod: {name: simclr}\ntrain:\n  batch_size: 4\n", "train", (1, 4))):
        recipe.write_text(text)
        with pytest.raises(ConfigError) as info:
            build_config(str(recipe))
        assert str(info.value) == (f"{recipe} is not valid YAML: key {key!r} is given twice, on lines {lines[0]} "
                                   f"and {lines[1]}")
    recipe.write_text("inherit: simclr_quick\nbase: &b {steps: 3}\n")  # anchors and merges still read
    suite = tmp_path / "suite.yaml"
    suite.write_text("probes:\n  knn: {train: a, test: b}\n  knn: {train: c, test: d}\n")
    assert main(["eval", "all", "runs/none", "--suite", str(suite), "--no-cache"]) == 2
    assert f"suite {suite} is not valid YAML: key 'knn' is given twice, on lines 2 and 3" in capsys.readouterr().err
    # the last probe's typo is found before the encoder is loaded (here: before "checkpoint not found") and before
    # the probes above it spend their minutes
    suite.write_text("probes:\n  knn: {train: a, test: b}\n  linear: {train: a, test: b, epoch: 3}\n")
    assert main(["eval", "all", "runs/none", "--suite", str(suite), "--no-cache"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "wildssl: error: unknown option 'epoch' of the linear probe; valid options: batch_size, epochs, image_size, "
        "load_size, lrs, pools, test, train, val_fraction, weight_decay"]
    from wildssl.schema import load_yaml

    assert load_yaml("a: &x {b: 1}\nc:\n  <<: *x\n  d: 2\n") == {"a": {"b": 1}, "c": {"b": 1, "d": 2}}
    with pytest.raises(yaml.YAMLError, match="key 'steps' is given twice, on lines 1 and 1"):  # one flow mapping
        load_yaml("train: {steps: 3, steps: 4}")


@pytest.mark.parametrize("item, fragments", [
    ("ema.momentum=abc", ["ema.momentum=\"abc\"", "a finite number in [0, 1]"]),
    ("data.num_workers=-1", ["data.num_workers=-1", "auto or an integer in [0, 256]"]),
    ("train.steps=true", ["train.steps=true", "a boolean is not a number", "an integer in [1, "]),
    ("data.load_size=100000", ["data.load_size=100000", "an integer in [1, 4096]"]),
    ("train.batch_size=2.5", ["train.batch_size=2.5", "not a whole number"]),
    ("optim.betas=[0.9, 1.5]", ["optim.betas=[0.9, 1.5]", "a list of 2 numbers in [0, 1)"]),
    ("optim.betas=0.9", ["optim.betas=0.9", "a list of 2 numbers"]),
    ("train.precision=fp8", ["train.precision=\"fp8\"", "one of auto, fp32, bf16"]),
    ("train.progress=2", ["train.progress=2", "true or false"]),
    ("train.seed=null", ["train.seed=null", "an integer"]),
    ("model.drop_path_rate=1", ["model.drop_path_rate=1", "[0, 1)"]),
    ("optim.layer_decay=0", ["optim.layer_decay=0", "(0, 1]"]),
    ("method.temperature=0", ["method.temperature=0", "> 0"]),
    ("method.crop_scale=[0.5, 0.2]", ["method.crop_scale=[0.5, 0.2]", "ascending", "(0, 1]"]),
    ("method.proj_dim=true", ["method.proj_dim=true", "a boolean is not a number"]),
    ("method.proj_layers=0", ["method.proj_layers=0", "an integer in [1, 1024]"]),
])
def test_bad_values_are_one_line_errors_naming_key_value_and_what_is_right(item, fragments):
    message = _one_line_error([item])
    assert all(fragment in message for fragment in fragments), message


@pytest.mark.parametrize("key", ["train.steps", "train.batch_size", "train.max_nonfinite", "data.load_size",
                                 "optim.lr", "ema.momentum", "method.proj_dim", "method.temperature"])
@pytest.mark.parametrize("value", ["true", "false"])
def test_a_bool_is_not_a_number(key, value):
    assert "a boolean is not a number" in _one_line_error([f"{key}={value}"])


def _wrong_type(rule: Rule) -> str | None:
    """A ``--set`` value of the wrong type for ``rule`` (None: every value is right)."""
    return {"int": "abc", "float": "abc", "bool": "abc", "list": "abc", "choice": "nope",
            "str": None, "any": None}[rule.kind]


def _outside(rule: Rule) -> list[str]:
    """``--set`` values just outside ``rule``'s bounds (and an open bound itself)."""
    values = []
    if rule.kind not in ("int", "float", "list"):
        return values
    step = 1 if rule.kind == "int" or (rule.kind == "list" and rule.item == "int") else 1e-3
    for bound, sign, is_open in ((rule.low, -1, rule.low_open), (rule.high, 1, rule.high_open)):
        if bound is None:
            continue
        for value in ([bound + sign * step] + ([bound] if is_open else [])):
            values.append(f"[{value}, {value}]" if rule.kind == "list" else repr(value))
    return values


def test_every_key_of_every_method_rejects_wrong_types_and_out_of_range_values():
    seen: set[tuple[str, Rule]] = set()  # the core keys, and a base method's keys in its AB variant, once
    checked = 0
    for method in method_names():
        for key, default in flatten(default_config(method)).items():
            rule = rule_for(key, default)
            if key == "method.name" or (key, rule) in seen:
                continue
            seen.add((key, rule))
            for value in [v for v in [_wrong_type(rule)] + _outside(rule) if v is not None]:
                message = _one_line_error([f"method.name={method}", f"{key}={value}"], recipe=None)
                assert message.startswith(f"{key}="), message
                checked += 1
            if rule.kind in ("int", "float") and not rule.nullable:
                message = _one_line_error([f"method.name={method}", f"{key}=true"], recipe=None)
                assert "a boolean is not a number" in message, message
    assert len(seen) > 100 and checked > len(seen)


@pytest.mark.parametrize("method", method_names())
def test_every_methods_defaults_pass_their_own_checks_unchanged(method):
    """Unchanged but for the one derived default: eval.pool (null) becomes the method's own pooling."""
    config = build_config(None, [f"method.name={method}"])
    defaults = flatten(default_config(method))
    assert defaults["eval.pool"] is None
    defaults["eval.pool"] = defaults.get("method.pool", "cls")
    assert flatten(config) == defaults


def test_method_key_types_follow_their_defaults_and_null_defaults_stay_nullable():
    config = build_config("clip_quick", ["method.text_depth=2", "method.text_width=null", "method.vocab_size=1e3"])
    assert config["method"]["text_depth"] == 2 and config["method"]["text_width"] is None
    assert config["method"]["vocab_size"] == 1000 and type(config["method"]["vocab_size"]) is int
    assert "method.text_depth=2.5" in _one_line_error(["method.text_depth=2.5"], "clip_quick")
    assert "true or false" in _one_line_error(["method.ab_box_tokens=1"], "ab_clip_quick")
    assert "method.ab_n_crops=1" in _one_line_error(["method.ab_n_crops=1"], "ab_clip_quick")  # pairs need 2
    assert build_config("ab_clip_quick", ["method.ab_photometric=simclr"])["method"]["ab_photometric"] == "simclr"


def test_string_keys_keep_the_text_that_was_typed():
    config = build_config("simclr_quick", ["data.train=2024", "model.init_from=1.50", "eval.knn_test=1e-4"])
    assert config["data"]["train"] == "2024" and config["model"]["init_from"] == "1.50"
    assert config["eval"]["knn_test"] == "1e-4"
    assert build_config("simclr_quick", ["model.init_from=null"])["model"]["init_from"] is None


def test_unknown_keys_are_still_rejected_after_the_values_are_checked():
    message = _one_line_error(["optim.weight_decy=1e-4"])
    assert "unknown config key 'optim.weight_decy'" in message and "did you mean 'optim.weight_decay'" in message


def test_a_budget_in_images_or_epochs_is_bounded_in_steps():
    config = build_config("simclr_quick", ["train.images=1e13", "train.batch_size=16"])
    with pytest.raises(ConfigError, match=rf"train.images=10000000000000 is 625000000000 steps .* at most {MAX_STEPS}"):
        total_steps_of(config, 1000, 16)
    assert total_steps_of(build_config("simclr_quick", ["train.images=1600"]), 1000, 16) == 100
    config = build_config("simclr_quick", ["train.epochs=1e6", "train.batch_size=1"])
    with pytest.raises(ConfigError, match="train.epochs="):
        total_steps_of(config, 1000, 1)


@pytest.mark.parametrize("item, fragment", [
    ("optim.weight_decay=1e-4", None), ("optim.min_lr=1e-7", None), ("optim.lr=1e-4", None),
    ("ema.momentum=abc", "ema.momentum=\"abc\""), ("data.num_workers=-1", "data.num_workers=-1"),
    ("train.steps=true", "train.steps=true"), ("data.load_size=100000", "data.load_size=100000"),
])
def test_issue_values_through_the_cli_are_accepted_or_one_line_with_status_2(capsys, item, fragment):
    code = main(["config", "simclr_quick", "--set", item])
    captured = capsys.readouterr()
    if fragment is None:
        key, typed = item.split("=")
        section, name = key.split(".")
        assert code == 0 and yaml.safe_load(captured.out)[section][name] == float(typed)
    else:
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in captured.err


@pytest.mark.parametrize("option, value, fragment", [
    ("--k", "0", "--k 0 is invalid: it must be an integer in [1, 100000]"),
    ("--temperature", "0", "--temperature 0.0 is invalid: it must be a finite number > 0"),
    ("--temperature", "nan", "--temperature nan is invalid"),
    ("--batch-size", "0", "--batch-size 0 is invalid"),
    ("--image-size", "0", "--image-size 0 is invalid"),
    ("--load-size", "100000", "--load-size 100000 is invalid: it must be an integer in [1, 4096]"),
    ("--num-workers", "-1", "--num-workers -1 is invalid"),
])
def test_eval_knn_options_are_checked_like_config_keys_in_one_line(capsys, option, value, fragment):
    data = "synthetic:scenes?n=32&size=16"
    code = main(["eval", "knn", "--random-init", "--model", "tiny", "--train", data, "--test", data, option, value])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines


@pytest.mark.parametrize("recipe, fragment", [
    ("simclr_quick", "method simclr contrasts each image with the other images of the batch, and train.batch_size=1 "
                     "gives a step 1 image(s): raise train.batch_size to 2 or more"),
    ("ab_simclr_quick", "method ab_simclr contrasts each image with the other images of the batch"),
    ("clip_quick", "method clip contrasts each image with the captions of the other images of the batch"),
    ("slip_quick", "method slip contrasts each image"),
    ("simsiam_quick", "1 image(s) per rank of the 1: raise train.batch_size to 2 or more"),
])
def test_a_batch_too_small_for_the_methods_loss_is_one_line_when_the_method_is_built(recipe, fragment):
    """SimCLR at batch 1 logged a loss of 0, a gradient of 0 and contrastive_acc 1.0 and trained nothing;
    SimSiam's BatchNorm ended in a raw ValueError at the first step."""
    from wildssl.methods import build_method

    overrides = ["train.batch_size=1"] + (["method.koleo_weight=0"] if recipe == "simsiam_quick" else [])
    with pytest.raises(ConfigError) as error:
        build_method(build_config(recipe, overrides))
    assert fragment in str(error.value) and "\n" not in str(error.value)
    build_method(build_config(recipe, ["train.batch_size=2"] + overrides[1:]))  # two images are enough


def test_a_steps_override_that_a_recipes_epochs_or_images_shadow_is_named(caplog):
    """`--set train.steps=3` on a recipe with train.epochs ran 100 epochs without a word."""
    import logging

    with caplog.at_level(logging.WARNING, logger="wildssl"):
        config = build_config("dino", ["train.steps=3"])
    assert config["train"]["epochs"] == 100
    assert [r.getMessage() for r in caplog.records] == [
        "train.steps=3 is not the run's length: the recipe's train.epochs=100 decides it; add --set "
        "train.epochs=null to run 3 steps"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wildssl"):
        build_config("dino", ["train.steps=3", "train.epochs=null"])
        build_config("dino_quick", ["train.steps=3"])  # a recipe counted in steps
    assert not caplog.records


def test_an_eval_image_size_the_patches_do_not_tile_is_refused_with_the_config():
    """eval.image_size=20 with 8-px patches passed the config check and failed at the first online k-NN."""
    with pytest.raises(ConfigError, match=r"eval.image_size=20 is not a multiple of model.patch_size=8: .* give 16 or 24"):
        build_config("simclr_quick", ["eval.image_size=20"])
    assert build_config("simclr_quick", ["eval.image_size=24"])["eval"]["image_size"] == 24


@pytest.mark.parametrize("recipe, key", [("simclr_quick", "crop_size"), ("dino_quick", "global_size"),
                                         ("dino_quick", "local_size"), ("ab_dino_quick", "ab_crop_size")])
def test_a_view_size_the_patches_do_not_tile_is_refused_with_the_config(recipe, key):
    """method.crop_size=33 with 8-px patches passed `wildssl config` and `train` failed after its random-init k-NN."""
    with pytest.raises(ConfigError, match=rf"^method.{key}=33 is not a multiple of model.patch_size=8: .* give 32 or 40"):
        build_config(recipe, [f"method.{key}=33"])
    assert build_config(recipe, [f"method.{key}=40"])["method"][key] == 40


@pytest.mark.parametrize("recipe, item, fragment", [
    # a distribution over one prototype, slot class or label is 1: the loss was exactly 0 and nothing trained
    ("dino_quick", "method.out_dim=1", "method.out_dim must be an integer in [2, "),
    ("ibot_quick", "method.patch_out_dim=1", "method.patch_out_dim must be an integer in [2, "),
    ("wsp_quick", "method.vocabulary_size=1", "method.vocabulary_size must be an integer in [2, "),
    # tracebacks from inside the model or in the middle of training
    ("slotmim_quick", "method.num_prototypes=0", "method.num_prototypes must be an integer in [2, "),
    ("ijepa_quick", "method.target_aspect=[0, 0]", "method.target_aspect must be a list of 2 numbers > 0"),
    ("ijepa_quick", "method.target_aspect=[1.5, 0.75]", "not in ascending order"),
])
def test_method_values_that_cannot_train_are_one_line_errors(recipe, item, fragment):
    assert fragment in _one_line_error([item], recipe)


def test_a_box_decoder_width_its_heads_do_not_divide_is_a_config_error():
    """ValueError with a traceback through methods/ab.py; MAE's, I-JEPA's and CLIP's heads were one line already."""
    from conftest import tiny_ab_overrides
    from wildssl.methods import build_method

    with pytest.raises(ConfigError, match=r"method.ab_decoder_width, method.ab_decoder_heads"):
        build_method(build_config(None, tiny_ab_overrides("simclr", "method.ab_decoder_width=32",
                                                          "method.ab_decoder_heads=3")))


def test_sinkhorn_centering_over_a_batch_of_one_is_refused():
    """DINOv2's Sinkhorn-Knopp spreads the targets over the batch: with one image they came out near uniform
    (teacher entropy 5.23 against ln K = 5.55) and the run trained on, as SimCLR, SimSiam and KoLeo do not."""
    from conftest import TINY_DISTILLATION, TINY_MODEL
    from wildssl.methods import build_method

    for method in ("dino", "ibot"):  # iBOT's class-token distillation trained on at a batch of one
        overrides = TINY_MODEL + TINY_DISTILLATION + ["method.patch_out_dim=64"] * (method == "ibot") + [
            "method.centering=sinkhorn", "method.koleo_weight=0"]
        with pytest.raises(ConfigError, match=f"^method {method} with method.centering=sinkhorn spreads the teacher's "
                                              "targets .* train.batch_size=1 .* raise train.batch_size to 2 or more"):
            build_method(build_config(f"{method}_quick", overrides + ["train.batch_size=1"]))
        build_method(build_config(f"{method}_quick", overrides + ["train.batch_size=2"]))


def test_a_recipe_file_that_names_no_method_is_refused(tmp_path):
    """An empty YAML file, or one of train keys only, silently ran SimCLR at ViT-S/224 (the defaults)."""
    import re

    for text in ("", "train:\n  steps: 3\n"):
        recipe = tmp_path / "mine.yaml"
        recipe.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(recipe))} names no method: give it method: "):
            build_config(str(recipe))
        assert build_config(str(recipe), ["method.name=dino"])["method"]["name"] == "dino"
    (tmp_path / "child.yaml").write_text("inherit: simclr_quick\ntrain:\n  steps: 3\n")
    assert build_config(str(tmp_path / "child.yaml"))["method"]["name"] == "simclr"


def test_a_shipped_recipe_name_is_not_hidden_by_a_file_or_folder_of_that_name(tmp_path, monkeypatch):
    """`--out mae_quick` then `wildssl train mae_quick ... --resume` said "recipe file not found: mae_quick" (the
    run folder hid the recipe), and an empty file named simclr_quick ran the defaults (ViT-S at 224 px)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mae_quick").mkdir()
    (tmp_path / "simclr_quick").write_text("")
    assert build_config("mae_quick")["method"]["name"] == "mae"
    assert build_config("simclr_quick")["method"]["crop_size"] == 32
    with pytest.raises(ConfigError, match="^simclr_quick names no method"):  # ./NAME reads the file
        build_config("./simclr_quick")
    (tmp_path / "mine").mkdir()
    with pytest.raises(ConfigError, match="^recipe mine is a folder, not a YAML file"):
        build_config("mine")
