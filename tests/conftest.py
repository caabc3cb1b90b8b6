"""Shared fixtures. Real reference data lives in ../shared/data (beside the repo); tests that need it
skip with a reason when it is absent (a user's fresh clone has no ../shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HPA2021_IDS = {
    "000a6c98-bb9b-11e8-b2b9-ac1f6b6435d0": [0, 1, 2, 7],
    "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0": [0, 5, 8],
    "a34d8680-bb99-11e8-b2b9-ac1f6b6435d0": [18],
    "b6a469d8-bbad-11e8-b2ba-ac1f6b6435d0": [11],
    "f0ac7116-bb99-11e8-b2b9-ac1f6b6435d0": [15],
}


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or a skip naming what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real reference data not found at {path} (../shared/data is absent in a plain clone)")
    return path


@pytest.fixture
def hpa2021_dir() -> Path:
    return shared_path("hpa2021")
