"""CSV files of examples (--dataset=csv): image paths or texts with their labels or targets.

The first line is a header. Its first column is `path` (an image file, relative to the CSV's
folder unless absolute) or `text` (the example itself); the columns after it depend on the
task: one label (classification), the labels of the example separated by --label_delimiter
(multilabel, possibly none), or one number per target (regression: the header names the
targets). Every bad row is one ConfigError naming the file and its line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

import numpy as np

from tlloop.cli.config import DataConfig
from tlloop.config import ConfigError
from tlloop.data.sources import Source, Split, _limit_per_class, _split, random_split

CONTENT_COLUMNS = ("path", "text")


@dataclasses.dataclass(frozen=True)
class Table:
    """One CSV's examples: `content` "path" (image files, made absolute) or "text"; the
    `items`, the label or target cells of each row (`cells`), and each row's line number."""

    path: str
    flag: str
    content: str
    columns: tuple[str, ...]
    items: list[str]
    cells: list[list[str]]
    lines: list[int]

    def where(self, row: int) -> str:
        return f"--{self.flag}={self.path!r} line {self.lines[row]}"


def read_text_file(path: str, what: str) -> str:
    """The UTF-8 text of `path` (a leading byte-order mark dropped). ConfigError naming `what`,
    the file and the line of the first byte that is not UTF-8."""
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


def read_table(path: str, flag: str, *, regression: bool = False) -> Table:
    """Reads the CSV `path` (given by --`flag`): its header, then one example a line, each with
    one label cell, or (`regression`) one cell per target column of the header."""
    where = f"--{flag}={path!r}"
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file; accepted: a CSV file with a header")
    text = read_text_file(path, f"--{flag}=")
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    accepted = (
        "a header whose first column is path or text, then the label column "
        "(classification, multilabel) or the target columns (regression)"
    )
    if not header or header[0].strip() not in CONTENT_COLUMNS or len(header) < 2:
        raise ConfigError(f"{where} line 1: header {header}; accepted: {accepted}")
    header = [name.strip() for name in header]
    content = header[0]
    if not regression and len(header) != 2:
        raise ConfigError(
            f"{where} line 1: header {header} has {len(header)} columns; accepted: {content} "
            "and one label column (a multilabel row separates its labels with --label_delimiter)"
        )
    folder = os.path.dirname(os.path.abspath(path))
    items, cells, lines = [], [], []
    for row in rows:
        line = rows.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank lines carry no example
        if len(row) != len(header):
            raise ConfigError(
                f"{where} line {line}: malformed row, {len(row)} fields where the header has "
                f"{len(header)} ({', '.join(header)}); accepted: one field per column (quote "
                'fields that hold commas: "a, b")'
            )
        item = row[0] if content == "text" else row[0].strip()
        if not item.strip():
            raise ConfigError(f"{where} line {line}: empty {content}; accepted: a {content}")
        if content == "path":
            item = item if os.path.isabs(item) else os.path.join(folder, item)
            if not os.path.isfile(item):
                raise ConfigError(
                    f"{where} line {line}: image file {row[0].strip()!r} does not exist "
                    f"(looked for {item!r}); accepted: image paths relative to the CSV's folder "
                    "or absolute"
                )
        items.append(item)
        cells.append([cell.strip() for cell in row[1:]])
        lines.append(line)
    if not items:
        raise ConfigError(f"{where}: no examples after the header; accepted: one example a line")
    return Table(path, flag, content, tuple(header), items, cells, lines)


def class_labels(
    table: Table, names: tuple[str, ...], *, multilabel: bool, delimiter: str, known: str
) -> np.ndarray:
    """Class indices (N,) int32, or multi-hot (N, labels) float32, of `table`'s label column,
    by position in `names`; an unknown label is a ConfigError naming its line, with `known`
    saying where the known labels come from."""
    index = {name: i for i, name in enumerate(names)}
    if multilabel:
        labels = np.zeros((len(table.items), len(names)), np.float32)
    else:
        labels = np.zeros(len(table.items), np.int32)
    for row, (cell,) in enumerate(table.cells):
        for name in _labels_of(cell, multilabel, delimiter):
            if name not in index:
                raise ConfigError(
                    f"{table.where(row)}: unknown label {name!r}; accepted: the labels of "
                    f"{known}: {', '.join(names)}"
                )
            if multilabel:
                labels[row, index[name]] = 1.0
            else:
                labels[row] = index[name]
        if not multilabel and not cell:
            raise ConfigError(f"{table.where(row)}: empty label; accepted: one class name")
    return labels


