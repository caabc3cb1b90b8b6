"""Names every Kaggle command shares: the competition, the account, the dataset and kernel ids.

Kaggle derives a slug from a title (lower case, runs of other characters -> ``-``); titles here are the
slug with spaces, so the two always agree and ``kaggle kernels push`` does not warn.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from weakcell.config import Config
from weakcell.errors import StageError, UnknownName

PLACEHOLDER_OWNER = "your-kaggle-username"
COMPETITION_LAYOUTS = ("hpa2021", "hpa2018")
# the competition whose test split each synthetic layout stands in for
SYNTHETIC_STANDS_IN = {"synthetic": "hpa2021", "synthetic2018": "hpa2018"}


def competition_key(cfg: Config) -> str:
    """The weakcell layout of the competition targeted: ``kaggle.competition``, else ``data.dataset`` when it
    is a competition layout, else the competition a synthetic layout copies (``synthetic`` the 2021 one,
    ``synthetic2018`` the 2018 one), else hpa2021."""
    if cfg.kaggle.competition:
        return cfg.kaggle.competition
    if cfg.data.dataset in COMPETITION_LAYOUTS:
        return cfg.data.dataset
    return SYNTHETIC_STANDS_IN.get(cfg.data.dataset, "hpa2021")


def competition_slug(cfg: Config, key: str | None = None) -> str:
    """Kaggle slug of the competition whose data has the weakcell layout ``key``."""
    key = key or competition_key(cfg)
    try:
        return cfg.kaggle.competitions[key]
    except KeyError:
        known = ", ".join(f"{k} ({v})" for k, v in cfg.kaggle.competitions.items())
        raise UnknownName(
            f"no Kaggle competition for dataset {key!r} in kaggle.competitions; known: {known}"
        ) from None


def kaggle_config_dir() -> Path:
    """Where the Kaggle client looks for ``kaggle.json``: ``$KAGGLE_CONFIG_DIR``, else ``~/.kaggle`` (on Linux
    ``$XDG_CONFIG_HOME/kaggle`` when ``~/.kaggle`` does not exist), as ``kaggle`` 1.6-2.x does."""
    configured = os.environ.get("KAGGLE_CONFIG_DIR")
    if configured:
        return Path(configured)
    home = Path.home() / ".kaggle"
    if sys.platform.startswith("linux") and not home.exists():
        xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(xdg) / "kaggle"
    return home


TOKEN_HOME = "~/.kaggle/kaggle.json"  # the README's path: the client reads it whenever ~/.kaggle exists


def token_path() -> str:
    """Where to save a new ``kaggle.json``, as the README says it: ``$KAGGLE_CONFIG_DIR/kaggle.json`` when
    that is set, else ``~/.kaggle/kaggle.json`` (which the client always reads once the folder exists; its
    XDG fallback is only for a machine without ~/.kaggle)."""
    configured = os.environ.get("KAGGLE_CONFIG_DIR")
    return str(Path(configured) / "kaggle.json") if configured else TOKEN_HOME


def resolve_owner(cfg: Config) -> str:
    """``kaggle.owner``, else ``$KAGGLE_USERNAME``, else the username in ``kaggle.json`` (the key in that file
    is never read), else ``PLACEHOLDER_OWNER``."""
    if cfg.kaggle.owner:
        return cfg.kaggle.owner
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    token = kaggle_config_dir() / "kaggle.json"
    try:
        username = json.loads(token.read_text()).get("username")
    except (OSError, ValueError, AttributeError):
        username = None
    return str(username) if username else PLACEHOLDER_OWNER


def slugify(text: str) -> str:
    """Kaggle's slug of a title: lower case, every run of characters outside ``[a-z0-9]`` -> ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def title_of(slug: str) -> str:
    return slug.replace("-", " ")


def _fill(template: str, cfg: Config, field: str, variant: str = "") -> str:
    try:
        return slugify(template.format(name=cfg.name, variant=variant))
    except (KeyError, IndexError, ValueError) as err:
        raise StageError(
            f"kaggle.{field}={template!r}: only {{name}} and {{variant}} may be filled in ({err})"
        ) from None


def wheels_slug(cfg: Config) -> str:
    return _fill(cfg.kaggle.wheels_dataset, cfg, "wheels_dataset")


def weights_slug(cfg: Config) -> str:
    return _fill(cfg.kaggle.weights_dataset, cfg, "weights_dataset")


def backbone_slug(cfg: Config) -> str:
    """The slug part of ``kaggle.backbone_dataset`` (which may be ``owner/slug``)."""
    return _fill(slug_of(cfg.kaggle.backbone_dataset), cfg, "backbone_dataset")


def backbone_id(cfg: Config) -> str:
    """``owner/slug`` of the backbone dataset: the owner given in ``kaggle.backbone_dataset``, else ours."""
    owner, _, _ = cfg.kaggle.backbone_dataset.rpartition("/")
    return f"{owner or resolve_owner(cfg)}/{backbone_slug(cfg)}"


def kernel_slug(cfg: Config, variant: str) -> str:
    return _fill(cfg.kaggle.kernel, cfg, "kernel", variant)


def dataset_id(cfg: Config, slug_or_id: str) -> str:
    """``owner/slug``: an id is kept as given, a bare slug gets the resolved owner."""
    return slug_or_id if "/" in slug_or_id else f"{resolve_owner(cfg)}/{slug_or_id}"


def slug_of(dataset: str) -> str:
    """The folder an attached dataset is mounted as: the slug part of ``owner/slug``."""
    return dataset.rsplit("/", 1)[-1]


def datasets_root(cfg: Config) -> Path:
    """Where the dataset folders are written (``kaggle.datasets_dir``, default ``dist/kaggle``)."""
    return cfg.path(cfg.kaggle.datasets_dir)
