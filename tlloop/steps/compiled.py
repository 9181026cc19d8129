"""The one factory that compiles a step body, train or eval, into the K-step loop.

A step body (`TrainStep`, `EvalStep`) says what one step does; `CompiledSteps` runs
`num_steps` of them in one `tf.while_loop` inside one `tf.function` (one host call), reading
batches from an iterator, and decides what XLA compiles, the same way for every body:

- "step" (the body's whole replica step, its state changes included) on one replica when it
  lowers to HLO for the iterator's `element_spec`, checked before any batch is read
  (`choose_xla`; the first call makes it otherwise), nothing run, no variable changed;
- the body's part (`part_scope`: "gradients" for training, "forward" for evaluation) with
  several replicas (whole-step XLA runs on one replica only: the optimizer's all-reduce is a
  merge_call) and when the whole step does not compile (an op with no XLA kernel);
- nothing for string inputs (a text backbone's tokenizer) or with `jit_compile` off.

The choice is logged in one line; `xla_scope` and `xla_reason` say which and why.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Protocol

import tensorflow as tf
from absl import logging


class StepBody(Protocol):
    """What `CompiledSteps` compiles: one step of one kind, split where XLA may cut it."""

    kind: str  # "train" or "eval": named in the log lines and reasons
    log_prefix: str  # how the XLA decision's log line starts
    part_scope: str  # `xla_scope` when XLA compiles only `part`
    part_name: str  # what `part` computes, for the log line
    outside: str  # what runs outside XLA when only `part` is compiled
    replicas_cause: str  # why several replicas cannot run the whole step under XLA

    def part(self, *args) -> Any:
        """The part XLA compiles when the whole step cannot: no state changes."""

    def whole(self, *batch) -> Any:
        """One replica's whole step, state changes included."""

    def replica(self, part, *batch) -> Any:
        """One replica's step calling `part` (compiled or not); what it returns goes to
        `loop_step`, which makes its state changes in cross-replica context."""

    def loop_start(self) -> tuple:
        """The values the loop carries from step to step (tensors)."""

    def loop_step(self, batch, carry: tuple, run, whole: bool) -> tuple[tuple, Any]:
        """One step in cross-replica context: `run(*batch)` runs the replica step (`whole`:
        the whole step ran); returns the new carry and whether to stop the loop."""

    def loop_end(self, carry: tuple) -> Any:
        """What the loop returns (tensors), from its last carry."""

    def result(self, outputs) -> Any:
        """What a call returns, from the loop's outputs (eager)."""


