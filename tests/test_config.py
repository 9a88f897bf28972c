import pytest

from genperc.config import RunConfig, list_presets, load_config, load_preset_dict, parse_overrides, valid_keys
from genperc.errors import UserError


def test_every_preset_resolves():
    assert {"cpu-tiny", "gpu-small"} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)


def test_overrides_are_typed_and_nested():
    cfg = load_config("cpu-tiny", ["train.lr=3e-4", "train.steps=7", "model.arch=unet-small", "data.options={size: 5}"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.model.arch == "unet-small"
    assert cfg.data.options == {"size": 5}
    # an int given for a float field is accepted
    assert load_config("cpu-tiny", ["train.lr=1"]).train.lr == 1.0


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError) as e:
        load_config("cpu-tiny", ["train.learning_rate=1"])
    msg = str(e.value)
    assert "train.learning_rate" in msg and "train.lr" in msg and "\n" not in msg


def test_wrong_type_and_bad_override_and_unknown_preset():
    with pytest.raises(UserError, match="train.steps"):
        load_config("cpu-tiny", ["train.steps=many"])
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(UserError, match="cpu-tiny"):
        load_config("no-such-preset")


def test_preset_inheritance_and_yaml_file(tmp_path):
    assert load_preset_dict("cpu-world")["data"]["source"] == "world"
    assert load_preset_dict("cpu-world")["model"]["arch"] == "unet-tiny"
    p = tmp_path / "mine.yaml"
    p.write_text("base: cpu-tiny\ntrain:\n  steps: 3\n")
    assert load_config(str(p)).train.steps == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="bad.yaml"):
        load_config(str(bad))


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("cpu-tiny", ["train.seed=5"])
    cfg.save(tmp_path / "config.yaml")
    from genperc.config import load_run_config

    assert load_run_config(tmp_path).to_dict() == cfg.to_dict()
    assert "diffusion.prediction_type" in valid_keys()


def test_run_config_from_before_the_arch_rename_loads_with_a_warning(tmp_path):
    """A run directory's config.yaml that says ``model.preset`` (the key before it became
    ``model.arch``) loads, mapped to ``arch``, with one warning line."""
    import warnings

    import yaml

    from genperc.config import load_run_config

    old = load_config("cpu-tiny").to_dict()
    old["model"] = {("preset" if k == "arch" else k): v for k, v in old["model"].items()}
    old["model"]["preset"] = "unet-small"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_run_config(tmp_path)
    assert cfg.model.arch == "unet-small"
    assert len(caught) == 1 and caught[0].category is FutureWarning
    message = str(caught[0].message)
    assert "model.preset" in message and "model.arch=unet-small" in message and "\n" not in message
    with pytest.raises(UserError, match="model.preset"):  # both keys: the old one is just unknown
        load_config("cpu-tiny", ["model.preset=unet-small", "model.arch=unet-tiny"])
