"""Config validation: types, ranges, unknown keys, overrides, and the shipped configs."""

from pathlib import Path

import pytest
import yaml

from sf_mlflow.config import Config, config_from_dict, load_config, parse_overrides
from sf_mlflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.source == str(path)


def test_slideseq_svgp_config_matches_the_plan():
    cfg = load_config(REPO / "configs/slideseq/svgp.yaml")
    assert cfg.name == "slideseq_svgp" and cfg.seed == 67 and cfg.dataset == "slideseq"
    assert cfg.training.learning_rate == pytest.approx(0.1)  # '1e-1' is a string to PyYAML
    assert cfg.training.tol == pytest.approx(1e-4)
    assert cfg.model.num_inducing == 3000 and cfg.model.kernel == "Matern32"
    assert cfg.model.prior == "SVGP" and cfg.training.optimizer == "auto"
    assert cfg.training.batch_size == 7000 and cfg.training.y_batch_size == 2000
    # the plan's data: adata.raw, its QC, and its coordinates, in which lengthscale 4 is meant
    assert cfg.data.use_raw == "auto" and cfg.preprocessing.max_mt_fraction == 0.2
    assert cfg.preprocessing.coordinate_scaling == "geometric_mean"
    assert cfg.preprocessing.spatial_scale == 50.0 and cfg.model.lengthscale == 4.0
    twin = load_config(REPO / "configs/slideseq/pnmf.yaml")
    assert twin.model.spatial is False and twin.model.prior == "Gaussian"
    # The twins differ only in the model's prior (and the experiment name).
    a, b = cfg.flat(), twin.flat()
    assert {k for k in a if a[k] != b[k]} == {"name", "model.prior"}


def test_data_and_preprocessing_defaults_are_the_plans():
    cfg = config_from_dict({})
    assert cfg.data.use_raw == "auto"
    assert cfg.preprocessing.max_mt_fraction == 0.2
    assert cfg.preprocessing.coordinate_scaling == "geometric_mean"


@pytest.mark.parametrize("value, expected", [
    ("auto", "auto"), ("AUTO", "auto"), (True, True), (False, False), ("true", True),
    ("false", False), (1, True), (0, False)])
def test_use_raw_values(value, expected):
    got = config_from_dict({"data": {"use_raw": value}}).data.use_raw
    assert got == expected and type(got) is type(expected)
    # the same through an override string, as `mlflow run -P data.use_raw=...` passes it
    got = config_from_dict({}, overrides=[f"data.use_raw={value}"]).data.use_raw
    assert got == expected and type(got) is type(expected)


def test_max_mt_fraction_null_switches_the_filter_off():
    assert config_from_dict({"preprocessing": {"max_mt_fraction": None}}).preprocessing.max_mt_fraction is None
    assert config_from_dict({}, overrides=["preprocessing.max_mt_fraction=null"]
                            ).preprocessing.max_mt_fraction is None


def test_time_budget_is_a_duration_and_left_out_of_the_hashes_while_unset():
    plain = config_from_dict({})
    cfg = config_from_dict({"training": {"time_budget": "20m"}})
    assert plain.training.time_budget is None and cfg.training.time_budget == 1200.0
    assert "training.time_budget" not in plain.flat()
    assert cfg.flat()["training.time_budget"] == 1200.0


def test_scientific_notation_strings_are_numbers():
    cfg = config_from_dict({"training": {"learning_rate": "1e-1", "tol": "5E-3"}})
    assert cfg.training.learning_rate == 0.1 and cfg.training.tol == 0.005


