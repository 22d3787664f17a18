"""Stage-1 loss of SCFeat: global soft correspondence, epipolar line search and window.

For every query in image 1 the descriptor ``d1`` is matched against image 2 three ways:

* globally, against the descriptors of image 2's own queries (soft-argmax over them,
  ``losses/soft_argmax.py``);
* along the epipolar line ``F1·x̃1`` (no gradient), whose best sample, jittered, is the window
  centre (``losses/line_search.py``);
* inside a small window around that centre (soft-argmax over a regular grid of samples,
  ``losses/window.py``).

The loss is the pixel distance of the soft correspondences to the epipolar line, weighted by
the inverse spread of the soft-argmax and masked to plausible matches. The direction 2→1 is
the mirror image (``F2``, queries of image 2). Queries: ``losses/stage1_queries.py``.

Coordinates follow ``utils/geometry.py``: ``x, y`` pixels, normalised as
``(p - (size-1)/2) / ((size-1)/2)``. ``B`` batch, ``N`` queries of image 1, ``M`` queries of
image 2, ``C`` channels, ``h×w`` feature map.

Speed: the line and window samples are never materialised as ``…×C`` tensors: each query's
descriptor is dotted only with the map cells its bilinear taps touch
(``losses/sampled_correlation.py``).
"""
from __future__ import annotations

import torch
from torch import nn

from losses.temperature import temperature_at
from losses.line_search import line_border_intersections, line_search_centres, sample_along_lines
from losses.sampled_correlation import padded_table
from losses.soft_argmax import soft_correspondence
from losses.stage1_queries import RANDOM_SELECTS, draw_queries
from losses.window import window_correspondence, window_offsets
from utils.config import Spec, section_config
from utils.geometry import (denormalize_coords, epipolar_lines, normalize_coords,
                            point_line_distance, sample_features)

# Window-centre jitter: ±0.707·window_size per axis (the original's constant).
JITTER_SCALE = 0.707
CANNOT_RUN = ("only this value runs: the original implementation cannot run it either (it "
              "fails with an error there)")


# --------------------------------------------------------------------------- loss weights

