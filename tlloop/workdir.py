"""The work directory: refusing a bad one, one run at a time in it, what tlloop wrote there
(its manifest, which `overwrite` removes and nothing else), and writing files and directories
so that none is ever half-written (an export a kill interrupted is recovered at the next start).

Errors name the `workdir` argument; the command line prints its flag
(`tlloop.cli.flags.flag_of`)."""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import socket
import tempfile

from absl import logging

from tlloop.errors import ConfigError

# What a run writes at the top of its workdir (its places); `overwrite` removes tlloop's files
# in them. The head rate the command line found (tlloop.cli.head_lr.FoundRate), read on resume.
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
FLAGS_HEADER = "# Resolved flags of this run"  # the first line of every flags.txt tlloop writes
# tlloop's own bookkeeping: WORKDIR/.tlloop/manifest.json (the places tlloop claimed) and
# WORKDIR/.tlloop/lock (held by the run under way; the OS releases it when the process ends).
STATE_DIR = ".tlloop"
MANIFEST = os.path.join(STATE_DIR, "manifest.json")
LOCK = os.path.join(STATE_DIR, "lock")
# The names tlloop writes inside each of its directories (a name ending in "/" is a directory
# with its own entry here; any other directory matched is tlloop's whole). Anything else found
# in them is not tlloop's: `overwrite` leaves it.
_OWN = {
    # .tmp-*: a kill during an atomic write (the sums, the re-seated state file)
    "checkpoints": ("checkpoint", "ckpt-*", "best/", "lp/", ".tmp-*"),
    "checkpoints/best": ("checkpoint", "ckpt-*", ".tmp-*"),
    "checkpoints/lp": ("checkpoint", "ckpt-*", ".tmp-*"),  # WiSE-FT's theta_LP
    "tensorboard": ("events.out.tfevents.*", "train/", "eval/"),
    "tensorboard/train": ("events.out.tfevents.*", "plugins"),
    "tensorboard/eval": ("events.out.tfevents.*",),
    "export": (
        "model.keras",
        "backbone.keras",
        "saved_model",
        "model_*.tflite",
        "labels.txt",
        ".tmp-*",  # leftovers of a killed export (see recover_export)
        ".old-*",
    ),
}
# Flags that say what to do with the workdir, not what the run is: they may differ on resume.
_ACTION_FLAGS = (
    "workdir",  # the same directory spelled otherwise (runs/q, runs/q/, moved) is the same run
    "overwrite",
    "supervise",
    "max_restarts",
    # What to export: re-running a finished run with other choices only exports again.
    "export_tflite",
    "tflite_min_agreement",
    "tflite_min_agreement_int8",
    "tflite_calibration_images",
)
# Flags that only decide what to do about bad input (an unreadable image, a NaN step): the
# remedies their errors name, so they may change when the run resumes.
INPUT_POLICY_FLAGS = ("bad_images", "nan_policy")