class CompiledSteps:
    """`body`'s steps, `num_steps` per call in one compiled loop; see the module docstring.

    Made under the `tf.distribute` strategy its steps run under. The body's attributes read
    as the compiled steps' own (`optimizer`, `averages`, `global_step`, ... of a `TrainStep`).
    """

    def __init__(self, body: StepBody, *, jit_compile: bool = False) -> None:
        self.body = body
        self.strategy = tf.distribute.get_strategy()
        self._part = tf.function(body.part, jit_compile=True) if jit_compile else body.part
        self._whole = tf.function(body.whole, jit_compile=True) if jit_compile else None
        self._decided = not jit_compile
        self._scope = None
        self._reason = _UNDECIDED if jit_compile else "jit_compile is off"
        self._loop = tf.function(self._run_loop)

    def __getattr__(self, name: str):
        if name == "body":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.body, name)

    @property
    def xla_scope(self) -> str | None:
        """What XLA compiles: "step" (the whole step), the body's `part_scope` ("gradients":
        the loss and gradients, "forward": the forward pass) or None (nothing: jit_compile
        off, string inputs, or not decided yet; see `xla_reason`)."""
        return self._scope

    @property
    def xla_reason(self) -> str:
        """Why `xla_scope` is what it is, in one line (empty for the whole step)."""
        return self._reason

    def choose_xla(self, element_spec) -> str | None:
        """Decides, once and before any batch is read, what XLA compiles for batches of
        `element_spec` (an iterator's); logs the choice in one line and returns `xla_scope`.
        Later calls return it unchanged."""
        if self._decided:
            return self._scope
        self._decided = True
        body, replicas = self.body, self.strategy.num_replicas_in_sync
        if _holds_strings(element_spec):
            self._part = body.part  # neither XLA function can take strings
            self._scope = None
            self._reason = (
                "the inputs are strings (a text backbone's tokenizer), which XLA cannot "
                f"compile: the {body.kind} step runs without XLA"
            )
            logging.warning("%sno XLA in the %s step: %s", body.log_prefix, body.kind, self._reason)
            return None
        if replicas > 1:
            self._fall_back(f"{replicas} replicas: {body.replicas_cause}; {body.outside}")
            return self._scope
        try:
            self.strategy.run(
                lambda: self._whole.experimental_get_compiler_ir(*element_spec)(stage="hlo")
            )
        except Exception as error:  # any failure to trace or lower: the step that always works
            self._fall_back(_compile_failure(error, body.outside), warn=True)
        else:
            self._scope, self._reason = "step", ""
            logging.info("%sXLA compiles the whole %s step", body.log_prefix, body.kind)
        return self._scope

    def _fall_back(self, reason: str, *, warn: bool = False) -> None:
        """XLA compiles the body's part only; the reason logged in one line (a warning with
        `warn`: the whole step was meant to compile)."""
        self._scope, self._reason = self.body.part_scope, reason
        log = logging.warning if warn else logging.info
        log("%sXLA compiles only %s: %s", self.body.log_prefix, self.body.part_name, reason)

    @property
    def traces(self) -> dict[str, int]:
        """How often the compiled parts were traced: "loop" (the whole call) and, with XLA,
        "xla" (the XLA function in use: the whole step, or the part). One each per compiled
        object, whatever the step counts."""
        traces = {"loop": self._loop.experimental_get_tracing_count()}
        if self._scope == "step":
            traces["xla"] = self._whole.experimental_get_tracing_count()
        elif self._scope is not None:
            traces["xla"] = self._part.experimental_get_tracing_count()
        return traces

    def __call__(self, iterator, num_steps: int):
        """Runs `num_steps` steps on batches from `iterator` (fewer only when the body stops
        the loop); returns the body's `result`."""
        if not self._decided:
            self.choose_xla(iterator.element_spec)
        return self.body.result(self._loop(iterator, tf.constant(num_steps, tf.int32)))

    def _run_loop(self, iterator, num_steps):
        whole = self._scope == "step"
        replica_step = self._whole if whole else functools.partial(self.body.replica, self._part)

        def run(*batch):
            return self.strategy.run(replica_step, args=batch)

        carry = self.body.loop_start()
        for _ in tf.range(num_steps):
            carry, stop = self.body.loop_step(next(iterator), carry, run, whole)
            if stop:
                break
        return self.body.loop_end(carry)


def _holds_strings(element_spec) -> bool:
    specs = tf.nest.flatten(element_spec, expand_composites=True)
    return any(getattr(spec, "dtype", None) == tf.string for spec in specs)


_UNDECIDED = "not decided yet: choose_xla() or the first call decides"
# What the ops XLA has no kernel for belong to, for the reason logged.
_KNOWN_OPS = (
    ("ImageProjectiveTransform", "RandomRotation, RandomTranslation or RandomZoom"),
    ("StatelessRandomGamma", "MixUp's or CutMix's Beta draw"),
    ("String", "string preprocessing"),
    ("Regex", "string preprocessing"),
)


def _compile_failure(error: Exception, outside: str) -> str:
    """The reason logged when the whole step does not compile: the ops XLA has no kernel for
    (and what in tlloop uses them), a merge_call, or the error's own line; then `outside`."""
    text = str(error)
    ops = sorted(set(re.findall(r"No registered '(\w+)' OpKernel for XLA", text)))
    if ops:
        users = sorted({user for op in ops for key, user in _KNOWN_OPS if key in op})
        used_by = f" (used by {'; '.join(users)})" if users else ""
        cause = f"XLA has no kernel for {', '.join(ops)}{used_by}"
    elif "merge_call" in text:
        cause = (
            "the strategy's replica context synchronises through a merge_call (the optimizer's "
            "all-reduce), which a compiled function cannot hold, even with one replica"
        )
    else:  # autograph's message ends with the error's own line, after the traceback
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        named = [line for line in lines if re.match(r"\w+(Error|Exception): ", line)]
        line = (named or lines or [type(error).__name__])[-1 if named else 0]
        cause = line if len(line) <= 300 else line[:297] + "..."
    return f"the whole step does not compile: {cause}; {outside}"
