"""Public HPA image lists -> one table of images to fetch: ID, URL stem, antibody, cell line, locations.

Two forms are read (``external.list_format``, or detected from the header):

* ``hpa2021``: the hosts' ``kaggle_2021.tsv`` (tab- or comma-separated): ``Image``, a URL stem
  ``https://images.proteinatlas.org/<antibody>/<plate>_<well>_<field>``; ``Cellline``; ``in_trainset`` (True
  for images already in the competition's train set); ``Label``, location names separated by commas.
* ``hpav18``: the 2018 ``HPAv18RBGY_wodpl.csv``: ``Id`` = ``<antibody>_<plate>_<well>_<field>`` and ``Target``,
  2018 class numbers separated by spaces; images under ``http://v18.proteinatlas.org/images/<antibody>/``.

An image's ID is ``<antibody>_<plate>_<well>_<field>`` (``/`` cannot be in a file name): a list's name is
first checked to have that form (``NAME_PART``, ``NAME_FIELD``: letters, digits and ``-`` per part), then
mapped to its file stem by the kit's one ID rule (``weakcell.data.ids.safe_stem``); every channel file path
goes through ``weakcell.data.ids.inside``, so no path built from an ID leaves its folder.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from weakcell.constants import CHANNELS, HPA2018_CLASSES
from weakcell.data.ids import RULE, IdError, inside, is_safe_id, safe_stem
from weakcell.errors import StageError, UnknownName
from weakcell.external.locations import map_locations

# The form of a public HPA image name (not the path rule, which is ``weakcell.data.ids``'): one part is the
# antibody (a number on the HPA's servers) or plate, well, field, without '/', '.', '_' or spaces;
# <plate>_<well>_<field> is two to four parts joined by '_'.
NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
NAME_FIELD = re.compile(rf"{NAME_PART.pattern}(?:_{NAME_PART.pattern}){{1,3}}")
# Columns of the image table every list form is read into.
COLUMNS = ("ID", "url_stem", "antibody", "cell_line", "in_trainset", "locations")


class ListError(StageError):
    """An image list that cannot be trusted; the message names the file and rows."""


@dataclass(frozen=True)
class ListFormat:
    """One public list form: the columns that identify it and how its rows become the image table."""

    name: str
    columns: tuple[str, ...]
    base_url: str | None  # where its images live when the list names no host
    parse: Callable[[pd.DataFrame, str | None], tuple[pd.DataFrame, list[str]]]


def image_id(antibody: str, plate_well_field: str) -> str:
    """``("10005", "921_B9_1")`` -> ``"10005_921_B9_1"`` (``safe_stem`` of ``10005/921_B9_1``); raises
    ListError when a part is not of the public form or the stem would be cut to the ID rule's length."""
    name = f"{antibody}/{plate_well_field}"
    if not NAME_PART.fullmatch(antibody) or not NAME_FIELD.fullmatch(plate_well_field):
        raise ListError(
            f"unsafe image name {antibody!r}/{plate_well_field!r}: expected <antibody>/<plate>_<well>_<field> "
            "of letters, digits and '-'"
        )
    stem = safe_stem(name)
    if len(stem) != len(name):  # safe_stem keeps at most 200 characters: two names could share one stem
        raise ListError(f"image name {name!r} is longer than an image ID may be ({RULE})")
    return stem


def channel_file(folder: Path, image: str, color: str, suffix: str = ".png") -> Path:
    """``folder/<image>_<color><suffix>`` for an ID of the kit's rule (``weakcell.data.ids``), refusing any
    name that would leave ``folder`` (``inside``)."""
    name = f"{image}_{color}{suffix}"
    if not is_safe_id(image) or color not in CHANNELS:
        raise ListError(f"unsafe file name {name!r} for image {image!r}")
    try:
        return inside(folder, name)
    except IdError as err:
        raise ListError(f"unsafe file name {name!r} for image {image!r}") from err


def _stem(antibody: str, plate_well_field: str, listed: str | None, base_url: str | None) -> str:
    if base_url:
        return f"{base_url.rstrip('/')}/{antibody}/{plate_well_field}"
    if listed is None:
        raise ListError("this list form names no host; set external.base_url")
    return listed


def _parse_hpa2021(table: pd.DataFrame, base_url: str | None) -> tuple[pd.DataFrame, list[str]]:
    rows, problems = [], []
    cell_lines = table["Cellline"] if "Cellline" in table else pd.Series("", index=table.index)
    in_trainset = table["in_trainset"] if "in_trainset" in table else pd.Series("", index=table.index)
    for row, (stem, cell_line, trainset, label) in enumerate(
        zip(table["Image"], cell_lines, in_trainset, table["Label"]), start=1
    ):
        url = urlsplit(stem.strip())
        parts = url.path.strip("/").split("/")
        try:
            if url.scheme not in ("http", "https") or not url.netloc or url.query or url.fragment:
                raise ListError(f"{stem!r} is not an http(s) URL stem")
            if len(parts) < 2:
                raise ListError(f"{stem!r} lacks <antibody>/<plate>_<well>_<field>")
            identifier = image_id(parts[-2], parts[-1])
        except ListError as err:
            problems.append(f"row {row}: {err}")
            continue
        rows.append(
            (
                identifier,
                _stem(parts[-2], parts[-1], stem.strip(), base_url),
                parts[-2],
                cell_line.strip(),
                _truth(trainset),
                [name.strip() for name in label.split(",") if name.strip()],
            )
        )
    return pd.DataFrame(rows, columns=list(COLUMNS)), problems


