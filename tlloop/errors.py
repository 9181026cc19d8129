"""tlloop's errors, each one line: what is at fault, its value, what is wrong, what is accepted.

One mechanism speaks both languages. A ConfigError or RunFailed raised as
`Error(argument, value, problem, accepted)` reads in the library's words
(`unfreeze=top:9: ...`) and the command line prints `error.flag_line(flag_of)`, the same line
with the argument's flag (`--unfreeze=top:9: ...`). Other arguments the problem or the
accepted values name are written `$name` (`$finetune.learning_rate`, `$nan_policy=skip_step`):
the library prints the name, the command line its flag. One finished line (`Error(message)`,
no `$`) is for what names a file rather than an argument; both print it as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

NO_VALUE: Any = type("NoValue", (), {"__repr__": lambda self: "NO_VALUE"})()
_REFERENCE = re.compile(r"\$([A-Za-z_][\w.]*\w)")


def with_names(text: str, name_of: Callable[[str], str]) -> str:
    """`text` with each `$name` reference replaced by `name_of(name)`."""
    return _REFERENCE.sub(lambda match: name_of(match.group(1)), text)


class Problem(Exception):
    """The structured line shared by ConfigError and RunFailed."""

    def __init__(
        self, argument: str, value: Any = NO_VALUE, problem: str = "", accepted: str = ""
    ) -> None:
        self.argument, self.value, self.problem, self.accepted = argument, value, problem, accepted
        super().__init__(self._line(lambda name: name))

    @property
    def structured(self) -> bool:
        """Whether `argument` names an argument (rather than the whole message)."""
        return bool(self.problem or self.accepted) or self.value is not NO_VALUE

    def _line(self, name_of: Callable[[str], str]) -> str:
        def names(text: str) -> str:
            return with_names(text, name_of)

        if not self.structured:
            return names(self.argument)
        name = name_of(self.argument)
        # The value is the caller's, as given: a `$` in it (a path) is not a reference.
        line = name if self.value is NO_VALUE else f"{name}={self.value}"
        if self.problem:
            line = f"{line}: {names(self.problem)}"
        return f"{line}; accepted: {names(self.accepted)}" if self.accepted else line

    def flag_line(self, flag_of: Callable[[str], str | None]) -> str:
        """The line in the command line's words: `flag_of(name)` is an argument's flag name
        (None: no flag sets it, the name stays as the library says it)."""
        return self._line(lambda name: f"--{flag}" if (flag := flag_of(name)) else name)


class ConfigError(Problem, ValueError):
    """Bad input (an argument, a flag, a file): nothing was written because of it."""


class RunFailed(Problem, RuntimeError):
    """Training cannot go on (a NaN loss, a failed write); the message says what to do.

    The last checkpoint written before it is intact: the same call (or command) resumes from
    there."""


class CallbackError(RuntimeError):
    """A user's Keras callback raised: the run stopped, its checkpoints intact. The message
    names the callback and the hook; the original exception is the cause."""
