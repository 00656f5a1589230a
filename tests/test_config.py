import pytest

from wildssl.errors import ConfigError
from wildssl.train.config import build_config, recipe_names


def test_unknown_key_is_rejected_with_valid_keys_listed():
    with pytest.raises(ConfigError) as info:
        build_config("simclr_quick", ["train.stepz=3"])
    message = str(info.value)
    assert "train.stepz" in message and "did you mean 'train.steps'" in message
    assert "optim.lr" in message and "\n" not in message


def test_set_overrides_are_typed_and_applied():
    config = build_config("simclr_quick", ["train.steps=7", "optim.lr=0.5", "method.crop_scale=[0.5, 1.0]",
                                           "data.train=synthetic:scenes?n=10"])
    assert config["train"]["steps"] == 7 and config["optim"]["lr"] == 0.5
    assert config["method"]["crop_scale"] == [0.5, 1.0]
    assert config["data"]["train"] == "synthetic:scenes?n=10"


def test_method_keys_belong_to_the_chosen_method():
    config = build_config("dino_quick")
    assert "teacher_temp" in config["method"] and "temperature" not in config["method"]
    with pytest.raises(ConfigError, match="method.teacher_temp"):
        build_config("simclr_quick", ["method.teacher_temp=0.1"])


def test_method_switch_from_the_command_line_uses_that_methods_defaults():
    config = build_config(None, ["method.name=dino"])
    assert config["method"]["out_dim"] == 65536


def test_unknown_recipe_and_method_and_choice_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        build_config("nope")
    with pytest.raises(ConfigError, match="unknown method 'mocov9'"):
        build_config(None, ["method.name=mocov9"])
    with pytest.raises(ConfigError, match="train.precision"):
        build_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="key=value"):
        build_config(None, ["train.steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(str(bad))


def test_every_shipped_recipe_resolves():
    names = recipe_names()
    assert {"demo", "dino", "dino_quick", "simclr", "simclr_quick"} <= set(names)
    for name in names:
        build_config(name)


@pytest.mark.parametrize("recipe, key", [("simclr_quick", "method.photometric"), ("slip_quick", "method.ssl_photometric")])
def test_unknown_photometric_pipeline_is_a_config_error_naming_the_key(recipe, key):
    from wildssl.methods import build_method

    with pytest.raises(ConfigError, match=rf"{key}='simclr_typo' is not a photometric pipeline; choose one of .*simclr_cifar"):
        build_method(build_config(recipe, [f"{key}=simclr_typo"]))


def test_dino_photometric_names_one_pipeline_for_every_crop_or_keeps_the_papers_three():
    from wildssl.methods import build_method

    paper = build_method(build_config("dino_quick", ["method.photometric=dino", "method.n_local=2"]))
    assert [s.photometric for s in paper.specs] == ["dino_global1", "dino_global2", "dino_local", "dino_local"]
    small = build_method(build_config("dino_quick", ["method.photometric=simclr_cifar", "method.n_local=2"]))
    assert [s.photometric for s in small.specs] == ["simclr_cifar"] * 4
    assert [s.size for s in small.specs] == [s.size for s in paper.specs]
    with pytest.raises(ConfigError, match=r"method.photometric='blurry' is not a photometric pipeline; choose dino .*simclr_cifar"):
        build_method(build_config("dino_quick", ["method.photometric=blurry"]))
