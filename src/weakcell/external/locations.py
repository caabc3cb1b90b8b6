"""HPA location names -> the class numbers of each competition, as tables (data, not branches).

Provenance. The 2021 table is the one the competition's hosts published in their notebook
"hpa-public-data-download-and-hpacellseg" (the same table is in the public repository
``SamusRam/hpa-single-cell``, ``src/data/utils.py``): each of the 19 classes is a location name of the HPA,
and a few names are merged into one class (Focal adhesion sites into Actin filaments, Centriolar satellite into
Centrosome, Cell Junctions into Plasma membrane, six vesicle-like compartments into "Vesicles and punctate
cytosolic patterns", No staining into Negative). The 2018 competition's 28 classes are HPA location names
themselves (its data page), so that table is the identity on those names. Names are matched without regard
to case ("Cell Junctions" in v21 lists, "Cell junctions" in 2018). A name in neither table is not a class of
that competition: ``map_locations`` returns it as unmapped, and the caller counts and drops it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from weakcell.constants import HPA2018_CLASSES, HPA2021_CLASSES
from weakcell.errors import UnknownName

# Location names merged into a 2021 class other than their own name (the hosts' table).
_HPA2021_MERGED: dict[str, str] = {
    "Focal adhesion sites": "Actin filaments",
    "Centriolar satellite": "Centrosome",
    "Cell Junctions": "Plasma membrane",
    "Vesicles": "Vesicles and punctate cytosolic patterns",
    "Peroxisomes": "Vesicles and punctate cytosolic patterns",
    "Endosomes": "Vesicles and punctate cytosolic patterns",
    "Lysosomes": "Vesicles and punctate cytosolic patterns",
    "Lipid droplets": "Vesicles and punctate cytosolic patterns",
    "Cytoplasmic bodies": "Vesicles and punctate cytosolic patterns",
    "No staining": "Negative",
}
# Class names that are not HPA location names (they come only through a merge above).
_NOT_LOCATIONS = {"Vesicles and punctate cytosolic patterns", "Negative"}


def _table(classes: tuple[str, ...], merged: Mapping[str, str]) -> Mapping[str, int]:
    """Lower-cased location name -> class index of ``classes``."""
    index = {name: k for k, name in enumerate(classes)}
    own = {name.lower(): k for name, k in index.items() if name not in _NOT_LOCATIONS}
    own.update({location.lower(): index[name] for location, name in merged.items()})
    return MappingProxyType(own)


# Class table name -> (its classes, location name -> class). ``data.dataset``'s class table picks one.
LOCATION_TABLES: dict[str, tuple[tuple[str, ...], Mapping[str, int]]] = {
    "hpa2021": (HPA2021_CLASSES, _table(HPA2021_CLASSES, _HPA2021_MERGED)),
    "hpa2018": (HPA2018_CLASSES, _table(HPA2018_CLASSES, {})),
}


def location_table(classes: tuple[str, ...]) -> Mapping[str, int]:
    """The location table whose classes are ``classes`` (a data set's class names)."""
    for known, table in LOCATION_TABLES.values():
        if known == classes:
            return table
    raise UnknownName(
        f"no location table for a class table of {len(classes)} classes; known: {', '.join(LOCATION_TABLES)}"
    )


def map_locations(names: Iterable[str], table: Mapping[str, int]) -> tuple[list[int], list[str]]:
    """Location names -> (sorted unique classes, names the table does not hold, in input order)."""
    classes: set[int] = set()
    unmapped: list[str] = []
    for name in names:
        cls = table.get(name.strip().lower())
        if cls is None:
            unmapped.append(name.strip())
        else:
            classes.add(cls)
    return sorted(classes), unmapped
