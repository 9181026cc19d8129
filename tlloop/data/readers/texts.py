"""Text files as examples: UTF-8, read whole."""

from __future__ import annotations

from tlloop.errors import ConfigError

TEXT_EXTENSIONS = (".txt",)


def read_text_file(path: str, what: str) -> str:
    """The UTF-8 text of `path` (a leading byte-order mark dropped). ConfigError, one finished
    line starting with `what` (e.g. "$data_dir: text file ": `$name` names an argument), the
    file and the line of the first byte that is not UTF-8."""
    with open(path, "rb") as file:
        data = file.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"{what}{path!r} line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at "
            f"offset {error.start}); accepted: UTF-8 text files (convert it, e.g. with iconv)"
        ) from None
