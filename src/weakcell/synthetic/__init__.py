"""The synthetic HPA benchmark: images in the hpa2021 layout whose every cell has its own truth.

``generate_image`` makes one image with its masks and per-cell labels; ``writer.run`` (``make data``)
writes a whole set; ``preview.run`` (``make preview``) draws a montage; ``read_truth`` reads the
per-cell truth table back and ``inheritance_errors`` measures what label inheritance gets wrong.
"""

from weakcell.synthetic.generate import SyntheticImage, generate_image, image_seed
from weakcell.synthetic.geometry import CELL_LINES
from weakcell.synthetic.patterns import PATTERNS
from weakcell.synthetic.truth import inheritance_errors, read_image_labels, read_truth

__all__ = [
    "CELL_LINES",
    "PATTERNS",
    "SyntheticImage",
    "generate_image",
    "image_seed",
    "inheritance_errors",
    "read_image_labels",
    "read_truth",
]
