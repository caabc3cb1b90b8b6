"""Domain constants defined once: channel order, class tables of both HPA competitions, colours."""

from __future__ import annotations

from typing import Literal

# Channel order of every array in the kit: (4, H, W) = R microtubules, G protein, B nucleus, Y ER.
CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")
CHANNEL_ROLES: dict[str, str] = {
    "red": "microtubules",
    "green": "protein of interest",
    "blue": "nucleus",
    "yellow": "endoplasmic reticulum",
}

# HPA Single Cell Classification (Kaggle 2021): 19 classes, 18 = Negative.
HPA2021_CLASSES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Intermediate filaments",
    "Actin filaments",
    "Microtubules",
    "Mitotic spindle",
    "Centrosome",
    "Plasma membrane",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Vesicles and punctate cytosolic patterns",
    "Negative",
)
NEGATIVE = 18

# Label counts over the 21,806 rows of the 2021 train.csv (../shared/data/README.md); the synthetic
# generator draws image classes from these frequencies.
HPA2021_CLASS_COUNTS: tuple[int, ...] = (
    8797,
    1095,
    2451,
    1262,
    1425,
    1792,
    775,
    1846,
    964,
    1011,
    818,
    78,
    1734,
    3216,
    2013,
    252,
    5685,
    621,
    34,
)
HPA2021_N_IMAGES = 21806

# HPA Image Classification (Kaggle 2018): 28 classes.
HPA2018_CLASSES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Peroxisomes",
    "Endosomes",
    "Lysosomes",
    "Intermediate filaments",
    "Actin filaments",
    "Focal adhesion sites",
    "Microtubules",
    "Microtubule ends",
    "Cytokinetic bridge",
    "Mitotic spindle",
    "Microtubule organizing center",
    "Centrosome",
    "Lipid droplets",
    "Plasma membrane",
    "Cell junctions",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Cytoplasmic bodies",
    "Rods & rings",
)

# Label counts over the 31,072 rows of the 2018 train.csv (../shared/data/hpa2018/train.csv; 1.63 labels per
# image); the 2018-flavoured synthetic set draws image classes from these. 8, 9, 10, 15 and 27 are very rare.
HPA2018_CLASS_COUNTS: tuple[int, ...] = (
    12885,
    1254,
    3621,
    1561,
    1858,
    2513,
    1008,
    2822,
    53,
    45,
    28,
    1093,
    688,
    537,
    1066,
    21,
    530,
    210,
    902,
    1482,
    172,
    3777,
    802,
    2965,
    322,
    8228,
    328,
    11,
)
HPA2018_N_IMAGES = 31072

# Readings of the 2021 metric (weakcell.competition_metric): "image" = the organisers' (class c is judged
# only in images with a true cell of class c), "all" = every class judged in every image (stricter).
Verified = Literal["image", "all"]
READINGS: tuple[Verified, ...] = ("image", "all")

# The ways a cell's class score is formed from a round's out-of-fold outputs (weakcell.scoring.CELL_SCORES
# holds the formulas; a config names one, e.g. refine.score).
CellScore = Literal["stage1", "mil_instance", "mil_attention", "stage1_x_image", "confidence"]

# The empty mask as the 2021 competition encodes it (pycocotools RLE -> zlib level 9 -> base64); the
# sample submission uses it as a placeholder.
EMPTY_MASK_RLE = "eNoLCAgIMAEABJkBdQ=="

# Display colours (RGB, 0-1) used when composing the 4 channels into one picture: yellow adds to red
# and green, as the HPA website renders it.
CHANNEL_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (0.5, 0.5, 0.0),
}


def prob_columns(n_classes: int, prefix: str = "p_") -> list[str]:
    """Column names of per-class scores in every prediction table (OOF, inference): ``p_0 .. p_{C-1}``."""
    return [f"{prefix}{c}" for c in range(n_classes)]


# The 17 cell lines of the 2021 competition's images (the list the top teams filtered the public HPA images
# by; e.g. SamusRam/hpa-single-cell, src/data/utils.py). Names as the HPA spells them in its image lists.
HPA2021_CELL_LINES: tuple[str, ...] = (
    "A-431",
    "A549",
    "EFO-21",
    "HAP1",
    "HEK 293",
    "HUVEC TERT2",
    "HaCaT",
    "HeLa",
    "PC-3",
    "RH-30",
    "RPTEC TERT1",
    "SH-SY5Y",
    "SK-MEL-30",
    "SiHa",
    "U-2 OS",
    "U-251 MG",
    "hTCEpi",
)
