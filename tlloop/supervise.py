"""Supervision: a training process that dies is reported in one line and, if asked, restarted.

`python -m tlloop.run` (unless `--nosupervise`) runs the training in a child process and waits
for it: the child's output passes through, SIGTERM and SIGINT are forwarded to it (it saves and
stops as always), and its own exits (0 done, 1 a failed run, 2 bad input, 143 stopped) are the
parent's. When the child dies otherwise (a signal such as SIGSEGV, or an exit that is not
tlloop's own), the parent says so in one line: how it died, the phase and step it reached, the
checkpoint that is intact, and the known remedy where there is one; then, with
`--max_restarts=N`, it starts the child again (the same command, which resumes from the last
checkpoint) after a back-off, up to N times, unless the child died at the same step as the time
before (no progress: restarting would only repeat the death). It exits with `DIED` when it
gives up.

One remedy it applies itself: a child that died by SIGSEGV with TensorFlow's oneDNN CPU
kernels on (TF_ENABLE_ONEDNN_OPTS not "0"; their known crash, see PITFALLS) is restarted once
with TF_ENABLE_ONEDNN_OPTS=0, even with `--max_restarts=0` (then as one restart more), and
results.json says so (`restarted_without_onednn`).

This module imports no TensorFlow, so the parent stays small; `python -m tlloop.supervise`
supervises any command whose workdir holds a tlloop run (a script of your own on the API).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

CHILD_ENV = "TLLOOP_SUPERVISED"  # set in the child: it trains instead of supervising
RESTARTS_ENV = "TLLOOP_RESTARTS"  # the child's restart count, for its records
FAULT_ENV = "TLLOOP_FAULT"  # for tests only: SIGNAL@STEP[:once=PATH][:onednn], see FaultHook
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"  # TensorFlow's switch for its oneDNN CPU kernels
WITHOUT_ONEDNN_ENV = "TLLOOP_WITHOUT_ONEDNN"  # set in a child restarted with oneDNN off
DIED = 3  # exit code: the training process died and was not (or no longer) restarted
OWN_EXITS = (0, 1, 2, 128 + signal.SIGTERM, 128 + signal.SIGINT)
BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


def supervise(
    command: list[str],
    workdir: str,
    *,
    max_restarts: int = 0,
    restart_command: list[str] | None = None,
    env: dict | None = None,
    backoff: tuple[float, ...] = BACKOFF_SECONDS,
) -> int:
    """Runs `command` until it ends on its own terms; returns the exit code to end with.

    Restarts it (as `restart_command`, default the same) after a death, not after its own
    exits, up to `max_restarts` times, unless it died at the step it died at before. Every
    restart and the final verdict are one line on stderr."""
    environment = {**os.environ, **(env or {}), CHILD_ENV: "1"}
    restarts, reached_before, extra = 0, None, 0
    while True:
        environment[RESTARTS_ENV] = str(restarts)
        run = command if not restarts else (restart_command or command)
        code, last_line, peak_mb = _run_child(run, environment)
        if code in OWN_EXITS:
            return code
        if last_line.startswith("tlloop: error:"):  # the child said why itself (a watchdog)
            return 128 - code if code < 0 else code
        phase, step, checkpoint = position(workdir)
        reached = max(step, _last_logged_step(workdir))
        death = describe_death(code, peak_mb)
        where = f"after step {reached}" + (f" ({phase})" if phase else "")
        kept = f"the last checkpoint ({checkpoint}) is intact" if checkpoint else "no checkpoint"
        onednn = code == -signal.SIGSEGV and environment.get(ONEDNN_ENV) != "0"
        if onednn or (restarts - extra < max_restarts and reached != reached_before):
            delay = backoff[min(restarts, len(backoff) - 1)] if backoff else 0.0
            counted = restarts - extra < max_restarts
            extra += not counted
            restarts += 1
            which = f"restart {restarts - extra} of {max_restarts}" if counted else "restart once"
            how = ""
            if onednn:  # the known remedy, applied: the switch is read as TensorFlow loads
                environment[ONEDNN_ENV], environment[WITHOUT_ONEDNN_ENV] = "0", "1"
                how = (
                    f" with {ONEDNN_ENV}=0 (the known remedy: TensorFlow's oneDNN CPU kernels "
                    "crash on some models)"
                )
            _say(
                f"tlloop: the training process {death} {where}; {kept}; {which} in "
                f"{delay:g} s from that checkpoint{how}"
            )
            time.sleep(delay)
            reached_before = reached
            continue
        repeated = " again at the same step, without progress" if reached == reached_before else ""
        _say(
            f"tlloop: error: the training process {death}{repeated} {where}; {kept}; "
            f"{remedy(code, peak_mb, environment)}the same command resumes from that checkpoint"
            + (f" (after {restarts} restart(s))" if restarts else "")
        )
        return DIED


def describe_death(code: int, peak_mb: float) -> str:
    """'died by SIGSEGV (signal 11)', or 'exited with code 7', with the peak memory seen."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else "a signal"
        text = f"died by {name} (signal {-code})"
    else:
        text = f"exited with code {code} (not one of tlloop's own: a crash; its output is above)"
    return text + (f", peak memory {peak_mb:,.0f} MB" if peak_mb else "")


