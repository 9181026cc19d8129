"""What every entry point does with bad input: one line in its flags' words, exit status 2."""

from __future__ import annotations

import sys

from absl import flags

from tlloop.cli.flags import flag_line


def fail(
    program: str, error: Exception, flag_values: flags.FlagValues | None = None, code: int = 2
) -> int:
    """Prints `PROGRAM: error: LINE` (`flags.flag_line`, the entry point's own flags in
    `flag_values` named as flags too) on stderr; returns the exit status `code`."""
    print(f"{program}: error: {flag_line(error, flag_values or ())}", file=sys.stderr)
    return code