def label_names(table: Table, *, multilabel: bool, delimiter: str) -> tuple[str, ...]:
    """Every label `table` uses, sorted."""
    found = {name for (cell,) in table.cells for name in _labels_of(cell, multilabel, delimiter)}
    return tuple(sorted(found))


def _labels_of(cell: str, multilabel: bool, delimiter: str) -> list[str]:
    if not multilabel:
        return [cell] if cell else []
    return [name.strip() for name in cell.split(delimiter) if name.strip()]


def target_values(table: Table) -> np.ndarray:
    """The regression targets (N, targets) float32 of `table`; a cell that is not a finite
    number is a ConfigError naming its line and column."""
    values = np.zeros((len(table.items), len(table.columns) - 1), np.float32)
    for row, cells in enumerate(table.cells):
        for column, cell in enumerate(cells):
            try:
                values[row, column] = float(cell)
            except ValueError:
                values[row, column] = np.nan
            if not np.isfinite(values[row, column]):
                raise ConfigError(
                    f"{table.where(row)}: target {table.columns[column + 1]!r} is {cell!r}; "
                    "accepted: a finite number"
                )
    return values


def load_tables(config: DataConfig) -> tuple[str, tuple[str, ...], Split, Split]:
    """--train_csv (and --val_csv, else --val_split held out with a fixed seed) as
    (content, class or target names, train, eval): the items are image paths or texts, the
    labels class indices, multi-hot rows or targets per --task."""
    regression = config.task == "regression"
    first = read_table(config.train_csv, "train_csv", regression=regression)
    tables = [first]
    if config.val_csv:
        tables.append(read_table(config.val_csv, "val_csv", regression=regression))
        if tables[1].columns != first.columns:
            raise ConfigError(
                f"--val_csv={config.val_csv!r} line 1: columns {list(tables[1].columns)} differ "
                f"from --train_csv's {list(first.columns)}; accepted: the same header"
            )
    if regression:
        names = first.columns[1:]
        splits = [Split(t.items, target_values(t)) for t in tables]
    else:
        multilabel = config.task == "multilabel"
        delimiter = config.label_delimiter
        if config.classes:
            names, known = config.classes, "--classes"
        else:
            names = label_names(first, multilabel=multilabel, delimiter=delimiter)
            known = f"--train_csv={config.train_csv!r}"
        if not names:
            raise ConfigError(
                f"--train_csv={config.train_csv!r}: no labels at all; accepted: rows with labels"
            )
        splits = [
            Split(
                t.items,
                class_labels(t, names, multilabel=multilabel, delimiter=delimiter, known=known),
            )
            for t in tables
        ]
    train = splits[0]
    if len(splits) == 2:
        evaluation = splits[1]
    elif config.task == "classification":
        train, evaluation = _split(train, config.val_split)
    else:
        train, evaluation = random_split(train, config.val_split)
    if config.train_examples_per_class:
        if config.task != "classification":
            raise ConfigError(
                f"--train_examples_per_class={config.train_examples_per_class}: applies to "
                f"--task=classification; accepted: 0 with --task={config.task}"
            )
        train = _limit_per_class(train, config.train_examples_per_class, len(names))
    return first.content, tuple(names), train, evaluation


def csv_source(config: DataConfig) -> Source:
    """The image examples of --train_csv / --val_csv (see `load_tables`); a CSV of texts is
    read by `tlloop.data.text` instead."""
    content, names, train, evaluation = load_tables(config)
    if content != "path":
        raise ConfigError(
            f"--train_csv={config.train_csv!r}: holds {content}, not image paths; accepted: "
            "the text loader (tlloop.data.text.load_text_data) for a text column"
        )
    return Source(names, train, evaluation)


def csv_content(path: str) -> str:
    """The first header column of the CSV `path` ("path", "text", or "" if unreadable), read
    without parsing the rest: which loader reads it."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as file:
            header = next(csv.reader([file.readline()]), [])
    except OSError:
        return ""
    return header[0].strip() if header else ""
