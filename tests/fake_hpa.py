"""A fake HPA image site on 127.0.0.1 for the downloader's tests: real channel planes (or generated ones
when ../shared is absent) served as JPEG and as 16-bit ``.tif.gz``, with faults planted per URL path, and
every request counted."""

from __future__ import annotations

import gzip
import http.server
import io
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile

from weakcell.constants import CHANNELS
from weakcell.data.images import read_image

# BGR weights that paint a grey plane in its stain's colour, as the HPA's JPEGs are
STAIN_BGR = {"red": (0, 0, 1), "green": (0, 1, 0), "blue": (1, 0, 0), "yellow": (0, 1, 1)}


def source_images(shared_train: Path | None, n: int, side: int = 128) -> list[np.ndarray]:
    """``n`` (4, side, side) uint8 images: the real ones of ``shared_train`` area-resized (cycled), else
    generated blobs."""
    if shared_train is not None and shared_train.is_dir():
        ids = sorted({p.name.rsplit("_", 1)[0] for p in shared_train.glob("*_green.png")})
        real = [read_image(shared_train, i) for i in ids]
        small = [
            np.stack([cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA) for c in im]) for im in real
        ]
        # past the real ones, flipped and rotated versions stay distinct images
        return [np.rot90(small[k % len(small)], k // len(small), axes=(1, 2)).copy() for k in range(n)]
    rng = np.random.default_rng(7)
    images = []
    for _ in range(n):
        image = np.zeros((4, side, side), np.uint8)
        for _ in range(12):
            y, x = rng.integers(0, side - 16, 2)
            image[:, y : y + 14, x : x + 14] = rng.integers(20, 250, (4, 1, 1))
        images.append(cv2.GaussianBlur(image.transpose(1, 2, 0), (5, 5), 2).transpose(2, 0, 1).copy())
    return images


def jpeg(plane: np.ndarray, color: str | None = None, quality: int = 92) -> bytes:
    """A plane as JPEG, grey or painted in ``color``'s stain colour."""
    pixels = (
        plane if color is None else np.stack([plane * w for w in STAIN_BGR[color]], axis=-1).astype(np.uint8)
    )
    ok, data = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def tif_gz(plane: np.ndarray) -> bytes:
    """A plane as 16-bit TIFF (v * 257, as a 16-bit camera file of it), gzipped."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, plane.astype(np.uint16) * 257)
    return gzip.compress(buffer.getvalue())


@dataclass
class Route:
    """What the site answers for one path: ``body`` after ``fail`` answers of ``fault``."""

    body: bytes | None  # None = 404
    fault: str | None = None  # "500" | "stall" | "truncate" (a body cut at half its Content-Length)
    fail: int = 0  # how many answers are faulty before the good ones; -1 = all
    delay: float = 0.0  # seconds before every answer


@dataclass
class FakeSite:
    routes: dict[str, Route] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    stall_s: float = 3.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    base: str = ""

    def add_image(self, stem: str, image: np.ndarray, colored: bool = True) -> None:
        """Serve every channel of ``image`` at ``/<stem>_<color>.jpg`` and ``.tif.gz``."""
        for color, plane in zip(CHANNELS, image):
            self.routes[f"/{stem}_{color}.jpg"] = Route(jpeg(plane, color if colored else None))
            self.routes[f"/{stem}_{color}.tif.gz"] = Route(tif_gz(plane))

    def count(self, stem: str) -> int:
        """Requests made for the files of the image ``stem``."""
        return sum(n for path, n in self.requests.items() if path.startswith(f"/{stem}_"))


def _handler(site: FakeSite) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            with site.lock:
                site.requests[self.path] += 1
                seen = site.requests[self.path]
            route = site.routes.get(self.path, Route(None))
            time.sleep(route.delay)
            faulty = route.fault is not None and (route.fail < 0 or seen <= route.fail)
            if route.body is None or (faulty and route.fault == "500"):
                status = 404 if route.body is None else 500
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if faulty and route.fault == "stall":
                time.sleep(site.stall_s)
                self.close_connection = True
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            if faulty and route.fault == "truncate":
                self.wfile.write(route.body[: len(route.body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(route.body)

    return Handler


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # a client that gave up (a timeout, a killed run) closes its end: not the test's failure
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextmanager
def serve(site: FakeSite) -> Iterator[FakeSite]:
    """Run ``site`` on 127.0.0.1 (a free port) while the block runs; ``site.base`` is its URL."""
    server = _QuietServer(("127.0.0.1", 0), _handler(site))
    server.daemon_threads = True
    server.block_on_close = False  # a stalled answer must not hold the test's teardown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    site.base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()