@pytest.mark.parametrize("raw, fragments", [
    ({"model": {"lenthscale": 2}}, ["unknown key 'model.lenthscale'", "did you mean 'model.lengthscale'"]),
    ({"bogus": 1}, ["unknown key 'bogus'"]),
    ({"model": {"n_components": "ten"}}, ["model.n_components = 'ten'", "expected an integer"]),
    ({"model": {"n_components": 2.5}}, ["model.n_components = 2.5", "expected an integer"]),
    ({"model": {"n_components": 0}}, ["model.n_components = 0", "out of range", ">= 1"]),
    ({"model": {"lengthscale": -1.0}}, ["model.lengthscale = -1.0", "> 0"]),
    ({"model": {"kernel": "matern99"}}, ["model.kernel = 'matern99'", "one of 'Matern32'"]),
    ({"training": {"device": "tpu"}}, ["training.device = 'tpu'", "'cpu', 'gpu', 'cuda', 'auto'"]),
    ({"training": {"shuffle": "maybe"}}, ["training.shuffle = 'maybe'", "true or false"]),
    ({"training": {"learning_rate": "fast"}}, ["training.learning_rate = 'fast'", "a number"]),
    ({"training": {"time_budget": "soon"}}, ["training.time_budget = 'soon'",
                                             "a duration such as 90s, 20m, 1.5h"]),
    ({"preprocessing": {"holdout_fraction": 1.0}}, ["preprocessing.holdout_fraction = 1.0", "< 1"]),
    ({"preprocessing": 5}, ["preprocessing must be a mapping"]),
    ({"model": {"spatial": False}}, ["model.spatial was replaced by model.prior",
                                     "`prior: Gaussian` instead of `spatial: False`"]),
    ({"model": {"spatial": "true"}}, ["`prior: SVGP` instead of `spatial: true`"]),
    ({"model": {"prior": "gp"}}, ["model.prior = 'gp'", "one of 'SVGP', 'Gaussian'"]),
    ({"dataset": "visium"}, ["dataset = 'visium'", "'slideseq', 'h5ad', 'synthetic'"]),
    ({"data": {"use_raw": "raw"}}, ["data.use_raw = 'raw'", "one of 'auto', True, False"]),
    ({"data": {"use_raw": 2}}, ["data.use_raw = 2", "one of 'auto', True, False"]),
    ({"preprocessing": {"coordinate_scaling": "longest"}},
     ["preprocessing.coordinate_scaling = 'longest'", "'geometric_mean', 'longest_side'",
      "did you mean 'longest_side'"]),
    ({"preprocessing": {"max_mt_fraction": 20}}, ["preprocessing.max_mt_fraction = 20", "<= 1"]),
    ({"preprocessing": {"max_mt_fraction": -0.1}}, ["preprocessing.max_mt_fraction = -0.1", ">= 0"]),
])
def test_invalid_values_name_key_value_and_source(raw, fragments):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="my.yaml")
    msg = str(err.value)
    assert msg.startswith("my.yaml")
    for frag in fragments:
        assert frag in msg


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"training": {"max_iter": -3}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: training\.max_iter = -3 is out of range"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_overrides_are_parsed_and_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"n_components": 4}}))
    cfg = load_config(path, ["model.n_components=7", "training.batch_size=null",
                             "model.groups=false", "data.synthetic.n_spots=123"])
    assert cfg.model.n_components == 7 and cfg.training.batch_size is None
    assert cfg.model.groups is False and cfg.data.synthetic.n_spots == 123
    cfg = load_config(path, {"training.learning_rate": "1e-2"})
    assert cfg.training.learning_rate == 0.01
    with pytest.raises(ConfigError, match=r"\(with overrides\): model.n_components = 'x'"):
        load_config(path, ["model.n_components=x"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["model.n_components"])
    with pytest.raises(ConfigError, match="unknown key 'model.nope'"):
        load_config(path, ["model.nope=1"])


def test_digest_tracks_settings_and_sections():
    a = config_from_dict({})
    b = config_from_dict({"model": {"n_components": 3}})
    assert a.digest() != b.digest()
    assert a.digest("seed", "dataset", "data", "preprocessing") == b.digest(
        "seed", "dataset", "data", "preprocessing")
    assert config_from_dict(a.to_dict()) == a


# ---- models: several models over one preprocess run -------------------------------------------

def test_models_list_and_mapping_give_each_model_its_effective_config():
    cfg = config_from_dict({"model": {"n_components": 4, "lengthscale": 8.0},
                            "models": ["pnmf", "svgp", "mggp"]}, "m.yaml",
                           overrides=["models.svgp.training.max_iter=300"])
    eff = cfg.model_configs()
    assert list(eff) == ["pnmf", "svgp", "mggp"]
    assert (eff["pnmf"].model.prior, eff["svgp"].model.groups, eff["mggp"].model.groups) == (
        "Gaussian", False, True)
    assert eff["svgp"].training.max_iter == 300 and eff["mggp"].training.max_iter == 2000
    assert all(e.model.n_components == 4 and e.model.lengthscale == 8.0 and not e.models
               for e in eff.values())
    mapping = config_from_dict({"models": {"svgp": {"training": {"max_iter": "300"}},
                                           "wide": {"model": {"prior": "SVGP",
                                                              "lengthscale": "1.6e1"}}}}, "m.yaml")
    eff = mapping.model_configs()
    assert eff["svgp"].model.prior == "SVGP" and eff["svgp"].model.groups is False  # the preset
    assert eff["svgp"].training.max_iter == 300 and eff["wide"].model.lengthscale == 16.0
    # the block round-trips through to_dict / YAML
    assert config_from_dict(yaml.safe_load(mapping.to_yaml())).models == mapping.models


def test_models_key_changes_no_hash_and_a_models_config_hashes_like_one_model_configs():
    plain = config_from_dict({"model": {"prior": "SVGP", "groups": False}}, "plain.yaml")
    assert "models" not in plain.to_dict() and not plain.models
    listed = config_from_dict({"models": ["pnmf", "svgp"]}, "listed.yaml")
    assert listed.digest() == config_from_dict({}).digest()
    assert not [k for k in listed.flat() if k.startswith("models")]
    assert listed.model_configs()["svgp"].digest() == plain.digest()
    assert config_from_dict({"models": None}).models == {}


@pytest.mark.parametrize("models, message", [
    (3, "models = 3 is invalid: expected a list of model names (pnmf, svgp, mggp, hybrid) or a mapping"),
    (["pnmf", "nsf"], "models[1] = 'nsf' is not a known model: expected one of pnmf, svgp, mggp"),
    (["svgp", "svgp"], "models[1] = 'svgp' is listed twice"),
    ({"a b": None}, "models: the name 'a b' is invalid"),
    ({"x": 5}, "models.x = 5 is invalid: expected a mapping with model and/or training"),
    ({"x": {"modle": {}}}, "unknown key 'models.x.modle' (did you mean 'models.x.model'?)"),
    ({"x": {"preprocessing": {}}}, "unknown key 'models.x.preprocessing'"),
    ({"x": {"model": {"prior": "GP"}}}, "models.x.model.prior = 'GP' is invalid: expected one of"),
    ({"svgp": {"training": {"max_iter": 0}}}, "models.svgp.training.max_iter = 0 is out of range"),
    ({"x": {"model": {"lenghtscale": 2}}},
     "unknown key 'models.x.model.lenghtscale' (did you mean 'models.x.model.lengthscale'?)"),
    ({"x": {"model": {"spatial": False}}}, "models.x.model.spatial was replaced by model.prior"),
])
def test_bad_models_entries_name_file_key_and_value(models, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"models": models}, "bad.yaml")
    assert str(err.value).startswith("bad.yaml: ") and message in str(err.value)


