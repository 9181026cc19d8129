"""What every entry point does with bad input: one line in its flags' words, exit status 2."""

from __future__ import annotations

import sys

from absl import flags

from tlloop.cli.flags import flag_line, flag_of
from tlloop.errors import Problem


def error_line(error: Exception, flag_values: flags.FlagValues | None = None) -> str:
    """`error` in the command line's words (`flags.flag_line`); with `flag_values`, an argument
    named as one of the entry point's own flags there (e.g. lr_find's `lr_min`) is written as
    that flag too."""
    if flag_values is None or not isinstance(error, Problem):
        return flag_line(error)
    return error.flag_line(lambda name: flag_of(name) or (name if name in flag_values else None))


def fail(program: str, error: Exception, flag_values: flags.FlagValues | None = None) -> int:
    """Prints `PROGRAM: error: LINE` (`error_line`) on stderr; returns the exit status, 2."""
    print(f"{program}: error: {error_line(error, flag_values)}", file=sys.stderr)
    return 2
