"""The work directory: refusing a bad one, and writing files so that none is ever half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from absl import logging

from tlloop.config import ConfigError

# What a run writes at the top of its workdir; --overwrite removes exactly these.
# The rate --head_lr=auto found (tlloop.lr_range.FoundRate), read back when the run resumes.
FOUND_RATE_FILE = "found_rate.json"
# A Trainer.fit's resolved arguments (the command line's record is flags.txt).
CONFIG_FILE = "config.json"
RUN_OUTPUTS = (
    "flags.txt",
    CONFIG_FILE,
    "checkpoints",
    "tensorboard",
    "metrics.jsonl",
    "export",
    "results.json",
    FOUND_RATE_FILE,
)
FLAGS_FILE = "flags.txt"
# Flags that say what to do with the workdir, not what the run is: they may differ on resume.
_ACTION_FLAGS = (
    "overwrite",
    "supervise",
    "max_restarts",
    # What to export: re-running a finished run with other choices only exports again.
    "export_tflite",
    "tflite_min_agreement",
    "tflite_min_agreement_int8",
    "tflite_calibration_images",
)


def prepare(path: str, flags_text: str | None, *, overwrite: bool) -> bool:
    """Makes `path` ready for the run `flags_text` describes; True if that run is to resume.

    A workdir that holds a run with the same flags resumes it; with other flags it is refused,
    with the flags that differ (runs from Python, `flags_text` None, are not compared: a
    checkpoint of another model is refused when it is restored). `overwrite` removes a previous
    run's outputs (and only those), saying what it removes, and starts afresh. Raises
    ConfigError before writing anything.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir={path!r}: is a file; accepted: a directory (new or empty)")
    previous = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(path, name))]
    resume = bool(previous) and not overwrite
    if resume and flags_text is not None:
        differences = _flag_differences(os.path.join(path, FLAGS_FILE), flags_text)
        if differences:
            raise ConfigError(
                f"--workdir={path!r}: holds a run with other flags ({'; '.join(differences)}); "
                "accepted: the same flags (to resume it), a new directory, or --overwrite to "
                "replace that run"
            )
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"--workdir={path!r}: cannot be created ({error.strerror}); accepted: a writable path"
        ) from None
    # A real write, not os.access: that says yes to root, and knows nothing of read-only
    # mounts, immutable directories or quotas.
    try:
        handle, probe = tempfile.mkstemp(dir=path, prefix=".tlloop-write-test-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ConfigError(
            f"--workdir={path!r}: not writable ({error.strerror}); accepted: a writable directory"
        ) from None
    if overwrite:
        for name in previous:
            target = os.path.join(path, name)
            logging.warning("--overwrite: removing %s", target)
            if os.path.isdir(target):
                shutil.rmtree(target)
            else:
                os.remove(target)
    if flags_text is not None:
        write_text(os.path.join(path, FLAGS_FILE), flags_text)
    return resume


def _flag_lines(text: str) -> dict[str, str]:
    lines = {}
    for line in text.splitlines():
        if line.startswith("--"):
            name = line[2:].split("=", 1)[0]
            name = name[2:] if name.startswith("no") and "=" not in line else name
            if name not in _ACTION_FLAGS:
                lines[name] = line
    return lines


def _flag_differences(flags_file: str, flags_text: str) -> list[str]:
    """'was X, now Y' for each flag that differs; a missing or unreadable file differs whole."""
    try:
        with open(flags_file, encoding="utf-8") as file:
            before = _flag_lines(file.read())
    except OSError:
        return [f"{FLAGS_FILE} missing"]
    now = _flag_lines(flags_text)
    return [
        f"{before.get(name, f'no --{name}')} -> {now.get(name, f'no --{name}')}"
        for name in sorted(set(before) | set(now))
        if before.get(name) != now.get(name)
    ]


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
