"""Batching that drops unusable items and says why (every dataset's ``collate_fn``).

A dataset returns ``None`` or ``{"skipped": "<cause>: <detail>"}`` for an item it cannot use;
:func:`collate_skip_none` collates the others and lists the causes under the batch's
``skipped`` key, so the trainer can count them (:func:`summarize_skips`). An item may also
carry a note ``(key, warning)`` under ``note``; the batch lists them under ``notes`` and
:class:`NoteLog` logs each key's warning once, whichever loader process made the item.
"""
from __future__ import annotations

import collections
import logging

from torch.utils.data import default_collate

from utils.errors import SCFeatError

log = logging.getLogger("scfeat.data")

SAME_SIZE_KEYS = ("im1", "im2", "coord1", "coord2", "image")
NOTE_KEY = "note"  # an item's (key, warning), e.g. (scene folder, intrinsics rescaled)


def _is_skipped(item: dict | None) -> bool:
    return item is None or "skipped" in item


def collate_skip_none(batch: list[dict | None]) -> dict:
    """Collate the usable items → a batch dict whose ``skipped`` key lists the cause strings
    (``"<cause>: <detail>"``) of the unusable ones (``{"skipped": ...}`` items; a bare ``None``
    counts as ``"unusable item: the dataset returned None"``). When no item is usable the
    result is ``{"skipped": [...]}`` with no other key. The usable items' notes (``note``
    key, removed from the items) are listed under ``notes`` when there are any."""
    skipped = [("unusable item: the dataset returned None" if item is None else str(item["skipped"]))
               for item in batch if _is_skipped(item)]
    kept = [item for item in batch if not _is_skipped(item)]
    if skipped:
        log.debug("dropped %d of %d items from a batch", len(skipped), len(batch))
    if not kept:
        return {"skipped": skipped}
    for key in SAME_SIZE_KEYS:
        shapes = {tuple(item[key].shape) for item in kept if key in item}
        if len(shapes) > 1:
            raise SCFeatError(f"data: the images of one batch differ in size ({key}: "
                              f"{sorted(shapes)}); set data.resize: [H, W] or data.batch_size: 1")
    notes = [item.pop(NOTE_KEY) for item in kept if NOTE_KEY in item]
    collated = default_collate(kept)
    collated["skipped"] = skipped
    if notes:
        collated["notes"] = notes
    return collated


def summarize_skips(causes: list[str]) -> dict[str, int]:
    """Cause strings (``"<cause>: <detail>"``) → ``{cause: count}``, most frequent first, the
    cause being the text before the first ``':'``."""
    counts = collections.Counter(cause.split(":", 1)[0].strip() for cause in causes)
    return dict(counts.most_common())


class NoteLog:
    """Logs the warning of each note key once (call it with a batch's ``notes``)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, notes: list[tuple[str, str]]) -> None:
        for key, warning in notes:
            if key not in self.seen:
                self.seen.add(key)
                log.warning("%s", warning)
