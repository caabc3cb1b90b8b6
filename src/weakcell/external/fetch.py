"""Fetching one channel file politely: urllib3's pool, retries and backoff, a shared request rate, and the
HPA's TIFF when its JPEG is missing or does not decode.

Why urllib3 itself and not requests on top of it: requests reads bodies with ``preload_content=False``, so
urllib3's ``Retry`` covers the request and its headers but not a body that stalls or ends short. Read here
with ``preload_content=True``, a stalled body (read timeout) and a truncated one (fewer bytes than
Content-Length: urllib3 2 enforces it) are retried under the same policy as a 5xx answer: up to
``retries`` times, ``backoff_s * 2**(n-1)`` seconds apart, honouring ``Retry-After``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import urllib3
from urllib3.exceptions import (
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    SSLError,
    TimeoutError,
)
from urllib3.util.retry import Retry

from weakcell import __version__
from weakcell.data.decode import decode_channel
from weakcell.data.images import ImageReadError

# Tried in this order for every channel: the 8-bit JPEG, then the 16-bit gzipped TIFF.
FORMATS: tuple[str, ...] = (".jpg", ".tif.gz")
# Answers retried with backoff: rate limiting and server faults. 404 is final (the fallback is next).
RETRY_STATUSES = (429, 500, 502, 503, 504)
USER_AGENT = f"weakcell/{__version__} (HPA external data; polite rate)"


class ChannelFailed(Exception):
    """No format of one channel could be fetched and decoded; ``reasons`` says why, one per format."""

    def __init__(self, url_stem: str, reasons: list[str]) -> None:
        super().__init__(f"{url_stem}: " + "; ".join(reasons))
        self.reasons = reasons


class RateLimiter:
    """At most ``rate`` calls of ``wait`` per second over every thread: each call reserves the next slot
    ``1 / rate`` seconds after the previous one and sleeps until it."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


@dataclass
class Channel:
    """One decoded channel and how it came."""

    plane: np.ndarray  # (H, W) uint8 or uint16, as decoded
    source: str  # the format it came in: "jpg" or "tif.gz"
    nbytes: int  # bytes downloaded for it, every format tried included
    retries: int  # retries spent on it
    reasons: list[str] = field(default_factory=list)  # why earlier formats were not used


class Fetcher:
    """A thread-safe client: one urllib3 pool for every worker, one request rate for all of them."""

    def __init__(
        self, *, workers: int, rate: float, timeout_s: float, retries: int, backoff_s: float
    ) -> None:
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            redirect=3,
            backoff_factor=backoff_s,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,  # the last 5xx answer comes back: it is a reason, not an exception
            respect_retry_after_header=True,
        )
        self.pool = urllib3.PoolManager(
            maxsize=workers,
            retries=retry,
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            headers={"User-Agent": USER_AGENT},
        )
        self.limiter = RateLimiter(rate)
        # urllib3 logs each retry as a warning; the summary counts them instead of a line per retry.
        logging.getLogger("urllib3").setLevel(logging.ERROR)

    def get(self, url: str) -> tuple[int, bytes, int]:
        """GET ``url`` -> (status, body, retries spent). Raises ``HTTPError`` once retries are spent on
        timeouts or broken connections (``MaxRetryError``, its ``reason`` the last fault). The rate applies
        to each call; urllib3's retries inside it are spaced by the backoff instead."""
        self.limiter.wait()
        response = self.pool.request("GET", url, preload_content=True)
        history = response.retries.history if response.retries is not None else ()
        return response.status, response.data, len(history)

    def channel(self, url_stem: str, color: str) -> Channel:
        """Fetch and decode ``<url_stem>_<color>.jpg``, else ``.tif.gz``. Raises ChannelFailed with a reason
        per format (an HTTP status, a timeout, a body that does not decode)."""
        reasons: list[str] = []
        nbytes = retries = 0
        for suffix in FORMATS:
            url = f"{url_stem}_{color}{suffix}"
            try:
                status, data, spent = self.get(url)
            except HTTPError as err:
                reasons.append(f"{suffix[1:]}: {_describe(err)}")
                continue
            nbytes += len(data)
            retries += spent
            if status != 200:
                reasons.append(f"{suffix[1:]}: HTTP {status}")
                continue
            try:
                plane = decode_channel(data, url.rsplit("/", 1)[-1])
            except ImageReadError:
                reasons.append(f"{suffix[1:]}: does not decode")
                continue
            return Channel(plane, suffix[1:], nbytes, retries, reasons)
        raise ChannelFailed(url_stem + f"_{color}", reasons)


# The last fault of a request that got no answer, by urllib3's exception type -> a short reason.
FAULTS: tuple[tuple[type[Exception], str], ...] = (
    (TimeoutError, "timeout"),  # urllib3's: ReadTimeoutError, ConnectTimeoutError
    (NewConnectionError, "no connection"),
    (ProtocolError, "broken or truncated body"),
    (SSLError, "TLS error"),
)


def _describe(err: HTTPError) -> str:
    """A short reason for a request that failed without an answer."""
    reason = err.reason if isinstance(err, MaxRetryError) and err.reason is not None else err
    return next((text for kind, text in FAULTS if isinstance(reason, kind)), type(reason).__name__)
