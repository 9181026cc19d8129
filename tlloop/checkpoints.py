"""Checkpoints of a run, for resuming it exactly where it stopped.

One `tf.train.CheckpointManager` under WORKDIR/checkpoints holds: the model, the current
phase's optimizer, the global step, the phase index and the step it started at, the train
metrics of the epoch under way, every Keras RNG state (seed generators, which a checkpoint of
the model alone leaves out) and the results of finished phases. The input position needs no
state of its own: the training stream is one seeded pipeline consumed one batch per global
step, so a resumed run rebuilds it and skips that many batches (tf.data's distributed
iterators cannot be checkpointed).

TensorFlow writes a checkpoint's files before it points the `checkpoint` file at them, so a
kill during a save leaves the previous checkpoint the latest one, readable; a save that fails
(a full disk) is cleaned up and reported as RunFailed, the previous checkpoint still the latest.
After each save the size and SHA-256 of its files (index and data shards) go to
`ckpt-N.sha256.json`; a resume verifies the checkpoint it picks against them (`resume_point`)
and falls back to the newest intact one. WORKDIR/checkpoints/best holds the model weights of
the best evaluation so far.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from tlloop.config import ConfigError
from tlloop.errors import RunFailed
from tlloop.models.modes import SUBMODULES
from tlloop.models.walk import seed_generators
from tlloop.workdir import write_json, write_text

BEST = "best"  # WORKDIR/checkpoints/best


class RunState(tf.Module):
    """The run's position: phase index, the global step that phase began at, finished results;
    and what best-model tracking and early stopping need: the best value so far and its step,
    the phase's best, the evaluations since it improved, and the step last evaluated."""

    def __init__(self) -> None:
        super().__init__(name="run_state")

        def variable(value, dtype, name):
            return tf.Variable(value, dtype=dtype, trainable=False, name=name)

        self.phase = variable(0, tf.int64, "phase")
        self.phase_start = variable(0, tf.int64, "phase_start")
        self.results = variable("[]", tf.string, "results")
        self.best = variable(math.nan, tf.float64, "best")
        self.best_step = variable(-1, tf.int64, "best_step")
        self.phase_best = variable(math.nan, tf.float64, "phase_best")
        self.since_phase_best = variable(0, tf.int64, "since_phase_best")
        self.evaluated_step = variable(-1, tf.int64, "evaluated_step")
        self.nonfinite_steps = variable(0, tf.int64, "nonfinite_steps")  # skipped, NaN/Inf

    def start_phase(self, index: int, step: int) -> None:
        self.phase.assign(index)
        self.phase_start.assign(step)
        self.phase_best.assign(math.nan)
        self.since_phase_best.assign(0)

    def finished_phases(self) -> list[dict]:
        return json.loads(self.results.numpy().decode())

    def record(self, phases: list[dict]) -> None:
        self.results.assign(json.dumps(phases))


def latest(directory: str) -> str | None:
    """The newest checkpoint under `directory`, or None."""
    return tf.train.latest_checkpoint(directory)


STATE_FILE = "checkpoint"  # TensorFlow's list of a directory's checkpoints, newest first
SUMS = ".sha256.json"  # ckpt-N.sha256.json: {file name: [size, sha256]} of ckpt-N's files
_NUMBERED = re.compile(r"^ckpt-(\d+)(\.index|\.data-\d{5}-of-\d{5}|\.sha256\.json)$")


