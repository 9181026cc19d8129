"""Errors that end a run which started well: the entry points print them as one line."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """Training cannot go on (a NaN loss, a failed write); the message says what to do.

    The last checkpoint written before it is intact: the same command resumes from there.
    """
