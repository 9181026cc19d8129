"""The work directory: refusing a bad one, and writing files so that none is ever half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from absl import logging

from tlloop.config import ConfigError

# What a run writes at the top of its workdir; --overwrite removes exactly these.
RUN_OUTPUTS = ("flags.txt", "tensorboard", "export", "results.json")


def prepare(path: str, *, overwrite: bool) -> None:
    """Makes `path` ready for a new run, or raises ConfigError before writing anything.

    A workdir that holds a previous run is refused unless `overwrite`, which then removes that
    run's outputs (and only those), saying what it removes.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir={path!r}: is a file; accepted: a directory (new or empty)")
    previous = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(path, name))]
    if previous and not overwrite:
        raise ConfigError(
            f"--workdir={path!r}: holds a previous run ({', '.join(previous)}); accepted: a new "
            "directory, or --overwrite to replace that run's outputs"
        )
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"--workdir={path!r}: cannot be created ({error.strerror}); accepted: a writable path"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={path!r}: not writable; accepted: a writable directory")
    for name in previous:
        target = os.path.join(path, name)
        logging.warning("--overwrite: removing %s", target)
        if os.path.isdir(target):
            shutil.rmtree(target)
        else:
            os.remove(target)


def write_atomic(path: str, writer) -> None:
    """Calls `writer(tmp_path)`, then renames the result to `path` in one step.

    A reader (or a kill) sees the old file or the new one, never a partial one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]  # keras.saving checks the extension of what it writes
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(handle)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; exports are for sharing
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as file:
            file.write(text)

    write_atomic(path, write)


def write_json(path: str, value: object) -> None:
    write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
