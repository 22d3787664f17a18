"""The config loader: overrides, validation, clear errors naming file and line."""
from __future__ import annotations

import pytest

from utils.config import Dynamic, Spec, apply_overrides, load_config, parse_override, validate
from utils.errors import SCFeatError

SCHEMA = {
    "name": Spec(types=(str,)),
    "epoch": 10,
    "lr": 1e-4,
    "flag": False,
    "mode": Spec("train", choices=("train", "eval")),
    "maybe": None,
    "section": {"alpha": 1, "beta": {"gamma": "x"}, "delta": Spec(2, types=(int, str))},
    "kind": Spec("a", choices=("a", "b")),
    "kind_config": Dynamic(lambda root, raw: {"a": {"size": 3}, "b": {"width": 2.0}}[root["kind"]]),
}


def write(tmp_path, text):
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    return path


def test_defaults_filled_and_types_kept(tmp_path):
    conf = load_config(write(tmp_path, "name: run\nlr: 1\n"), [], SCHEMA)
    # Missing sections get their defaults, Specs resolved to their default values.
    assert conf["epoch"] == 10 and conf["section"] == {"alpha": 1, "beta": {"gamma": "x"}, "delta": 2}
    assert conf["lr"] == 1.0 and isinstance(conf["lr"], float)  # an int is accepted for a float
    assert conf["kind_config"] == {"size": 3}


def test_overrides_are_dotted_and_yaml_parsed(tmp_path):
    conf = load_config(write(tmp_path, "name: run\n"),
                       ["epoch=3", "section.beta.gamma=y", "flag=true", "maybe=[1, 2]"], SCHEMA)
    assert conf["epoch"] == 3 and conf["section"]["beta"]["gamma"] == "y"
    assert conf["flag"] is True and conf["maybe"] == [1, 2]


def test_unknown_key_names_line_and_closest(tmp_path):
    path = write(tmp_path, "name: run\nsection:\n  alpah: 2\n")
    with pytest.raises(SCFeatError, match=r"conf.yaml:3: key 'section.alpah' is not a known key; did you mean 'alpha'"):
        load_config(path, [], SCHEMA)


@pytest.mark.parametrize("text, message", [
    ("name: run\nepoch: ten\n", r":2: key 'epoch' must be an integer, got a string"),
    ("name: run\nepoch: 1.5\n", r"key 'epoch' must be an integer"),
    ("name: run\nflag: 1\n", r"key 'flag' must be a boolean"),
    ("name: run\nepoch: true\n", r"key 'epoch' must be an integer"),
    ("name: run\nmode: test\n", r"key 'mode' must be one of \['train', 'eval'\]"),
    ("name: run\nsection: 3\n", r"key 'section' must be a mapping"),
    ("epoch: 1\n", r"required key 'name' is missing"),
    ("name: run\nkind: b\nkind_config: {size: 3}\n", r"key 'kind_config.size' is not a known key"),
    ("name: [unclosed\n", r"conf.yaml:\d+: not valid YAML"),
    ("- a\n- b\n", r"expected a mapping of config keys"),
])
def test_bad_values_get_clear_errors(tmp_path, text, message):
    with pytest.raises(SCFeatError, match=message):
        load_config(write(tmp_path, text), [], SCHEMA)


def test_override_errors_name_the_override(tmp_path):
    path = write(tmp_path, "name: run\n")
    with pytest.raises(SCFeatError, match=r"command-line override 'epoch=x'.*must be an integer"):
        load_config(path, ["epoch=x"], SCHEMA)
    with pytest.raises(SCFeatError, match=r"expected KEY=VALUE"):
        load_config(path, ["epoch"], SCHEMA)
    with pytest.raises(SCFeatError, match=r"'name' is not a mapping"):
        load_config(path, ["name.sub=1"], SCHEMA)


def test_missing_file():
    with pytest.raises(SCFeatError, match="does not exist"):
        load_config("/nonexistent/conf.yaml", [], SCHEMA)


def test_parse_override_and_apply():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=") == (["a"], None)
    conf = {"a": {"b": 1}}
    sources = apply_overrides(conf, ["a.c=x"])
    assert conf == {"a": {"b": 1, "c": "x"}} and "a.c" in sources
    for bad in ("=1", "a..b=1", "novalue"):
        with pytest.raises(SCFeatError):
            parse_override(bad)


def test_validate_without_file():
    assert validate({"name": "x"}, SCHEMA)["mode"] == "train"


def test_spec_ranges_and_checks_name_the_key():
    from utils.config import section_config

    schema = {"n": Spec(1, minimum=1), "p": Spec(0.5, minimum=0, maximum=1),
              "t": Spec(2.0, above=0), "mode": Spec("a", choices=("a", "b"), doc="a: this, b: that"),
              "size": Spec(None, types=(list, type(None)),
                       check=lambda v: None if v is None or len(v) == 2 else "must hold two values")}
    assert section_config(schema, {}, "sec") == {"n": 1, "p": 0.5, "t": 2.0, "mode": "a", "size": None}
    assert section_config(schema, {"n": 3, "p": 1, "size": [1, 2]}, "sec")["n"] == 3
    for conf, message in [({"n": 0}, "sec: key 'n' must be at least 1, got 0"),
                          ({"p": 1.5}, "key 'p' must be at most 1, got 1.5"),
                          ({"t": 0}, "key 't' must be greater than 0, got 0"),
                          ({"mode": "c"}, r"must be one of \['a', 'b'\], got 'c' \(a: this, b: that\)"),
                          ({"size": [1]}, r"key 'size' must hold two values, got \[1\]"),
                          ({"n": True}, "key 'n' must be an integer")]:
        with pytest.raises(SCFeatError, match=message):
            section_config(schema, conf, "sec")
