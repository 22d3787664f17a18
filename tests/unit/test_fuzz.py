"""Fuzzing the text parsers: any input gives a parsed result or an ``SCFeatError`` (a clear
message for the user), never a traceback of another type.

Bounded: at most 200 examples per test, no deadline, every file written into one temporary
folder and overwritten."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dataloader.megadepth import MegaDepth_SIFT
from dataloader.megadepth_layout import CameraRecord, PairLine, read_img_cam, read_pairs
from utils.config import Spec, apply_overrides, load_config, parse_override
from utils.errors import SCFeatError

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# YAML-ish building blocks: hypothesis rarely writes these by chance.
YAML_PIECES = ["a", "b", "epoch", "lr", "section", "alpha", ".", "=", ":", ": ", "- ", "[", "]",
               "{", "}", ",", "&x ", "*x", "!!str ", "!!binary ", "!!python/object:os.system ",
               "? ", "|", ">", "'", '"', "#", "\n", "  ", "\t", "~", "null", "true", "1", "-1",
               "1e400", ".nan", ".inf", "0x1F", "0o7", "2001-02-30", "2001-12-14t21:59:43.10-05:00",
               "12:30:00", "%YAML 1.1\n", "---\n", "...\n", "<<: *x", "\x00", "\ud800", "é", "\x85"]
yaml_like = st.lists(st.sampled_from(YAML_PIECES), max_size=30).map("".join)
any_text = st.one_of(st.text(max_size=200), yaml_like)

SCHEMA = {
    "name": Spec("run", types=(str,)),
    "epoch": 10,
    "lr": 1e-4,
    "flag": False,
    "mode": Spec("train", choices=("train", "eval")),
    "maybe": None,
    "items": [1, 2],
    "section": {"alpha": 1, "beta": {"gamma": "x"}},
}


def _parses_or_fails_cleanly(function, *args):
    try:
        return function(*args)
    except SCFeatError as error:
        assert str(error)  # a message for the user
        return None


# ----------------------------------------------------------------------------- config

@FUZZ
@given(item=any_text)
@example("a=2001-02-30")  # a date YAML accepts but datetime rejects
@example("a=" + "[" * 1000)  # nesting deeper than Python's recursion limit
@example("a=&x [*x]")  # a list holding itself
@example("=1")
@example("a..b=1")
def test_parse_override_never_crashes(item: str) -> None:
    parsed = _parses_or_fails_cleanly(parse_override, item)
    if parsed is not None:
        keys, _ = parsed
        assert keys and all(keys) and ".".join(keys) == item.partition("=")[0].strip()


@FUZZ
@given(overrides=st.lists(any_text, max_size=4),
       dotted=st.lists(st.tuples(st.lists(st.sampled_from(["a", "b", "section", "alpha", "x"]),
                                          min_size=1, max_size=4), any_text), max_size=4))
@example(overrides=["section=1", "section.alpha=2"], dotted=[])
@example(overrides=["a.b.c=1", "a.b=2", "a.b.c=3"], dotted=[])
def test_apply_overrides_never_crashes(overrides: list[str], dotted) -> None:
    items = overrides + [".".join(keys) + "=" + value for keys, value in dotted]
    conf = {"section": {"alpha": 1, "beta": {"gamma": "x"}}, "epoch": 10, "items": [1]}
    before = copy.deepcopy(conf)
    sources = _parses_or_fails_cleanly(apply_overrides, conf, items)
    if sources is not None:
        assert set(sources) == {".".join(parse_override(i)[0]) for i in items}
        if items:  # the last override is where its dotted key says (earlier ones may be replaced)
            keys, value = parse_override(items[-1])
            node = conf
            for part in keys:
                assert isinstance(node, dict) and part in node
                node = node[part]
            assert repr(node) == repr(value)
    else:
        assert isinstance(conf, dict) and set(before) <= set(conf)


plain_yaml = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(list(SCHEMA) + ["alpha", "beta",
                                                                               "gamma", "zeta"]),
                                               children, max_size=4)),
    max_leaves=12).map(lambda value: yaml.safe_dump(value, allow_unicode=True))


@FUZZ
@given(text=st.one_of(any_text, plain_yaml), overrides=st.lists(yaml_like, max_size=2))
@example(text="epoch: 2001-02-30\n", overrides=[])
@example(text="a: &x [*x]\nsection: *x\n", overrides=[])
@example(text="? [a, b]\n: 1\n", overrides=[])
@example(text="- " * 1000 + "x\n", overrides=[])
@example(text="\x00\xff", overrides=[])
def test_load_config_never_crashes(scratch: Path, text: str, overrides: list[str]) -> None:
    path = scratch / "config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    conf = _parses_or_fails_cleanly(load_config, path, overrides, SCHEMA)
    if conf is not None:
        assert set(conf) == set(SCHEMA)
        assert isinstance(conf["epoch"], int) and not isinstance(conf["epoch"], bool)
        assert isinstance(conf["lr"], float) and conf["mode"] in ("train", "eval")
        assert isinstance(conf["section"]["beta"]["gamma"], str)


# ----------------------------------------------------------------------------- index files

NUMBERS = ["0", "1", "-1", "96", "64", "100.5", "1e-320", "1e308", "1e400", "nan", "NaN", "inf",
           "-inf", "+1", "1_0", "0x10", "١٢", "½", "", "1.0.0", "0.7071067811865476"]
NAMES = ["a.jpg", "b.jpg", "c.jpg", "#c.jpg", "ä.jpg", "a b", "../x.jpg"]
token = st.one_of(st.sampled_from(NUMBERS + NAMES), st.text(max_size=8))
camera_line = st.tuples(st.sampled_from(NAMES[:4]), st.lists(st.sampled_from(NUMBERS), min_size=18,
                                                             max_size=18)).map(
    lambda t: " ".join([t[0], *t[1]]))
VALID = ("{} 96 64 80 80 47.5 31.5 1 0 0 0 1 0 0 0 1 {} 0 0", "{} 96 64 80 80 47.5 31.5 "
         "0.7071067811865476 0 0.7071067811865476 0 1 0 -0.7071067811865476 0 0.7071067811865476 "
         "0 {} 0")
valid_line = st.tuples(st.sampled_from(VALID), st.sampled_from(NAMES[:3]),
                       st.sampled_from(["0", "1", "-2.5", "nan"])).map(lambda t: t[0].format(t[1], t[2]))
line = st.one_of(camera_line, valid_line, st.lists(token, max_size=22).map(" ".join),
                 st.sampled_from(["", "   ", "# comment", "#", "\t# x", "a.jpg b.jpg", "a.jpg a.jpg",
                                  "b.jpg a.jpg", "x" * 5000]),
                 st.text(max_size=40))
file_text = st.lists(line, max_size=8).map(lambda lines: "\n".join(lines))
file_bytes = st.one_of(file_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
                       st.binary(max_size=300),
                       st.sampled_from([b"\xef\xbb\xbfa.jpg b.jpg\n", b"a.jpg\r\nb.jpg\r\n",
                                        b"a.jpg b.jpg\x00\n", b"\xff\xd8\xff\xe0" + b"\x00" * 50]))


def _check_cameras(cameras: dict, rejected: dict) -> None:
    assert not set(cameras) & set(rejected)
    for name, camera in cameras.items():
        assert isinstance(camera, CameraRecord) and name and not any(c.isspace() for c in name)
        assert camera.width >= 1 and camera.height >= 1
        assert np.isfinite(camera.K).all() and camera.K[0, 0] > 0 and camera.K[1, 1] > 0
        assert np.isfinite(camera.pose).all()
        rotation = camera.pose[:3, :3]
        assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-2)
        assert abs(np.linalg.det(rotation) - 1) <= 1e-2
    for cause, where in rejected.values():
        assert isinstance(cause, str) and ":" not in cause and ":" in where


@FUZZ
@given(data=file_bytes)
@example(data=b"a.jpg 96 64 0 80 1 1 1 0 0 0 1 0 0 0 1 0 0 0\n")
@example(data=b"a.jpg 96 64 80 80 1 1 1 0 0 0 1 0 0 0 1 0 0 0\na.jpg 96 64 80 80 1 1 1 0 0 0 1 0 0 0 1 0 0 0")
@example(data=b"a.jpg nan 64 80 80 1 1 1 0 0 0 1 0 0 0 1 0 0 0\n")
@example(data=b"a.jpg 1e400 1e308 1e308 1e308 1 1 1 0 0 0 1 0 0 0 1 0 0 0\n")
def test_read_img_cam_never_crashes(scratch: Path, data: bytes) -> None:
    path = scratch / "img_cam.txt"
    path.write_bytes(data)
    parsed = _parses_or_fails_cleanly(read_img_cam, path)
    if parsed is not None:
        _check_cameras(*parsed)


@FUZZ
@given(data=file_bytes)
def test_read_pairs_never_crashes(scratch: Path, data: bytes) -> None:
    path = scratch / "pairs.txt"
    path.write_bytes(data)
    pairs = _parses_or_fails_cleanly(read_pairs, path)
    if pairs is not None:
        lines = data.decode("utf-8").split("\n")
        for pair in pairs:
            assert isinstance(pair, PairLine) and lines[pair.line - 1].split() == [pair.name1, pair.name2]


@settings(FUZZ, max_examples=80)
@given(img_cam=file_text, pairs=file_text, mode=st.sampled_from(["train", "test"]),
       resize=st.sampled_from([None, [32, 48]]))
@example(img_cam=VALID[0].format("a.jpg", "0") + "\n" + VALID[1].format("b.jpg", "1"),
         pairs="a.jpg b.jpg\nb.jpg a.jpg\na.jpg a.jpg\nc.jpg a.jpg", mode="test", resize=None)
@example(img_cam="a.jpg 96 64 1e-320 1e-320 0 0 1 0 0 0 1 0 0 0 1 0 0 0\n" + VALID[0].format("b.jpg", "1"),
         pairs="a.jpg b.jpg", mode="test", resize=None)
def test_dataset_index_never_crashes(scratch: Path, img_cam: str, pairs: str, mode: str,
                                     resize) -> None:
    """The whole index (filters, fundamental matrices, epipolar check) on fuzzed files."""
    aligned = scratch / "data" / "scene" / "dense0" / "aligned"
    (aligned / "images").mkdir(parents=True, exist_ok=True)
    (aligned / "img_cam.txt").write_bytes(img_cam.encode("utf-8", "surrogatepass"))
    (aligned / "pairs.txt").write_bytes(pairs.encode("utf-8", "surrogatepass"))
    conf = {"data_path": str(scratch / "data"), "mode": mode, "resize": resize}
    dataset = _parses_or_fails_cleanly(MegaDepth_SIFT, conf)
    if dataset is not None:
        assert len(dataset) >= 1
        keys = [frozenset((r.name1, r.name2)) for r in dataset.pairs]
        assert len(set(keys)) == len(keys) and all(len(k) == 2 for k in keys)
        for record in dataset.pairs:
            item_geometry = [dataset._final_camera(c) for c in (record.camera1, record.camera2)]
            assert all(np.isfinite(c.K).all() for c in item_geometry)
