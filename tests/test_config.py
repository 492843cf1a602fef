"""The config mechanism: the defaults are the schema; every error names the dotted key."""
from __future__ import annotations

import pytest

from medseg_dpl.config import ConfigError, load_config, parse_override, save_config

DEFAULTS = {
    "method": {"name": "fixmatch", "tau": 0.4, "prior": None},
    "optim": {"lr": 0.03, "nesterov": True, "steps": 100},
    "data": {"patch_size": [32, 32, 32], "root": "x"},
}


def test_defaults_only_is_a_deep_copy():
    cfg = load_config(None, [], DEFAULTS)
    assert cfg == DEFAULTS
    cfg["optim"]["lr"] = 1.0
    assert DEFAULTS["optim"]["lr"] == 0.03


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: debiaspl\noptim:\n  lr: 0.1\n  steps: 5\n")
    cfg = load_config(path, ["optim.lr=1e-3", "data.patch_size=[8, 8, 8]", "optim.nesterov=false",
                             "method.prior=[0.5, 0.5]", "optim.steps=7", "data.root=/a b"],
                      DEFAULTS)
    assert cfg["method"] == {"name": "debiaspl", "tau": 0.4, "prior": [0.5, 0.5]}
    assert cfg["optim"] == {"lr": 0.001, "nesterov": False, "steps": 7}
    assert cfg["data"] == {"patch_size": [8, 8, 8], "root": "/a b"}
    # ints are accepted where floats are expected, and become floats
    cfg = load_config(None, ["method.tau=1"], DEFAULTS)
    assert cfg["method"]["tau"] == 1.0 and isinstance(cfg["method"]["tau"], float)


def test_round_trip_through_save(tmp_path):
    cfg = load_config(None, ["optim.lr=0.5"], DEFAULTS)
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml", [], DEFAULTS) == cfg


@pytest.mark.parametrize("override", ["optim.lrr=1", "nope=1", "optim.lr.deep=1"])
def test_unknown_key_override_names_key(override):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override], DEFAULTS)
    key = override.split("=")[0]
    assert (key.rsplit(".", 1)[0] if key.endswith(".deep") else key) in str(exc.value)


@pytest.mark.parametrize("override,key", [
    ("optim.lr=abc", "optim.lr"), ("optim.steps=1.5", "optim.steps"),
    ("optim.steps=true", "optim.steps"), ("optim.nesterov=1", "optim.nesterov"),
    ("data.patch_size=32", "data.patch_size"), ("method.name=3", "method.name"),
    ("optim=3", "optim"), ("optim.lr=true", "optim.lr"),
])
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=rf"(^|[ ']){key}\b"):
        load_config(None, [override], DEFAULTS)


def test_file_errors_name_file_and_key(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(missing, [], DEFAULTS)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad_yaml, [], DEFAULTS)
    not_map = tmp_path / "list.yaml"
    not_map.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_config(not_map, [], DEFAULTS)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml.*optim\.momentum"):
        load_config(unknown, [], DEFAULTS)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("method:\n  tau: high\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml.*method\.tau"):
        load_config(wrong, [], DEFAULTS)
    section = tmp_path / "section.yaml"
    section.write_text("method: debiaspl\n")
    with pytest.raises(ConfigError, match=r"section.yaml.*method"):
        load_config(section, [], DEFAULTS)


def test_parse_override():
    assert parse_override("a.b=0.5") == ("a.b", 0.5)
    assert parse_override("a=x=y") == ("a", "x=y")
    assert parse_override("a=") == ("a", "")
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    for bad in ("novalue", "=3", "a=[1,"):
        with pytest.raises(ConfigError):
            parse_override(bad)


def test_empty_dict_default_is_a_free_mapping():
    from medseg_dpl.config import ConfigError, load_config

    cfg = load_config(None, ["extra.a=1"], {"extra": {}})
    assert cfg["extra"] == {"a": 1}
    with pytest.raises(ConfigError, match="extra"):
        load_config(None, ["extra=3"], {"extra": {}})
