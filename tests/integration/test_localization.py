"""Visual localisation with pycolmap: exact 2D–3D matches give the true pose, the whole
triangulate-and-localise path with exact correspondences, the Aachen recall, bad input and
the CLI on a synthetic scene."""
from __future__ import annotations

import json

import numpy as np
import pytest

import localize
from evaluation.matching import mnn_matcher
from evaluation.localization import (correspondences_2d3d, localize_query, query_errors,
                                     recall_at, split_queries, summarize,
                                     triangulate_references)
from test_reconstruction import exact_scene
from utils.errors import SCFeatError

pytest.importorskip("pycolmap")


def test_exact_2d3d_matches_give_the_true_pose(tmp_path):
    names, cameras, features, world = exact_scene(tmp_path / "images", images=2)
    camera = cameras[names[1]]
    visible = features[names[1]][1].argmax(axis=1)  # one-hot descriptor = point index
    estimate = localize_query(features[names[1]][0], world[visible], camera)
    centre_error, rotation_error = query_errors(estimate, camera)
    assert centre_error < 1e-6 and rotation_error < 1e-5
    assert estimate[2] == len(visible)  # every match an inlier
    assert localize_query(features[names[1]][0][:3], world[visible][:3], camera) is None
    assert query_errors(None, camera) == (float("inf"), float("inf"))


def test_triangulated_references_localise_exact_queries(tmp_path):
    names, cameras, features, world = exact_scene(tmp_path / "images", images=7)
    references, queries = split_queries(names, None, 3)
    assert queries == [names[0], names[3], names[6]] and len(references) == 4
    model = triangulate_references(tmp_path / "images", references, features, cameras,
                                   tmp_path / "model", mnn_matcher())
    assert model.num_points3D() > 200
    records = []
    for name in queries:
        points2d, points3d = correspondences_2d3d(features[name], model, features, mnn_matcher())
        # Each triangulated point is where the scene's point is (exact data, known poses).
        truth = world[features[name][1].argmax(axis=1)]
        index = {tuple(p): k for k, p in enumerate(features[name][0])}
        expected = truth[[index[tuple(p)] for p in points2d]]
        assert np.abs(points3d - expected).max() < 1e-4
        estimate = localize_query(points2d, points3d, cameras[name])
        centre_error, rotation_error = query_errors(estimate, cameras[name])
        records.append({"centre_error": centre_error, "rotation_error": rotation_error,
                        "matches_2d3d": len(points2d)})
        assert len(points2d) > 100 and centre_error < 1e-3 and rotation_error < 0.01
    assert summarize(records)["recall"] == {"0.25m,2.0deg": 1.0, "0.5m,5.0deg": 1.0,
                                            "5.0m,10.0deg": 1.0}


def test_recall_at_the_aachen_thresholds():
    errors = [(0.1, 1.0), (0.3, 1.0), (0.1, 3.0), (4.0, 9.0), (6.0, 1.0), (np.inf, np.inf)]
    # (0.25 m, 2°): the first; (0.5 m, 5°): first three; (5 m, 10°): first four.
    assert recall_at(errors) == pytest.approx([1 / 6, 3 / 6, 4 / 6])
    assert recall_at([]) == [0.0, 0.0, 0.0]


def test_bad_query_choices(tmp_path):
    names = ["a.png", "b.png", "c.png", "d.png"]
    assert split_queries(names, ["c.png"], 4) == (["a.png", "b.png", "d.png"], ["c.png"])
    with pytest.raises(SCFeatError, match="x.png not among the images"):
        split_queries(names, ["x.png"], 4)
    with pytest.raises(SCFeatError, match="at least 2 reference images"):
        split_queries(names, ["a.png", "b.png", "c.png"], 4)
    with pytest.raises(SCFeatError, match="--query-every must be at least 2"):
        split_queries(names, None, 1)
    assert localize.main(["--images", str(tmp_path), "--poses", "a.txt", "b.txt",
                          "--features", "sift", "--out", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("method", ["sift", pytest.param("aliked", marks=pytest.mark.slow)])
def test_cli_localises_a_synthetic_scene(method, tmp_path, capsys):
    from tools.synthetic import make_megadepth1500
    data = tmp_path / "data"
    make_megadepth1500(data, scenes=1, images=8, pairs=3, size=(180, 240), seed=2)
    out = tmp_path / "out"
    assert localize.main(["--images", str(data / "images" / "synth_0000"), "--poses",
                          str(data / "poses" / "synth_0000.txt"), "--features", method,
                          "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().split("\n")[-1]
    assert last.startswith(f"localised within (0.25 m, 2.0°) / (0.5 m, 5.0°) / (5.0 m, 10.0°) "
                           f"{method}: ")
    results = json.loads((out / f"{method}.json").read_text())
    assert [q["query"] for q in results["queries"]] == ["img_000.jpg", "img_004.jpg"]
    assert results["summary"]["recall"]["5.0m,10.0deg"] == 1.0
