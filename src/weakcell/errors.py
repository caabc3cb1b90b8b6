"""The kit's expected errors: failures it foresees and explains in the message (a setting that does not
fit, a step not yet run, finished outputs made with other settings, a file that is not what it should be).

``weakcell <stage>`` prints these (and ``OSError``: files and folders) as one ``error:`` line; any other
exception is a bug, in the kit or a library, and keeps its traceback.
"""

from __future__ import annotations


class WeakcellError(Exception):
    """Base of every expected error; the message names what is wrong and how to fix it."""


class StageError(WeakcellError, ValueError):
    """A stage cannot go on as asked: a missing step, outputs made with other settings, data it cannot use.
    A ``ValueError`` too, so callers that catch bad values keep working."""


class UnknownName(WeakcellError, KeyError):
    """A name no registry holds (a dataset, a segmentation backend, a kernel variant, ...); the message
    lists the known ones. A ``KeyError`` too, printed without the quotes ``KeyError`` adds."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BackendError(StageError):
    """A segmentation backend that cannot start (an unknown name, a missing weights file, a model that
    fails to load): a fault of the configuration, so it stops the stage once instead of marking every
    image skipped."""
