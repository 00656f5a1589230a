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
    with pytest.raises(ConfigError, match="unknown recipe 'dinoquick' \\(did you mean 'dino_quick'\\?\\)"):
        build_config("dinoquick")
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


# -- recipes at parity: an annotation-bootstrapping recipe is its base recipe plus ab_* keys and streams ----
AB_ONLY = {"method.name", "data.train", "data.annotation", "data.bootstrap", "data.bootstrap_batch_size"}


def _printed_config(capsys, recipe: str) -> dict:
    import yaml

    from wildssl.cli import main
    from wildssl.train.config import flatten

    assert main(["config", recipe]) == 0
    return flatten(yaml.safe_load(capsys.readouterr().out))


@pytest.mark.parametrize("base", ["dino", "simclr", "clip", "dino_quick", "simclr_quick", "clip_quick"])
def test_wildssl_config_of_ab_recipe_differs_from_its_base_only_in_ab_keys_streams_and_name(capsys, base):
    base_config, ab_config = _printed_config(capsys, base), _printed_config(capsys, f"ab_{base}")
    differing = {k for k in set(base_config) | set(ab_config)
                 if base_config.get(k, "absent") != ab_config.get(k, "absent")}
    assert differing - AB_ONLY == {k for k in differing if k.startswith("method.ab_")}
    assert ab_config["method.name"] == "ab_" + base_config["method.name"]
    assert ab_config["data.annotation"] == base_config["data.train"]  # the base trains on the annotation stream
    assert any(k.startswith("method.ab_") for k in differing)  # the comparison itself is not vacuous


@pytest.mark.parametrize("recipe", ["ab_dino_quick", "ab_simclr_quick", "ab_clip_quick"])
def test_ab_recipe_on_users_data_bootstraps_on_it_unless_told_otherwise(capsys, tmp_path, recipe):
    """`wildssl train ab_X_quick --data FOLDER` bootstraps on FOLDER, not on the recipe's synthetic scenes; a
    bootstrap stream named on the command line, or a synthetic --data, is left as given."""
    import yaml

    from wildssl.cli import main

    def streams(*argv):
        assert main(["config", recipe, *argv]) == 0
        printed = capsys.readouterr()
        data = yaml.safe_load(printed.out)["data"]
        return data["annotation"], data["bootstrap"], printed.err

    folder, other = str(tmp_path / "photos"), str(tmp_path / "frames")
    annotation, bootstrap, note = streams("--data", folder)
    assert (annotation, bootstrap) == (folder, folder)
    assert "data.bootstrap follows --data" in note and note.count("\n") == 1
    assert streams("--data", folder, "--set", f"data.bootstrap={other}")[:2] == (folder, other)
    assert streams("--data", folder, "--set", "data.bootstrap=synthetic:scenes?n=50")[:2] == (
        folder, "synthetic:scenes?n=50")
    annotation, bootstrap, note = streams("--data", "synthetic:scenes?n=60")
    assert bootstrap.startswith("synthetic:scenes?n=2000") and note == ""


PAIRING = ("method.adasim_", "method.neighbour_")  # where a nearest-neighbour method takes its second view


@pytest.mark.parametrize("base, variant", [("dino_quick", "adasim_dino_quick"), ("dino_quick", "nn_dino_quick"),
                                           ("simsiam_quick", "adasim_simsiam_quick")])
def test_neighbour_pairing_recipes_differ_from_their_base_only_in_pairing_keys_and_name(capsys, base, variant):
    base_config, variant_config = _printed_config(capsys, base), _printed_config(capsys, variant)
    differing = {k for k in set(base_config) | set(variant_config)
                 if base_config.get(k, "absent") != variant_config.get(k, "absent")}
    assert differing - {"method.name"} == {k for k in differing if k.startswith(PAIRING)}
    assert variant_config["method.name"] == variant[: -len("_quick")]
    assert variant_config["method.neighbour_topk"] == 3  # the comparison itself is not vacuous


def test_ibot_quick_differs_from_dino_quick_only_in_ibots_own_keys_and_name(capsys):
    """iBOT against DINO changes one thing: the masked student and its patch distillation."""
    from wildssl.methods.dino import DINO
    from wildssl.methods.ibot import IBOT

    dino, ibot = _printed_config(capsys, "dino_quick"), _printed_config(capsys, "ibot_quick")
    differing = {k for k in set(dino) | set(ibot) if dino.get(k, "absent") != ibot.get(k, "absent")}
    ibot_only = {f"method.{key}" for key in IBOT.defaults if key not in DINO.defaults}
    assert "method.patch_loss_weight" in ibot_only and "method.pool" not in ibot_only
    assert differing - {"method.name"} <= ibot_only, differing - ibot_only
    assert ibot["method.name"] == "ibot" and ibot["method.patch_out_dim"] == ibot["method.out_dim"]


def _write(folder, name: str, text: str):
    path = folder / name
    path.write_text(text)
    return str(path)


def test_inherit_overrides_the_parent_key_by_key_and_replaces_lists(tmp_path):
    _write(tmp_path, "parent.yaml", "method: {name: dino, out_dim: 128, global_scale: [0.3, 1.0]}\n"
                                    "train: {steps: 9, batch_size: 32}\ndata: {train: 'synthetic:scenes?n=64'}\n")
    child = _write(tmp_path, "child.yaml",
                   "inherit: parent.yaml\nmethod: {global_scale: [0.5, 1.0]}\ntrain: {steps: 4}\n")
    config = build_config(child)
    assert config["method"]["out_dim"] == 128 and config["method"]["global_scale"] == [0.5, 1.0]
    assert (config["train"]["steps"], config["train"]["batch_size"]) == (4, 32)
    assert config["data"]["train"] == "synthetic:scenes?n=64"


