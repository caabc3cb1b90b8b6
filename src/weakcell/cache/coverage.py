"""Which of the images a stage needs give it no cells, and why: the one rule behind ``train`` / ``refine``
(labelled training images, ``checks.max_missing_share``) and ``infer`` (the images it predicts, whose rows
would otherwise be empty placeholders: ``checks.allow_empty_rows``).

An image gives no cells when the cache segmented it and found none (``without_cells``), marked it
``skipped`` because it could not be read or segmented (``failed``, ``skipped.csv`` says why), or does not
hold it in that split at all (``not_cached``). Read from ``images.parquet`` alone, before any per-cell table
is built, so the count (and its advice) comes first whatever else is wrong with those images.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class MissingImages:
    """Images a stage needs (``labelled`` of them) that give it no cell, by reason."""

    labelled: int  # images needed (label file IDs for training, the images to predict for inference)
    without_cells: list[str]  # cached, but segmentation found no cell
    failed: list[str]  # cached as skipped: unreadable or failed to segment (skipped.csv says why)
    not_cached: list[str]  # absent from the cache's split (not cached yet, or a cache built without them)
    reasons: dict[str, str] | None = None  # failed image -> the cache's reason

    @property
    def count(self) -> int:
        return len(self.without_cells) + len(self.failed) + len(self.not_cached)

    @property
    def share(self) -> float:
        return self.count / max(self.labelled, 1)

    @property
    def ids(self) -> list[str]:
        """Every missing image, failed ones first (the most telling example)."""
        return [*self.failed, *self.without_cells, *self.not_cached]

    def describe(self, what: str = "labelled training images") -> str:
        return (
            f"{self.count} of {self.labelled} {what} give no cells: "
            f"{len(self.without_cells)} without cells, {len(self.failed)} failed to read or segment, "
            f"{len(self.not_cached)} not cached"
        )

    def example(self) -> str:
        """The first missing image and why, e.g. ``img-b (failed: ImageReadError: cannot decode ...)``."""
        if self.failed:
            reason = (self.reasons or {}).get(self.failed[0], "")
            return f"{self.failed[0]} (failed{': ' + reason if reason else ''})"
        if self.without_cells:
            return f"{self.without_cells[0]} (no cell found)"
        return f"{self.not_cached[0]} (not cached)" if self.not_cached else ""

    def record(self) -> dict[str, object]:
        """What ``run.json`` keeps: counts, the share and up to 5 IDs per reason."""
        reasons = {"without_cells": self.without_cells, "failed": self.failed, "not_cached": self.not_cached}
        return {
            "labelled": self.labelled,
            "missing": self.count,
            "share": round(self.share, 6),
            **{name: len(ids) for name, ids in reasons.items()},
            "examples": {name: ids[:5] for name, ids in reasons.items() if ids},
        }


def missing_images(needed: list[str], cache_images: pd.DataFrame, split: str = "train") -> MissingImages:
    """Which of the ``needed`` IDs the cache's ``split`` images (``images.parquet`` rows) lack, and why."""
    rows = cache_images[cache_images["split"] == split].drop_duplicates("image_id").set_index("image_id")
    cached = [i for i in needed if i in rows.index]
    status, n_cells = rows["status"].to_dict(), rows["n_cells"].to_dict()
    reason = rows["reason"].to_dict() if "reason" in rows.columns else {}
    failed = [i for i in cached if status[i] != "ok"]
    return MissingImages(
        labelled=len(needed),
        without_cells=[i for i in cached if status[i] == "ok" and n_cells[i] == 0],
        failed=failed,
        not_cached=[i for i in needed if i not in rows.index],
        reasons={i: str(reason.get(i, ""))[:200] for i in failed},
    )
