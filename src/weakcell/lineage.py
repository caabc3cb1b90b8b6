"""What each finished output was made from, recorded beside it, and whether it may be reused.

A ``Lineage`` is an output's kind, the settings it reads under the config at hand
(``weakcell.config.lineage.reads``: one table for every stage) and the fingerprints of what it is made
from upstream (the data's content, the cache, the folds file, the round before). Its ``fingerprint``
hashes all three, so an output downstream records one string per input and still notices a change
anywhere above it. A stage writes the lineage into the output's folder (``lineage.json``) before it
fills it and, on the next call, compares: the same lineage reuses the output; another one is redone, or
refused with one line naming what changed where redoing would discard finished work (a trained run).

Outputs written before lineage was recorded have only their ``config.yaml``: their settings are compared
through it and, when they match, the output is adopted with today's upstream (``stale`` says so).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weakcell.config import OUTPUT_INPUTS, Config, Output, changed_settings
from weakcell.config.lineage import as_before, reads, recorded_value
from weakcell.errors import StageError
from weakcell.outputs import atomic_write_json

RECORD = "lineage.json"
# How a change upstream is named in a message.
UPSTREAM_NAMES = {
    "images": "the images' content",
    "labels": "the label file",
    "truth": "the synthetic truth",
    "duplicates": "the near-duplicates file",
    "external": "the external sets' tables",
    "cache": "the cell cache",
    "folds": "the folds file",
    "sources": "the external sources (their caches, label files or intensity settings)",
    "previous": "the round it continues",
    "models": "the fold weights",
    "thresholds": "the thresholds",
    "sample": "the sample submission",
    "image_cache": "the downscaled whole images",
}


def digest(payload: object) -> str:
    """A short content hash (blake2b, 128 bits, hex) of a JSON-able ``payload``; dict keys in any order."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Lineage:
    """What one output is made from: the settings it reads and its upstream outputs' fingerprints."""

    output: Output
    settings: dict[str, Any]
    upstream: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, output: Output, cfg: Config, **upstream: str | None) -> Lineage:
        """The lineage of ``output`` made under ``cfg`` from ``upstream`` (the names its ``Inputs`` lists;
        None: this data set has no such input, e.g. real data has no synthetic truth)."""
        expected = set(OUTPUT_INPUTS[output].upstream)
        if set(upstream) != expected:
            raise ValueError(
                f"the lineage of {output} needs upstream {sorted(expected)}, got {sorted(upstream)}"
            )
        present = {name: value for name, value in upstream.items() if value is not None}
        return cls(output, reads(output, cfg), present)

    @property
    def fingerprint(self) -> str:
        """The hash of the output's kind, settings and upstream; a setting added since records were first
        written counts only away from its earlier value (``ADDED_SETTINGS``), so outputs made before it
        existed keep their fingerprints."""
        settings = as_before(self.settings)
        return digest({"output": self.output, "settings": settings, "upstream": self.upstream})

    def record(self) -> dict[str, Any]:
        """What ``lineage.json`` holds."""
        return {
            "output": self.output,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "upstream": self.upstream,
        }

    def changes(self, saved: Lineage) -> list[str]:
        """What differs from ``saved`` (the recorded lineage), one phrase each, settings first:
        ``train.lr: 0.001 -> 0.002``, ``the cell cache changed (3fa1c2d0 -> 91b0e4aa)``."""
        return self.setting_changes(saved) + self.upstream_changes(saved)

    def setting_changes(self, saved: Lineage) -> list[str]:
        """``key: old -> new`` of each setting that differs from ``saved``, sorted by key (a setting added
        since ``saved`` was recorded reads there as its earlier value, ``recorded_value``)."""
        found = []
        for key in sorted(set(saved.settings) | set(self.settings)):
            old, new = recorded_value(saved.settings, key), recorded_value(self.settings, key)
            if old != new:
                found.append(f"{key}: {old!r} -> {new!r}")
        return found

    def upstream_changes(self, saved: Lineage) -> list[str]:
        """``the cell cache changed (old -> new)`` of each upstream fingerprint that differs from ``saved``."""
        found = []
        for name in sorted(set(saved.upstream) | set(self.upstream)):
            old, new = saved.upstream.get(name), self.upstream.get(name)
            if old != new:
                what = UPSTREAM_NAMES.get(name, name)
                found.append(f"{what} changed ({(old or 'none')[:8]} -> {(new or 'none')[:8]})")
        return found


def read_lineage(folder: str | os.PathLike[str]) -> Lineage | None:
    """The lineage recorded in ``folder``, or None when there is none (nothing made yet, or made before
    lineage was recorded). A damaged record is one line naming it."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return Lineage(record["output"], dict(record["settings"]), dict(record["upstream"]))
    except (ValueError, KeyError, TypeError) as err:
        raise StageError(
            f"{path} is damaged ({type(err).__name__}); delete it and rerun (the output is then compared "
            "through its config.yaml), or redo the output with FORCE=1"
        ) from err


def write_lineage(folder: str | os.PathLike[str], lineage: Lineage) -> Path:
    """Record ``lineage`` in ``folder/lineage.json`` (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(folder / RECORD, lineage.record())


def stale(folder: str | os.PathLike[str], current: Lineage, cfg: Config) -> list[str]:
    """What changed since the output in ``folder`` was made, compared with ``current`` (empty: it may be
    reused, or nothing was made there yet). An output without a lineage record is compared through its
    ``config.yaml`` over the settings ``current.output`` reads; its upstream is unknown and taken as is."""
    saved = read_lineage(folder)
    if saved is not None:
        return current.changes(saved)
    return changed_settings(folder, cfg, OUTPUT_INPUTS[current.output])


def is_legacy(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds an output made before lineage was recorded (a config.yaml, no record)."""
    folder = Path(folder)
    return (folder / "config.yaml").is_file() and not (folder / RECORD).is_file()
