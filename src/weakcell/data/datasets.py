"""Dataset layouts as data, not branches: every reader looks the layout up here."""

from __future__ import annotations

from dataclasses import dataclass

from weakcell.constants import HPA2018_CLASSES, HPA2021_CLASSES, NEGATIVE
from weakcell.errors import UnknownName


@dataclass(frozen=True)
class DatasetSpec:
    """How one Kaggle layout names its files and columns."""

    name: str
    classes: tuple[str, ...]
    id_column: str  # image ID column of the label file
    label_column: str  # label column of the label file
    label_sep: str  # separator inside a label string
    negative: int | None  # index of the "no specific signal" class, if the set has one
    label_file: str = "train.csv"
    train_dir: str = "train"
    test_dir: str = "test"
    sample_submission: str = "sample_submission.csv"
    has_truth: bool = False  # per-cell truth in truth/ (synthetic only)
    # what the competition scores: "cell" = 2021 cell-level masks (``ID,ImageWidth,ImageHeight,
    # PredictionString``), "image" = 2018 image labels (``Id,Predicted``); the sample submission has that form
    submission: str = "cell"

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def image_level_columns(self) -> tuple[str, str, str]:
        """(ID column, labels column, separator) of ``image_level.csv``: the 2018 submission ``Id,Predicted``
        (space-separated) where images are scored; else the label file's own layout (2021: ``ID,Label``,
        ``|``), since the 2021 competition scores cells only and its image labels are no Kaggle file."""
        if self.submission == "image":
            return self.id_column, "Predicted", " "
        return self.id_column, self.label_column, self.label_sep


DATASETS: dict[str, DatasetSpec] = {
    "hpa2021": DatasetSpec("hpa2021", HPA2021_CLASSES, "ID", "Label", "|", NEGATIVE),
    "hpa2018": DatasetSpec("hpa2018", HPA2018_CLASSES, "Id", "Target", " ", None, submission="image"),
    # The embedded benchmark is written in the hpa2021 layout, plus truth/.
    "synthetic": DatasetSpec("synthetic", HPA2021_CLASSES, "ID", "Label", "|", NEGATIVE, has_truth=True),
    # The 2018-flavoured benchmark: the hpa2018 layout and 28 classes (no Negative), plus truth/.
    "synthetic2018": DatasetSpec(
        "synthetic2018", HPA2018_CLASSES, "Id", "Target", " ", None, has_truth=True, submission="image"
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    """The layout called ``name``; a clear error lists the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownName(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None