def test_inherit_across_methods_makes_the_parents_stream_the_childs_first_stream(tmp_path):
    parent = _write(tmp_path, "base.yaml",
                    "method: {name: simclr, temperature: 0.3}\ndata: {train: 'synthetic:scenes?n=64'}\n")
    _write(tmp_path, "ab.yaml", f"inherit: {parent}\nmethod: {{name: ab_simclr}}\n"
                          "data: {bootstrap: 'synthetic:scenes?n=32'}\n")
    grandchild = _write(tmp_path, "ab2.yaml", "inherit: ab.yaml\nmethod: {ab_n_crops: 3}\n")
    config = build_config(grandchild)
    assert config["method"]["name"] == "ab_simclr" and config["method"]["temperature"] == 0.3
    assert config["method"]["ab_n_crops"] == 3
    assert config["data"]["annotation"] == "synthetic:scenes?n=64"
    assert config["data"]["bootstrap"] == "synthetic:scenes?n=32" and "train" not in config["data"]


def test_bad_inheritance_is_a_one_line_config_error(tmp_path):
    loop_a = _write(tmp_path, "a.yaml", "inherit: b.yaml\n")
    _write(tmp_path, "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="loops") as info:
        build_config(loop_a)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="unknown recipe 'no_such_base'"):
        build_config(_write(tmp_path, "c.yaml", "inherit: no_such_base\n"))
    with pytest.raises(ConfigError, match="inherit must name one recipe"):
        build_config(_write(tmp_path, "d.yaml", "inherit: [dino, simclr]\n"))
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        build_config(_write(tmp_path, "e.yaml", "inherit: dino_quick\noptim: {lrr: 1}\n"))


@pytest.mark.parametrize("recipe, key", [("simclr_quick", "method.photometric"), ("slip_quick", "method.ssl_photometric")])
def test_unknown_photometric_pipeline_is_a_config_error_naming_the_key(recipe, key):
    from wildssl.methods import build_method

    with pytest.raises(ConfigError, match=rf"{key}='simclr_typo' is not a photometric pipeline; choose one of .*simclr_cifar"):
        build_method(build_config(recipe, [f"{key}=simclr_typo"]))


@pytest.mark.parametrize("recipe", ["dino_quick", "ibot_quick"])
def test_multi_crop_photometric_names_one_pipeline_for_every_crop_or_keeps_the_papers_three(recipe):
    from wildssl.methods import build_method

    paper = build_method(build_config(recipe, ["method.photometric=dino", "method.n_local=2"]))
    assert [s.photometric for s in paper.specs] == ["dino_global1", "dino_global2", "dino_local", "dino_local"]
    small = build_method(build_config(recipe, ["method.photometric=simclr_cifar", "method.n_local=2"]))
    assert [s.photometric for s in small.specs] == ["simclr_cifar"] * 4
    assert [s.size for s in small.specs] == [s.size for s in paper.specs]
    with pytest.raises(ConfigError, match=r"method.photometric='blurry' is not a photometric pipeline; choose dino .*simclr_cifar"):
        build_method(build_config(recipe, ["method.photometric=blurry"]))


@pytest.mark.parametrize("recipe, method_pool", [("dino", "cls"), ("dino_quick", "avg"), ("simclr_quick", "cls"),
                                                 ("clip", "avg"), ("slip_quick", "cls"), ("ibot_quick", "avg")])
def test_eval_pool_follows_the_methods_pool_unless_set(recipe, method_pool):
    """The k-NN reads the feature the method trains: with no eval.pool, a --set method.pool carries over to it;
    an eval.pool that is given stays as given."""
    followed = build_config(recipe, [f"method.pool={method_pool}"])
    assert followed["eval"]["pool"] == method_pool
    other = {"cls": "avg", "avg": "cls"}[method_pool]
    kept = build_config(recipe, [f"method.pool={method_pool}", f"eval.pool={other}"])
    assert (kept["method"]["pool"], kept["eval"]["pool"]) == (method_pool, other)


def test_eval_pool_of_a_method_without_pooling_is_the_class_token_unless_the_recipe_says():
    assert "pool" not in build_config("mae")["method"]
    assert build_config("mae", ["eval.pool=null"])["eval"]["pool"] == "cls"
    assert build_config("mae")["eval"]["pool"] == "avg"  # MAE's recipe: the mean patch token, as the paper probes


def test_no_shipped_recipe_repeats_its_methods_pool_in_eval_pool():
    """eval.pool follows method.pool; a recipe that repeats it leaves two keys to keep in step."""
    from wildssl.train.config import read_recipe

    for name in recipe_names():
        tree, _ = read_recipe(name)
        method_pool = (tree.get("method") or {}).get("pool")
        eval_pool = (tree.get("eval") or {}).get("pool")
        assert eval_pool is None or eval_pool != method_pool, name


def test_a_misspelled_method_pool_is_named_when_eval_pool_follows_it():
    with pytest.raises(ConfigError, match="method.pool='avgg'"):
        build_config("dino", ["method.pool=avgg"])
    with pytest.raises(ConfigError, match="eval.pool"):
        build_config("dino", ["eval.pool=mean"])
