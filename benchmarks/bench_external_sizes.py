"""What the public HPA images cost in bytes, and the dry run's arithmetic for the real lists.

Run from the repository root (needs ../shared/data/hpa2021):

    python benchmarks/bench_external_sizes.py

The HPA serves each channel as a JPEG (its quality is not published) and a 16-bit .tif.gz. The 5 real
2048² training images of the competition are re-encoded here as JPEG at quality 85, 90 and 95, grey and
painted in their stain's colour (the HPA's JPEGs are coloured), as 16-bit .tif.gz, and stored as PNG at
several zlib levels at 2048² and 1024²; bytes per pixel of one channel, mean over the 20 channels. Then
``weakcell.external.stage.Estimate`` (the numbers ``make external --dry-run`` prints) for the hosts' full
v21 list (83,762 images) and the 41,101 external images 2nd place trained on. Writes
``benchmarks/external-sizes.md``.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import cv2
import numpy as np
import tifffile

from weakcell.config import ExternalConfig
from weakcell.constants import CHANNELS
from weakcell.data.images import list_image_ids, read_image
from weakcell.external.stage import JPEG_BYTES_PER_PIXEL, MEAN_NATIVE_PIXELS, PNG_BYTES_PER_PIXEL, Estimate

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO.parent / "shared" / "data" / "hpa2021" / "train"
OUTPUT = REPO / "benchmarks" / "external-sizes.md"
STAIN_BGR = {"red": (0, 0, 1), "green": (0, 1, 0), "blue": (1, 0, 0), "yellow": (0, 1, 1)}
LISTS = {"hosts' v21 list (all)": 83_762, "2nd place's external set": 41_101}


# (row, which version of the channel, file type, OpenCV parameter, its value)
ENCODINGS = [
    *(
        (f"JPEG q{q}, {look}", look, ".jpg", cv2.IMWRITE_JPEG_QUALITY, q)
        for q in (85, 90, 95)
        for look in ("grey", "stain colour")
    ),
    *(
        (f"PNG level {level}, {side}²", side, ".png", cv2.IMWRITE_PNG_COMPRESSION, level)
        for level in (1, 3, 6)
        for side in (2048, 1024)
    ),
]


def measure() -> dict[str, float]:
    """Bytes per pixel of one channel, mean over every channel of the 5 images."""
    sizes: dict[str, list[float]] = {}
    for image_id in list_image_ids(TRAIN):
        for color, plane in zip(CHANNELS, read_image(TRAIN, image_id)):
            versions = {
                "grey": plane,
                2048: plane,
                "stain colour": np.stack([plane * w for w in STAIN_BGR[color]], axis=-1).astype(np.uint8),
                1024: cv2.resize(plane, (1024, 1024), interpolation=cv2.INTER_AREA),
            }
            for row, version, suffix, parameter, value in ENCODINGS:
                pixels = versions[version]
                nbytes = len(cv2.imencode(suffix, pixels, [parameter, value])[1])
                sizes.setdefault(row, []).append(nbytes / (pixels.shape[0] * pixels.shape[1]))
            buffer = io.BytesIO()
            tifffile.imwrite(buffer, plane.astype(np.uint16) * 257)
            sizes.setdefault("16-bit .tif.gz", []).append(
                len(gzip.compress(buffer.getvalue(), 6)) / plane.size
            )
    return {key: float(np.mean(values)) for key, values in sizes.items()}


def main() -> None:
    rates = measure()
    lines = [
        "# External data: bytes per image and the dry run's arithmetic",
        "",
        "`python benchmarks/bench_external_sizes.py`: bytes, not times (any machine gives these figures); the 5 "
        "real 2048² training images of ../shared/data/hpa2021, 20 channels.",
        "",
        "| encoding of one channel | bytes per pixel | MB at 2048² |",
        "|---|---:|---:|",
    ]
    lines += [f"| {key} | {rate:.3f} | {rate * 2048 * 2048 / 1e6:.2f} |" for key, rate in rates.items()]
    lines += [
        "",
        f"The dry run assumes {JPEG_BYTES_PER_PIXEL} bytes per pixel fetched (JPEG q90 grey) and "
        f"{PNG_BYTES_PER_PIXEL} stored (PNG level 1), and a mean image of {MEAN_NATIVE_PIXELS / 1e6:.2f} Mpx "
        "(the competition's mix: 17,955 images at 2048², 3,842 at 3072², 9 at 4096²).",
        "",
        "| list | images | requests | download | stored, native | stored, 1024² | time at 8 requests/s | "
        "bandwidth that rate needs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, images in LISTS.items():
        native = Estimate.of(images, ExternalConfig())
        small = Estimate.of(images, ExternalConfig(size=1024))
        lines.append(
            f"| {name} | {images:,} | {native.requests:,} | {native.download_bytes / 1e9:,.0f} GB | "
            f"{native.stored_bytes / 1e9:,.0f} GB | {small.stored_bytes / 1e9:,.0f} GB | {native.seconds / 3600:,.1f} h | "
            f"{native.download_bytes / native.seconds * 8 / 1e6:,.0f} Mbit/s |"
        )
    OUTPUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"-> {OUTPUT}")


if __name__ == "__main__":
    main()