def prepare(path: str, flags_text: str | None, *, overwrite: bool) -> bool:
    """Makes `path` ready for the run `flags_text` describes; True if that run is to resume.

    Holds the workdir's lock from here to the end of the process (or `release`): a second run
    on it is refused, naming the holder's pid and host. A workdir that holds a run with the
    same flags resumes it; with other flags it is refused, with the flags that differ (runs from
    Python, `flags_text` None, are not compared: a checkpoint of another model is refused when
    it is restored). `overwrite` removes what tlloop wrote there (and only that), saying what it
    removes, and starts afresh. Where tlloop writes (checkpoints/, export/, results.json, ...),
    files it did not write are refused, naming them, unless the manifest says tlloop made that
    place (see `foreign`). Raises ConfigError before changing anything.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError("workdir", repr(path), "is a file", "a directory (new or empty)")
    strangers = foreign(path)
    if strangers:
        raise ConfigError(
            "workdir",
            repr(path),
            "holds files tlloop did not write where it writes its outputs "
            f"({', '.join(strangers[:5])}{', ...' if len(strangers) > 5 else ''})",
            "a new directory, or that one without them (tlloop never deletes files it did not "
            "write, $overwrite neither)",
        )
    previous = [name for name in RUN_OUTPUTS if _holds(os.path.join(path, name))]
    resume = bool(previous) and not overwrite
    if resume and flags_text is not None:
        differences = _flag_differences(os.path.join(path, FLAGS_FILE), flags_text)
        if differences:
            raise ConfigError(
                "workdir",
                repr(path),
                f"holds a run with other flags ({'; '.join(differences)})",
                "the same flags (to resume it), a new directory, or $overwrite to replace that run",
            )
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            "workdir", repr(path), f"cannot be created ({error.strerror})", "a writable path"
        ) from None
    # A real write, not os.access: that says yes to root, and knows nothing of read-only
    # mounts, immutable directories or quotas.
    try:
        handle, probe = tempfile.mkstemp(dir=path, prefix=".tlloop-write-test-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ConfigError(
            "workdir", repr(path), f"not writable ({error.strerror})", "a writable directory"
        ) from None
    lock(path)  # before anything is removed or written: a second launch changes nothing
    if overwrite:
        for name in previous:
            _remove_own(path, name)
    write_json(os.path.join(path, MANIFEST), {"written_by": "tlloop", "places": list(RUN_OUTPUTS)})
    if os.path.isdir(os.path.join(path, "export")):
        recover_export(os.path.join(path, "export"))
    if flags_text is not None:
        write_text(os.path.join(path, FLAGS_FILE), flags_text)
    return resume


def foreign(path: str) -> list[str]:
    """Files in `path` where tlloop writes its outputs that tlloop did not write (relative
    paths), which a run must not mix with its own or remove.

    A workdir with tlloop's manifest: none (its places are tlloop's; a file added to them
    later is left by `overwrite`). Without one (new, not tlloop's, or from a tlloop before
    manifests): a workdir an earlier tlloop ran in (a flags.txt tlloop wrote, or a
    checkpoints/ of tlloop's checkpoint files with their `checkpoint` state file) is adopted;
    otherwise every file in those places is foreign (empty directories are not)."""
    if os.path.exists(os.path.join(path, MANIFEST)) or _older_run(path):
        return []
    found = []
    for name in RUN_OUTPUTS:
        target = os.path.join(path, name)
        if os.path.isfile(target) or os.path.islink(target):
            found.append(name)
        elif os.path.isdir(target):
            for root, _, files in os.walk(target):
                found += sorted(os.path.relpath(os.path.join(root, f), path) for f in files)
    return found


def _holds(target: str) -> bool:
    """True if `target` exists and is no empty directory (made by hand, or emptied by
    `overwrite`: it holds no previous run)."""
    return os.path.exists(target) and not (os.path.isdir(target) and not os.listdir(target))


def _older_run(path: str) -> bool:
    """True if `path` holds a run of a tlloop that wrote no manifest."""
    try:
        with open(os.path.join(path, FLAGS_FILE), encoding="utf-8") as file:
            if file.readline().startswith(FLAGS_HEADER):
                return True
    except (OSError, UnicodeDecodeError):
        pass
    checkpoints = os.path.join(path, "checkpoints")
    names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    return "checkpoint" in names and all(_matches(n, _OWN["checkpoints"]) for n in names)


def _matches(name: str, patterns) -> str | None:
    """The pattern of `patterns` that `name` matches, or None."""
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p.rstrip("/"))), None)


def _remove_own(path: str, name: str) -> None:
    """Removes tlloop's files in the place `name` of workdir `path` (see _OWN), each logged;
    a file that is not tlloop's stays, logged as kept, with the directories holding it."""
    target = os.path.join(path, name)
    if not os.path.isdir(target):
        logging.warning("overwrite: removing %s", target)
        os.remove(target)
        return
    for entry in sorted(os.listdir(target)):
        child, relative = os.path.join(target, entry), f"{name}/{entry}"
        pattern = _matches(entry, _OWN.get(name, ()))
        if pattern is None:
            logging.warning("overwrite: keeping %s (not written by tlloop)", child)
        elif pattern.endswith("/") and os.path.isdir(child):
            _remove_own(path, relative)
        else:
            logging.warning("overwrite: removing %s", child)
            if os.path.isdir(child) and not os.path.islink(child):
                shutil.rmtree(child)
            else:
                os.remove(child)
    if not os.listdir(target):
        os.rmdir(target)


_LOCKS: dict[str, tuple[int, int]] = {}  # real path of a workdir -> (descriptor, holds)


def lock(path: str) -> None:
    """Takes workdir `path`'s exclusive lock for this process (an OS file lock on
    WORKDIR/.tlloop/lock, which the OS releases when the process ends, however it ends).
    Raises ConfigError naming the holder's pid and host when another run holds it. Taken again
    by the process holding it, it counts; `release` gives it back."""
    key = os.path.realpath(path)
    if key in _LOCKS:
        descriptor, holds = _LOCKS[key]
        _LOCKS[key] = (descriptor, holds + 1)
        return
    os.makedirs(os.path.join(path, STATE_DIR), exist_ok=True)
    descriptor = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(descriptor, 200, 0).decode(errors="replace").split()
        os.close(descriptor)
        who = f"pid {holder[0]} on host {holder[1]}" if len(holder) == 2 else "another process"
        raise ConfigError(
            "workdir",
            repr(path),
            f"in use by another tlloop run ({who})",
            "one run per workdir at a time: wait for it to end (or stop it), or use another "
            "directory",
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _LOCKS[key] = (descriptor, 1)


def release(path: str) -> None:
    """Gives back one hold of `path`'s lock taken by `lock` (or `prepare`); the last one
    unlocks it."""
    key = os.path.realpath(path)
    if key not in _LOCKS:
        return
    descriptor, holds = _LOCKS.pop(key)
    if holds > 1:
        _LOCKS[key] = (descriptor, holds - 1)
    else:
        os.close(descriptor)  # closing the last descriptor releases the flock


def _flag_lines(text: str) -> dict[str, str]:
    lines = {}
    for line in text.splitlines():
        if line.startswith("--"):
            name = line[2:].split("=", 1)[0]
            name = name[2:] if name.startswith("no") and "=" not in line else name
            if name not in _ACTION_FLAGS and name not in INPUT_POLICY_FLAGS:
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
        f"{before.get(name, f'no ${name}')} -> {now.get(name, f'no ${name}')}"
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


def replace_directory(path: str, writer) -> None:
    """Calls `writer(tmp)` for a new directory, then puts it at `path` in place of the old one.

    The old directory is moved aside (into `.old-*/NAME`) before the new one is renamed in,
    and deleted after: a failure while writing leaves the old one as it was, so does an
    exception between the two renames (the old one is put back), and a kill there leaves the
    old one aside, which `recover_export` puts back at the next start.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
    old = None
    try:
        writer(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 directories; exports are for sharing
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=".old-")
            os.replace(path, os.path.join(old, os.path.basename(path)))
        os.replace(tmp, path)
    finally:
        if old and not os.path.exists(path):  # the new one never came: the old one goes back
            os.replace(os.path.join(old, os.path.basename(path)), path)
        shutil.rmtree(tmp, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)


def recover_export(directory: str) -> None:
    """Cleans up after an export a kill interrupted, in export `directory`: a previous
    version moved aside (`.old-*/NAME`) with nothing at NAME is put back (the kill fell between
    the two renames); every other `.old-*` and every `.tmp-*` (a half-written file or
    directory) is removed, each logged. Run at each start, before anything is exported."""
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if entry.startswith(".old-") and os.path.isdir(path):
            for name in os.listdir(path):
                # An older tlloop named what it moved aside "previous"; it was the SavedModel.
                target = os.path.join(directory, "saved_model" if name == "previous" else name)
                if not os.path.exists(target):
                    os.replace(os.path.join(path, name), target)
                    logging.warning(
                        "export: put back %s, which a killed export moved aside", target
                    )
        if entry.startswith((".old-", ".tmp-")):
            logging.warning("export: removing %s, left by a killed export", path)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


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
