"""The datasets that ``extract_features.py`` reads, by the name a config's ``data`` gives (their
layouts and feature keys: :mod:`dataloader.image_folders`)."""
from __future__ import annotations

from dataloader.hpatches import HPatch_SIFT
from dataloader.image_folders import ETH_LFB, Aachen_Day_Night, InLoc

EXTRACTION_DATASETS = {"HPatch_SIFT": HPatch_SIFT, "Aachen_Day_Night": Aachen_Day_Night,
                       "ETH_LFB": ETH_LFB, "InLoc": InLoc}