def remedy(code: int, peak_mb: float, environment: dict | None = None) -> str:
    """The known remedy for a death, ending in '; ', or '' (none, or already applied in
    `environment`, default this process's)."""
    if code == -signal.SIGSEGV and (environment or os.environ).get(ONEDNN_ENV) != "0":
        return (
            "known remedy: TF_ENABLE_ONEDNN_OPTS=0 in the environment (TensorFlow's oneDNN CPU "
            "kernels crash on some models); "
        )
    limit = memory_limit_mb()
    if code == -signal.SIGKILL and limit and peak_mb > 0.8 * limit:
        return (
            f"probably the kernel's OOM killer ({peak_mb:,.0f} of {limit:,.0f} MB): a smaller "
            "--batch_size or --image_size; "
        )
    return ""


def position(workdir: str) -> tuple[str, int, str]:
    """(phase name, global step, path) of the workdir's latest checkpoint; ("", 0, "") if
    there is none. Reads the checkpoint index without TensorFlow; the phase from results."""
    directory = os.path.join(workdir, "checkpoints")
    try:
        with open(os.path.join(directory, "checkpoint"), encoding="utf-8") as file:
            first = file.readline()
    except OSError:
        return "", 0, ""
    name = first.split(":", 1)[-1].strip().strip('"')
    try:
        step = int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return "", 0, ""
    return _phase_at(workdir, step), step, os.path.join(directory, name)


def _phase_at(workdir: str, step: int) -> str:
    """The name of the phase the metrics log places at `step` ("" if it does not say)."""
    phase = ""
    for row in _metrics_rows(workdir):
        if row.get("step", 0) <= max(step, 1) and "phase" in row:
            phase = f"{row['phase']} phase"
    return phase


def _last_logged_step(workdir: str) -> int:
    return max((row.get("step", 0) for row in _metrics_rows(workdir)), default=0)


def _metrics_rows(workdir: str) -> list[dict]:
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line the dead process did not finish
    return rows


def memory_limit_mb() -> float:
    """This machine's (or cgroup's) memory limit in MB; 0 if unknown."""
    try:
        with open("/sys/fs/cgroup/memory.max") as file:
            text = file.read().strip()
        if text != "max":
            return int(text) / 2**20
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/meminfo") as file:
            return int(file.readline().split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return 0.0


def _run_child(command: list[str], env: dict) -> tuple[int, str, float]:
    """Runs the child to its end: its stderr passed through line by line (the last line kept),
    SIGTERM and SIGINT forwarded, its resident memory sampled. Returns (returncode, last
    stderr line, peak resident MB seen)."""
    # Its own session: a Ctrl-C in the terminal reaches the parent only, which forwards it
    # once (twice would interrupt the checkpoint the first one asks for). And it dies with the
    # parent: an orphan would train on unsupervised.
    child = subprocess.Popen(
        command,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    last = [""]

    def relay() -> None:
        for line in child.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                last[0] = line.strip()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    forwarded = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in forwarded:
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    peak = 0.0
    try:
        while child.poll() is None:
            peak = max(peak, _resident_mb(child.pid))
            time.sleep(0.2)
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # the parent itself is going away: so does its child
            child.kill()
            child.wait()
    reader.join(timeout=10)
    return child.returncode, last[0], peak


def _die_with_parent() -> None:
    """In the child, before it runs: Linux's PR_SET_PDEATHSIG, SIGKILL when the parent dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: an orphan goes on, as without supervision


def _resident_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """`python -m tlloop.supervise --workdir=W [--max_restarts=N] -- COMMAND...`"""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tlloop.supervise",
        description="Runs COMMAND (a training whose outputs go to --workdir), reports its death "
        "in one line and restarts it up to --max_restarts times.",
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--max_restarts", type=int, default=0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.max_restarts < 0:
        parser.error("accepted: --workdir=W [--max_restarts=N >= 0] -- COMMAND ...")
    return supervise(command, args.workdir, max_restarts=args.max_restarts)


if __name__ == "__main__":
    sys.exit(main())
