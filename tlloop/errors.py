"""Errors that end a run which started well; the entry points print them as one line."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """Training cannot go on (a NaN loss, a failed write); the message says what to do.

    The last checkpoint written before it is intact: the same call (or command) resumes from
    there. `cli_message`, when given, says the same in the command line's words (flags).
    """

    def __init__(self, message: str, cli_message: str | None = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message or message


class CallbackError(RuntimeError):
    """A user's Keras callback raised: the run stopped, its checkpoints intact. The message
    names the callback and the hook; the original exception is the cause."""
