"""The one base of every error qvl raises on purpose.

An input, setting or output that qvl refuses ends in a ``QvlError`` whose message names the
file, the record and what is wrong; the CLI prints that message as one line and exits 1.
Anything else that escapes is a bug in qvl and keeps its traceback.

``RecordError`` is narrower: one record is wrong. It never ends a run; it becomes a reject
carrying ``reason`` (a short name to count by) and the message.
"""

from __future__ import annotations


class QvlError(ValueError):
    """Something qvl refuses, said in one line."""


class RecordError(QvlError):
    """One record is wrong: a reject with ``reason`` and the message, never the end of a run."""

    def __init__(self, message: str, reason: str = "bad_sample"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # pickled with its reason (a record sent to a Ray task keeps it)
        return type(self), (str(self), self.reason)


# One sample is wrong: it goes to the rejects with ``reason`` and the message. The name the
# formats have always used for ``RecordError``, of which it is the same class.
AnnotationError = RecordError