def _files_of(prefix: str) -> list[str]:
    """The index and data shard files of checkpoint `prefix` on disk."""
    return sorted(glob.glob(glob.escape(prefix) + ".index")) + sorted(
        glob.glob(glob.escape(prefix) + ".data-?????-of-?????")
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()


def record_sums(prefix: str) -> None:
    """Writes `prefix`.sha256.json: the size and SHA-256 of each file of checkpoint `prefix`,
    so a later resume can tell a damaged checkpoint from an intact one."""
    write_json(
        prefix + SUMS,
        {os.path.basename(p): [os.path.getsize(p), _sha256(p)] for p in _files_of(prefix)},
    )


def damage(prefix: str) -> str | None:
    """Why checkpoint `prefix` cannot be resumed from ("index file missing", "data shard
    ckpt-5.data-00000-of-00001 truncated (10 of 20 bytes)", ...), or None if it is intact.

    With its recorded sums: every file present, of its size and SHA-256. Without them (a
    checkpoint of an older tlloop, or a kill between a save and its sums), TensorFlow reads
    every value, which checks each against the CRC32C the bundle stores."""
    name = os.path.basename(prefix)
    if not os.path.isfile(prefix + ".index"):
        return "index file missing"
    try:
        with open(prefix + SUMS, encoding="utf-8") as file:
            sums = json.load(file)
    except OSError:
        sums = None
    except ValueError:
        return f"{name}{SUMS} unreadable"
    if sums is not None:
        for file_name, (size, digest) in sorted(sums.items()):
            kind = "index file" if file_name.endswith(".index") else f"data shard {file_name}"
            path = os.path.join(os.path.dirname(prefix), file_name)
            if not os.path.isfile(path):
                return f"{kind} missing"
            actual = os.path.getsize(path)
            if actual != size:
                return (
                    f"{kind} {'truncated' if actual < size else 'grown'} ({actual} of {size} bytes)"
                )
            try:
                if _sha256(path) != digest:
                    return f"{kind} changed (SHA-256 differs from the one recorded at save)"
            except OSError as error:
                return f"{kind} unreadable ({error.strerror})"
        return None
    try:
        reader = tf.train.load_checkpoint(prefix)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
    except Exception as error:  # any failure to read is damage, whatever its kind
        return f"unreadable ({error.__class__.__name__}: {_last_clause(str(error))[:120]})"
    return None


def _numbered(directory: str) -> dict[int, str]:
    """{number: prefix} of every ckpt-N with an index or data file in `directory` (sums left
    alone by a kill during rotation are no checkpoint)."""
    found = {}
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        match = _NUMBERED.match(name)
        if match and match.group(2) != SUMS:
            found[int(match.group(1))] = os.path.join(directory, f"ckpt-{match.group(1)}")
    return found


def _state_problem(directory: str) -> str | None:
    """What is wrong with `directory`'s `checkpoint` state file, or None."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        return "state file missing"
    try:
        state = tf.train.get_checkpoint_state(directory)
    except Exception:  # an emptied or garbled file: TensorFlow raises ValueError
        state = None
    if state is None or not state.model_checkpoint_path:
        return "state file empty or unreadable"
    return None


def resume_point(directory: str, *, repair: bool = True) -> str | None:
    """The newest intact checkpoint in `directory` to resume from, or None if it holds none.

    Every ckpt-N found (in the `checkpoint` state file or by its files: a missing or emptied
    state file is recovered by listing them) is verified newest first (`damage`); the first
    intact one is chosen, and each one passed over is logged with the reason. With `repair`
    (the chief), the damaged checkpoints newer than the chosen one are deleted and the state
    file is rewritten to list the checkpoints up to the chosen one, oldest first, so that
    rotation (keep N) deletes the oldest of those, never an intact one for a damaged one.
    Raises ConfigError, naming each one and its damage, when there are checkpoints but none is
    intact: never a silent step 0."""
    found = _numbered(directory)
    if not found:
        return None
    problems, chosen = [], None
    for number in sorted(found, reverse=True):
        reason = damage(found[number])
        if reason is None:
            chosen = number
            break
        problems.append((number, reason))
    said = "; ".join(f"ckpt-{n}: {why}" for n, why in problems)
    if chosen is None:
        raise ConfigError(
            f"checkpoints in {directory!r}: none is intact ({said}); accepted: the checkpoint "
            "files restored, or --overwrite to start afresh"
        )
    state_problem = _state_problem(directory)
    if state_problem is None and latest(directory) != found[chosen]:
        state_problem = f"state file names {os.path.basename(latest(directory) or '-')}"
    if problems or state_problem:
        reasons = [said] * bool(problems) + [state_problem] * bool(state_problem)
        logging.warning(
            "resume: using ckpt-%d, the newest intact checkpoint in %s (%s)",
            chosen,
            directory,
            "; ".join(reasons),
        )
        if repair:
            for number, _ in problems:
                for path in glob.glob(glob.escape(found[number]) + "*"):
                    if _NUMBERED.match(os.path.basename(path)):
                        os.remove(path)
                logging.warning("resume: removed the damaged checkpoint ckpt-%d", number)
            # The older ones stay listed, damaged or not: rotation deletes the oldest first.
            _write_state(directory, [found[n] for n in sorted(found) if n <= chosen])
    return found[chosen]


def _remove_orphan_sums(directory: str) -> None:
    """Deletes the sums of checkpoints rotation has deleted."""
    for path in glob.glob(os.path.join(glob.escape(directory), "ckpt-*" + SUMS)):
        if not os.path.exists(path[: -len(SUMS)] + ".index"):
            os.remove(path)


def _write_state(directory: str, prefixes: list[str]) -> None:
    """Rewrites the `checkpoint` state file: `prefixes` (oldest first), the last the latest,
    with timestamps that CheckpointManager's rotation counts (an older `last_preserved` one)."""
    stamps = [os.path.getmtime(prefix + ".index") for prefix in prefixes]
    lines = [f'model_checkpoint_path: "{os.path.basename(prefixes[-1])}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in prefixes]
    lines += [f"all_model_checkpoint_timestamps: {stamp!r}" for stamp in stamps]
    lines.append(f"last_preserved_timestamp: {min([*stamps, time.time()]) - 1.0!r}")
    write_text(os.path.join(directory, STATE_FILE), "\n".join(lines) + "\n")


def position(path: str) -> tuple[int, int]:
    """(phase index, global step) stored in checkpoint `path`."""
    try:
        phase = tf.train.load_variable(path, "state/phase/.ATTRIBUTES/VARIABLE_VALUE")
        step = tf.train.load_variable(path, "step/.ATTRIBUTES/VARIABLE_VALUE")
    except (tf.errors.OpError, ValueError) as error:
        raise ConfigError(
            f"checkpoint {path!r}: unreadable or not a tlloop checkpoint "
            f"({error.__class__.__name__}); accepted: the checkpoints a tlloop run wrote, or "
            "--overwrite to start afresh"
        ) from None
    return int(phase), int(step)


def phase_start(path: str) -> int:
    """The global step at which the phase under way in checkpoint `path` began."""
    return int(tf.train.load_variable(path, "state/phase_start/.ATTRIBUTES/VARIABLE_VALUE"))


class Checkpoints:
    """Saves and restores one run. On a non-chief task saves go to a temporary directory that
    is deleted again (TensorFlow's convention: every task must save, because reading
    sync-on-read variables is a collective, but only the chief keeps the files)."""

    def __init__(self, directory: str, *, keep: int, chief: bool) -> None:
        self.directory = directory
        self.keep = keep
        self.chief = chief
        self.checkpoint: tf.train.Checkpoint | None = None
        self.objects: dict = {}

    def track(self, **objects) -> None:
        """Sets what the next saves and restores hold; called at each phase start."""
        self.objects = objects
        self.checkpoint = tf.train.Checkpoint(**objects)

    def save(self, step: int) -> None:
        """Saves what is tracked as checkpoint number `step`.

        Raises RunFailed if the files cannot be written (a full disk): the partial files are
        removed and the previous checkpoint stays the latest.
        """
        directory = self.directory if self.chief else tempfile.mkdtemp(prefix="tlloop-worker-")
        try:
            manager = tf.train.CheckpointManager(
                self.checkpoint, directory, max_to_keep=self.keep, step_counter=None
            )
            path = manager.save(checkpoint_number=step)
            if self.chief:
                record_sums(path)
                _remove_orphan_sums(directory)
        except (tf.errors.OpError, OSError) as error:
            # TensorFlow leaves its partial files in a "<prefix>_temp" directory.
            for partial in glob.glob(os.path.join(directory, f"ckpt-{step}_temp*")):
                shutil.rmtree(partial, ignore_errors=True)
            kept = self._intact() if self.chief else "no earlier checkpoint exists"
            message = getattr(error, "message", None) or str(error)
            raise RunFailed(
                f"checkpoint at step {step} could not be written to {directory!r} "
                f"({_last_clause(message)}); {kept}; accepted: a workdir with free space and "
                "write access (the same command then resumes)"
            ) from None
        finally:
            if not self.chief:
                shutil.rmtree(directory, ignore_errors=True)

    def _intact(self) -> str:
        """What a failed save leaves intact, for its message: the previous checkpoint here;
        for the best model's directory, the previous best and the run's own last checkpoint."""
        previous = latest(self.directory)
        if os.path.basename(os.path.normpath(self.directory)) != BEST:
            return f"{previous!r} is intact" if previous else "no earlier checkpoint exists"
        run = latest(os.path.dirname(os.path.normpath(self.directory)))
        best = f"the previous best {previous!r}" if previous else "no earlier best model exists"
        return f"{best}{' is intact' * bool(previous)}; the run's last checkpoint " + (
            f"{run!r} is intact" if run else "does not exist yet"
        )

    def resume_point(self) -> str | None:
        """The newest intact checkpoint to resume from (see `resume_point`); only the chief
        repairs the directory."""
        return resume_point(self.directory, repair=self.chief)

    def check(self, path: str, model) -> None:
        """Raises ConfigError unless `path` holds a value of the right shape for every weight
        of `model`; run before anything is written, so a bad checkpoint changes nothing."""
        _restore(tf.train.Checkpoint(model=model), path)

    def restore(self, path: str) -> None:
        """Restores everything tracked from `path`; a mismatch is a ConfigError naming it.

        The checkpoint may hold more than is tracked (a finished run's optimizer, when only
        its results are wanted); every tracked object must be in it, except w0 (`anchors`),
        which a checkpoint written before tlloop kept it lacks: the run then measures from the
        backbone as it was built for this process (its pretrained or warm-started weights).
        """
        checkpoint = self.checkpoint
        if "anchors" in self.objects and not any(
            name.startswith("anchors/") for name, _ in tf.train.list_variables(path)
        ):
            logging.warning(
                "checkpoint %s holds no w0 (written before tlloop kept it): L2-SP and the weight "
                "drift measure from the backbone as built for this run",
                path,
            )
            checkpoint = tf.train.Checkpoint(
                **{k: v for k, v in self.objects.items() if k != "anchors"}
            )
        _restore(checkpoint, path)


def _last_clause(message: str) -> str:
    """The cause at the end of a TensorFlow error message, e.g. "File too large"."""
    text = " ".join(message.split())
    return text.rsplit(";", 1)[-1].split("[Op:", 1)[0].strip()[:160] or text[:160]


def _restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    status = checkpoint.restore(path)
    status.expect_partial()  # no warnings at exit about values this object does not hold
    try:
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        text = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"checkpoint {path!r}: does not fit this model ({text}); accepted: a checkpoint "
            "of the same flags, or --overwrite to start afresh"
        ) from None


def rng_states(model) -> list:
    """The state variable of every Keras SeedGenerator in `model`'s submodules, at any depth
    (a Dropout inside a custom layer, every layer of a text encoder), each once.

    Dropout and the random augmentation layers draw from these; they are not among the
    model's weights, so a checkpoint of the model alone would resume with fresh randomness.
    The order (submodule, then layers depth first) keeps a checkpoint of a model whose random
    layers all sit at its top level readable under the keys earlier versions wrote.
    """
    states, seen = [], set()
    for name in SUBMODULES:
        for generator in seed_generators(getattr(model, name)):
            if id(generator) not in seen:  # a layer shared by two submodules
                seen.add(id(generator))
                states.append(generator.state)
    return states


# What `load_trained_model` can load from a workdir, besides a checkpoint path.
SAVED = ("export", BEST, "latest")


def load_trained_model(workdir: str, which: str, build: Callable[[], Any]):
    """The model a run in `workdir` saved: "export" (export/model.keras), "best" (the best
    checkpoint), "latest" (the newest checkpoint) or a checkpoint path; returns it and the path
    it came from. A checkpoint is loaded into the model `build()` makes (the run's
    architecture, without weights it would overwrite). Raises ConfigError naming --checkpoint."""
    flag = f"--checkpoint={which!r}"
    accepted = "export, best, latest, or a checkpoint path (PREFIX with PREFIX.index)"
    if which == "export":
        path = os.path.join(workdir, "export", "model.keras")
        if not os.path.isfile(path):
            raise ConfigError(
                f"{flag}: {path!r} does not exist (run unfinished?); accepted: {accepted}"
            )
        return keras.saving.load_model(path), path
    directory = os.path.join(workdir, "checkpoints")
    path = {BEST: latest(os.path.join(directory, BEST)), "latest": latest(directory)}.get(
        which, which if tf.io.gfile.exists(which + ".index") else None
    )
    if not path:
        raise ConfigError(f"{flag}: no such checkpoint in {directory!r}; accepted: {accepted}")
    model = build()
    _restore(tf.train.Checkpoint(model=model), path)
    return model, path