def test_a_bad_models_override_names_the_override():
    with pytest.raises(ConfigError, match=r"bad.yaml \(with overrides\): models.svgp.model.sigma"):
        config_from_dict({"models": ["svgp"]}, "bad.yaml", overrides=["models.svgp.model.sigma=-1"])


def test_the_readme_lists_every_key_with_its_default_from_the_settings_table():
    """The README's reference is generated (``python -m sf_mlflow.config_reference
    README.md``): a key added, renamed or given another default without regenerating it
    fails here."""
    from sf_mlflow.config_reference import BEGIN, END, markdown_table, settings

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == markdown_table(), "run: python -m sf_mlflow.config_reference README.md"
    keys = {s.key for s in settings()}
    assert {"preprocessing.min_counts", "model.num_inducing", "training.time_budget",
            "tuning.lengthscale.low", "data.synthetic.n_spots"} <= keys
    for s in settings():
        assert f"| `{s.key}` |" in block


def test_a_yaml_alias_bomb_is_refused_before_anything_is_expanded(tmp_path):
    """Eight lines of nested aliases stand for 10^8 values once expanded: the loader refuses
    the first alias, before anything is expanded (and any alias: a config never needs one).
    The memory the refusal takes is measured, not its time."""
    import tracemalloc

    from sf_mlflow.config import read_yaml

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    lines += ["name: *a7"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    tracemalloc.start()
    with pytest.raises(ConfigError, match=r"bomb.yaml: not valid YAML: YAML aliases are not "
                                          r"accepted in a config \(found \*a0"):
        load_config(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100 * 2**20, peak
    with pytest.raises(ConfigError, match="aliases are not accepted"):
        read_yaml("a: &x 1\nb: *x\n", "small.yaml")
    assert read_yaml("a: &x 1\nb: 2\n", "anchor.yaml") == {"a": 1, "b": 2}  # an anchor alone is fine


def test_error_messages_cut_long_values():
    from sf_mlflow.config import SHOWN_CHARS
    from sf_mlflow.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"n_components": "x" * 100_000}})
    message = str(err.value)
    assert "model.n_components = 'xxxx" in message and "(100,002 characters)" in message
    assert len(message) < SHOWN_CHARS + 200
