"""The class tables the synthetic generator can write: which classes exist, how often real images show
them, how each is rendered, and whether the set has a Negative class. Keyed by dataset layout name
(``weakcell.data.datasets``): ``synthetic`` = the 2021 competition's 19 classes, ``synthetic2018`` = the
2018 competition's 28 (no Negative)."""

from __future__ import annotations

from dataclasses import dataclass

from weakcell.constants import HPA2018_CLASS_COUNTS, HPA2021_CLASS_COUNTS
from weakcell.data.datasets import DatasetSpec, get_dataset
from weakcell.errors import UnknownName
from weakcell.synthetic.patterns import PATTERNS, Pattern, autofluorescence
from weakcell.synthetic.patterns2018 import PATTERNS_2018

# The faint unspecific glow every cell shows, whatever it expresses (the 2021 Negative's look).
BACKGROUND = Pattern("autofluorescence", autofluorescence)


@dataclass(frozen=True)
class ClassTable:
    """One synthetic layout's classes: renderers by class index and the real label counts they are drawn by."""

    spec: DatasetSpec
    patterns: dict[int, Pattern]
    counts: tuple[int, ...]

    @property
    def negative(self) -> int | None:
        return self.spec.negative

    @property
    def n_classes(self) -> int:
        return self.spec.n_classes


CLASS_TABLES: dict[str, ClassTable] = {
    "synthetic": ClassTable(get_dataset("synthetic"), PATTERNS, HPA2021_CLASS_COUNTS),
    "synthetic2018": ClassTable(get_dataset("synthetic2018"), PATTERNS_2018, HPA2018_CLASS_COUNTS),
}


def class_table(dataset: str) -> ClassTable:
    """The synthetic class table of layout ``dataset``; a clear error names the synthetic ones."""
    try:
        return CLASS_TABLES[dataset]
    except KeyError:
        raise UnknownName(
            f"data.dataset={dataset} is not a synthetic layout; `weakcell data` writes "
            f"{' or '.join(sorted(CLASS_TABLES))} (e.g. configs/demo.yaml, configs/hpa2018-demo.yaml)"
        ) from None


HPA2021_TABLE = CLASS_TABLES["synthetic"]