def _parse_hpav18(table: pd.DataFrame, base_url: str | None) -> tuple[pd.DataFrame, list[str]]:
    rows, problems = [], []
    for row, (identifier, target) in enumerate(zip(table["Id"], table["Target"]), start=1):
        antibody, _, plate_well_field = identifier.strip().partition("_")
        try:
            checked = image_id(antibody, plate_well_field)
            numbers = [int(token) for token in target.split()]
            if any(not 0 <= n < len(HPA2018_CLASSES) for n in numbers):
                raise ListError(f"Target {target!r} holds a class outside 0..{len(HPA2018_CLASSES) - 1}")
        except ValueError as err:  # ListError is one too
            problems.append(f"row {row}: {err}")
            continue
        names = [HPA2018_CLASSES[n] for n in numbers]
        rows.append((checked, _stem(antibody, plate_well_field, None, base_url), antibody, "", None, names))
    return pd.DataFrame(rows, columns=list(COLUMNS)), problems


LIST_FORMATS: dict[str, ListFormat] = {
    "hpa2021": ListFormat("hpa2021", ("Image", "Label"), None, _parse_hpa2021),
    "hpav18": ListFormat("hpav18", ("Id", "Target"), "http://v18.proteinatlas.org/images", _parse_hpav18),
}


def _truth(text: str) -> bool | None:
    lowered = str(text).strip().lower()
    return True if lowered in ("true", "1", "yes") else False if lowered in ("false", "0", "no") else None


def read_image_list(
    path: str | os.PathLike[str], list_format: str = "auto", base_url: str | None = None
) -> tuple[pd.DataFrame, ListFormat]:
    """Read a public image list into the image table (``COLUMNS``) in file order, and its form.

    ``base_url`` replaces where the images live (a mirror, a test server). Raises ListError naming the
    file and its first bad rows (an unsafe name, a class out of range); every row must be sound."""
    path = Path(path)
    if not path.is_file():
        raise ListError(
            f"image list not found: {path}; set external.image_list to the hosts' kaggle_2021.tsv "
            "or HPAv18RBGY_wodpl.csv"
        )
    with path.open(encoding="utf-8", errors="replace") as handle:
        header = handle.readline()
    table = pd.read_csv(path, sep="\t" if "\t" in header else ",", dtype=str, keep_default_na=False)
    fmt = _list_format(path, list(table.columns), list_format)
    images, problems = fmt.parse(table, base_url or fmt.base_url)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ListError(f"{path}: {len(problems)} bad row(s): {shown}; fix or remove them")
    return images, fmt


def _list_format(path: Path, columns: list[str], requested: str) -> ListFormat:
    if requested != "auto":
        if requested not in LIST_FORMATS:
            raise UnknownName(f"unknown list format {requested!r}; known: auto, {', '.join(LIST_FORMATS)}")
        candidates = [LIST_FORMATS[requested]]
    else:
        candidates = list(LIST_FORMATS.values())
    for fmt in candidates:
        if set(fmt.columns) <= set(columns):
            return fmt
    wanted = " or ".join(f"{f.name} ({', '.join(f.columns)})" for f in candidates)
    raise ListError(f"{path}: columns {columns} are not a known image list; expected {wanted}")


@dataclass
class Selection:
    """The images kept, with their classes, and how many each filter dropped (in the order applied)."""

    images: pd.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)
    unmapped: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


def select_images(
    images: pd.DataFrame,
    table: Mapping[str, int],
    *,
    drop_in_trainset: bool,
    cell_lines: Sequence[str] | None,
    keep_classes: Sequence[int],
    max_images: int | None = None,
) -> Selection:
    """Apply the filters the top teams used, in this order, counting what each drops:

    repeated IDs (the first row wins); ``in_trainset`` images (already in the competition's train set);
    images with an empty label; images none of whose locations is a class of ``table`` (names outside it
    are counted in ``unmapped`` and dropped from every label); images of other cell lines than
    ``cell_lines`` unless they hold one of ``keep_classes``; images past ``max_images``.
    Adds ``classes`` (sorted class indices) to the kept images."""
    selection = Selection(images)
    kept = images.drop_duplicates("ID")
    selection.dropped["repeated in the list"] = len(images) - len(kept)
    if drop_in_trainset:
        if kept["in_trainset"].isna().all():
            selection.notes.append("the list has no in_trainset column: nothing dropped for it")
        is_trainset = kept["in_trainset"].eq(True).to_numpy(dtype=bool)
        selection.dropped["in the competition's train set"] = int(is_trainset.sum())
        kept = kept[~is_trainset]
    empty = kept["locations"].map(len).eq(0).to_numpy(dtype=bool)
    selection.dropped["empty label"] = int(empty.sum())
    kept = kept[~empty].copy()
    mapped = [map_locations(names, table) for names in kept["locations"]]
    for _, unmapped in mapped:
        selection.unmapped.update(unmapped)
    kept["classes"] = [classes for classes, _ in mapped]
    no_class = kept["classes"].map(len).eq(0).to_numpy(dtype=bool)
    selection.dropped["no location of the class table"] = int(no_class.sum())
    kept = kept[~no_class]
    if cell_lines is not None:
        if kept["cell_line"].eq("").all():
            selection.notes.append("the list names no cell lines: external.cell_lines is not applied")
        else:
            wanted = set(cell_lines)
            keep = set(keep_classes)
            other = [
                line not in wanted and not keep.intersection(classes)
                for line, classes in zip(kept["cell_line"], kept["classes"])
            ]
            selection.dropped["other cell lines"] = int(sum(other))
            kept = kept[~pd.Series(other, index=kept.index, dtype=bool)]
    if max_images is not None and len(kept) > max_images:
        selection.dropped["past external.max_images"] = len(kept) - max_images
        kept = kept.iloc[:max_images]
    selection.images = kept.reset_index(drop=True)
    return selection