def inverse_std_weights(std: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached per-query weights ``B×N``.

    ``(1/clamp(std, 1e-10)) / its mean``, times the mask, divided by ``(its mean + 1e-8)``;
    every mean is over all ``B×N`` entries.
    """
    weight = 1.0 / std.detach().clamp(min=1e-10)
    weight = weight / weight.mean() * mask.to(weight.dtype)
    return weight / (weight.mean() + 1e-8)


class Preprocess_Line2Window:  # noqa: N801  (config name)
    """Queries, global soft correspondences, epipolar line search and window correspondences.

    ``__call__(batch, outputs1, outputs2, epoch, queries=None)`` → dict (``B`` pairs, ``N``
    queries per image): ``coord1, coord2`` (queries, pixels ``B×N×2``); ``feat1g_corloc``
    (global correspondence in image 2 of image 1's queries), ``feat2g_corloc``,
    ``feat1w_corloc``, ``feat2w_corloc`` (window correspondences; pixels ``B×N×2``);
    ``feat1c_corloc_org``, ``feat2c_corloc_org`` (line-search centres before the jitter, pixels
    ``B×N×2``; the original returns the second one in normalised units);
    ``feat1g_std, feat2g_std, feat1w_std, feat2w_std`` (``B×N``, normalised units);
    ``valid_epi1, valid_epi2`` (``B×N`` bool: a line crosses the image and the jittered centre
    lies in it); ``epi_line1, epi_line2`` (``B×N×3``, the lines ``F1·x̃1`` in image 2 and
    ``F2·x̃2`` in image 1); ``image_hw1``, ``image_hw2`` (``(H, W)`` of ``batch['im1']``,
    ``batch['im2']``: each image's queries, lines and correspondences use its own size) and
    ``temperature``.

    ``epoch`` is the original trainer's 1-based epoch. ``queries=(query1_n, query2_n)``
    (``B×N×2``, normalised) replaces the query draw; ``jitter_uniform=(u1, u2)`` (``B×N×2`` in
    ``[0, 1)``, image-1 queries searched in image 2, then the reverse) replaces the jitter draw;
    other draws come from ``generator`` when given, else from torch's global generator.
    """

    default_conf = {
        "kps_generator": Spec("generate_kpts_regular_grid_random",
                              choices=("generate_kpts_regular_grid_random",), doc=CANNOT_RUN),
        "kps_generator_config": {
            "grid_size": Spec(16, minimum=1, doc="image pixels per query cell"),
            "keep_spatial": True,
            "random_select": Spec("random", choices=RANDOM_SELECTS, doc=CANNOT_RUN),
        },
        "window_size": Spec(0.1, above=0, maximum=1, doc="normalised half-width of the window"),
        "loss_distance": Spec("cos", choices=("cos", "euc")),
        "use_nn_grid": Spec(False, choices=(False,), doc=CANNOT_RUN),
        "use_line_search": Spec(True, choices=(True,), doc=CANNOT_RUN),
        "line_search_config": {
            "line_step": Spec(100, minimum=2, doc="samples per epipolar line"),
            "use_nn": True,
            "loc_rand": Spec(True, choices=(True,), doc=CANNOT_RUN),
        },
        "temperature_base": Spec(60, types=(float,)),
        "temperature_max": Spec(60, types=(float,)),
    }
    section = "preprocess_train_config"

    def __init__(self, conf: dict):
        self.conf = section_config(self.default_conf, conf, self.section)
        queries, search = self.conf["kps_generator_config"], self.conf["line_search_config"]
        self.grid_size = int(queries["grid_size"])
        self.random_select = queries["random_select"]
        self.window_size = float(self.conf["window_size"])
        self.normalize_queries = self.conf["loss_distance"] == "cos"
        self.line_step = int(search["line_step"])
        self.use_nn = search["use_nn"]

    def temperature(self, epoch: int) -> float:
        """``min(temperature_base + epoch, temperature_max)``."""
        return temperature_at(epoch, self.conf["temperature_base"], self.conf["temperature_max"])

    def _direction(self, desc1: torch.Tensor, coords1: torch.Tensor, global_logits: torch.Tensor,
                   coords2_n: torch.Tensor, map2: torch.Tensor, fmat: torch.Tensor,
                   image_hw: tuple[int, int], temperature: float, uniform: torch.Tensor
                   ) -> dict:
        """Matches of image 1's queries in image 2 (``map2``: ``B×C×h×w`` local map,
        ``image_hw``: image 2's size); uniform ``B×N×2`` the jitter draw."""
        height, width = image_hw
        global_n, global_std = soft_correspondence(global_logits, coords2_n)
        map_hw = tuple(map2.shape[-2:])
        table2 = padded_table(map2, temperature)  # rows of T·normalise(map2)
        lines = epipolar_lines(fmat, coords1)  # B×N×3, in image 2
        with torch.no_grad():
            ends, valid = line_border_intersections(lines, height, width)
            line_points_n = normalize_coords(sample_along_lines(ends, self.line_step),
                                             height, width)
            centres_org = line_search_centres(desc1.detach(), table2.detach(), map_hw,
                                              line_points_n, self.use_nn)
            jitter = JITTER_SCALE * self.window_size * (2 * uniform.to(centres_org.dtype) - 1)
            centres_n = centres_org + jitter
            valid = valid & (centres_n.abs() <= 1).all(-1)
        # float32 offsets even for float64 maps, as the original's
        offsets = window_offsets(self.window_size, *map_hw, device=map2.device).to(map2.dtype)
        window_n, window_std = window_correspondence(desc1, table2, map_hw, centres_n, offsets,
                                                     self.window_size)
        return {"g_corloc": denormalize_coords(global_n, height, width), "g_std": global_std,
                "w_corloc": denormalize_coords(window_n, height, width), "w_std": window_std,
                "c_corloc_org": denormalize_coords(centres_org, height, width),
                "valid_epi": valid, "epi_line": lines}

    def __call__(self, batch: dict, outputs1: dict, outputs2: dict, epoch: int,
                 queries: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                 jitter_uniform: tuple[torch.Tensor, torch.Tensor] | None = None,
                 generator: torch.Generator | None = None) -> dict:
        map1, map2 = outputs1["local_map"], outputs2["local_map"]
        batch_size = map1.shape[0]
        # each image's own size: the two may differ
        hw1, hw2 = (tuple(int(size) for size in batch[key].shape[-2:]) for key in ("im1", "im2"))
        if queries is None:
            queries = tuple(draw_queries(batch_size, *hw, self.grid_size, self.random_select,
                                         device=map1.device, generator=generator)
                            for hw in (hw1, hw2))
        query1_n, query2_n = (query.to(map1.dtype) for query in queries)
        if jitter_uniform is None:
            draw_device = generator.device if generator is not None else map1.device
            jitter_uniform = tuple(
                torch.rand(batch_size, query.shape[1], 2, device=draw_device,
                           generator=generator).to(map1.device) for query in (query1_n, query2_n))
        coords1 = denormalize_coords(query1_n, *hw1)
        coords2 = denormalize_coords(query2_n, *hw2)
        # cos: unit descriptors; euc: raw ones (the maps along lines and windows stay unit)
        desc1 = sample_features(map1, query1_n, normalize=self.normalize_queries)  # B×N×C
        desc2 = sample_features(map2, query2_n, normalize=self.normalize_queries)
        temperature = self.temperature(epoch)
        logits = temperature * (desc1 @ desc2.transpose(1, 2))  # B×N×M, both directions
        one = self._direction(desc1, coords1, logits, query2_n, map2, batch["F1"], hw2,
                              temperature, jitter_uniform[0])
        two = self._direction(desc2, coords2, logits.transpose(1, 2), query1_n, map1,
                              batch["F2"], hw1, temperature, jitter_uniform[1])
        processed = {"coord1": coords1, "coord2": coords2, "image_hw1": hw1, "image_hw2": hw2,
                     "temperature": temperature}
        for index, result in (("1", one), ("2", two)):
            for key, value in result.items():
                name = f"{key}{index}" if key in ("valid_epi", "epi_line") else f"feat{index}{key}"
                processed[name] = value
        return processed


class EpipolarLoss_Line2Window(nn.Module):  # noqa: N801  (config name)
    """Weighted epipolar distance of the global and window correspondences (both directions).

    ``forward(batch, outputs1, outputs2, processed, epoch)`` → ``(loss, components)``,
    components ``loss_g1, loss_w1, loss_g2, loss_w2, percent_g, percent_w`` (scalars;
    ``percent_*`` the fraction of kept queries over both directions).
    """

    needs_detector = False
    components = ("loss_g1", "loss_w1", "loss_g2", "loss_w2", "percent_g", "percent_w")
    default_conf = {
        "grid_cost_thr": Spec(0.5, above=0, doc="fraction of the shorter image side"),
        "win_cost_thr": Spec(0.1, above=0, doc="fraction of the shorter image side"),
        "use_std_as_weight": Spec(True, choices=(True,), doc=CANNOT_RUN),
        "weight_grid": 0.0,
        "weight_window": 1.0,
    }
    section = "EpipolarLoss_Line2Window_config"

    def __init__(self, conf: dict):
        super().__init__()
        self.conf = section_config(self.default_conf, conf, self.section)

    @staticmethod
    def _term(cost: torch.Tensor, std: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (inverse_std_weights(std, mask) * cost).mean()

    def forward(self, batch: dict, outputs1: dict, outputs2: dict, processed: dict,
                epoch: int) -> tuple[torch.Tensor, dict]:
        components, masks_g, masks_w = {}, [], []
        for index, target in (("1", "2"), ("2", "1")):
            # distances are measured in the other image: its shorter side scales the thresholds
            shorter = min(processed[f"image_hw{target}"])
            lines, valid = processed[f"epi_line{index}"], processed[f"valid_epi{index}"]
            corloc_g = processed[f"feat{index}g_corloc"]
            corloc_w = processed[f"feat{index}w_corloc"]
            # A term weighted 0 is only logged: skip its backward.
            if self.conf["weight_grid"] == 0:
                corloc_g = corloc_g.detach()
            if self.conf["weight_window"] == 0:
                corloc_w = corloc_w.detach()
            cost_g = point_line_distance(lines, corloc_g)  # B×N, pixels
            cost_w = point_line_distance(lines, corloc_w)
            mask_g = (cost_g.detach() < self.conf["grid_cost_thr"] * shorter) & valid
            mask_w = (cost_w.detach() < self.conf["win_cost_thr"] * shorter) & valid
            components[f"loss_g{index}"] = self._term(cost_g, processed[f"feat{index}g_std"],
                                                      mask_g)
            components[f"loss_w{index}"] = self._term(cost_w, processed[f"feat{index}w_std"],
                                                      mask_w)
            masks_g.append(mask_g)
            masks_w.append(mask_w)
        # the two directions may have different numbers of queries (images of different sizes)
        components["percent_g"] = torch.cat([m.flatten() for m in masks_g]).float().mean()
        components["percent_w"] = torch.cat([m.flatten() for m in masks_w]).float().mean()
        loss = (self.conf["weight_grid"] * (components["loss_g1"] + components["loss_g2"])
                + self.conf["weight_window"] * (components["loss_w1"] + components["loss_w2"]))
        return loss, components
