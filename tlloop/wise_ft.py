"""WiSE-FT (Wortsman et al., CVPR 2022, "Robust fine-tuning of zero-shot models"): the
weight-space interpolations between the linear-probe model and the fine-tuned one.

theta_LP is the whole model (augment, backbone and head; BatchNorm moving statistics
included) at the start of the first phase that trains the backbone (a phase with epochs >= 1
whose `unfreeze` is not "none"), i.e. at the end of the phase before it, as that phase's last
evaluation saw it (its moving averages, with EMA). It is saved to
WORKDIR/checkpoints/lp at that moment, before that phase's first checkpoint, so a resumed run
always has it. theta_FT is the model at the end of the run (the moving averages, with EMA), as
in the paper: not the best checkpoint, which may be from the head phase (then every
interpolation would be between two head-phase models). After the run, every float variable is set to
`(1 - a) * theta_LP + a * theta_FT` (in the variable's dtype; a=0 and a=1 are the two ends
exactly) for each a of `checkpoint.wise_ft`, evaluated by the run's own exactly-once
evaluation, and the model is left holding the chosen a's weights, which the export writes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from tlloop import checkpoints as checkpoint_lib
from tlloop.actions import Action
from tlloop.config import BestMetric, CheckpointConfig, PhaseConfig
from tlloop.errors import ConfigError

LP = "lp"  # WORKDIR/checkpoints/lp: theta_LP


def finetune_index(checkpoint: CheckpointConfig, phases: Sequence[PhaseConfig]) -> int | None:
    """The index of the phase at whose start theta_LP is taken (the first phase that trains
    the backbone), or None without `checkpoint.wise_ft`. Raises ConfigError naming `wise_ft`
    when no phase trains the backbone, or none before it trains at all."""
    if not checkpoint.wise_ft:
        return None
    value = ",".join(repr(a) for a in checkpoint.wise_ft)
    trains = [i for i, p in enumerate(phases) if p.epochs >= 1 and p.unfreeze.kind != "none"]
    if not trains:
        raise ConfigError(
            "wise_ft",
            value,
            "no phase trains the backbone (WiSE-FT interpolates towards the fine-tuned weights)",
            "a fine-tune phase (e.g. $finetune.epochs >= 1 with $unfreeze not none) after the "
            "head phase, or no $wise_ft",
        )
    first = trains[0]
    if not any(p.epochs >= 1 for p in phases[:first]):
        raise ConfigError(
            "wise_ft",
            value,
            f"no phase before {phases[first].name!r} (the first that trains the backbone) "
            "trains, so there is no linear-probe model to interpolate from",
            "a head phase of >= 1 epoch first (e.g. $head.epochs >= 1), or no $wise_ft",
        )
    return first


def interpolate(alpha: float, lp: np.ndarray, ft: np.ndarray) -> np.ndarray:
    """`(1 - alpha) * lp + alpha * ft` in `lp`'s dtype; the ends are `lp` and `ft` exactly."""
    if alpha == 0:
        return lp
    if alpha == 1:
        return ft
    return ((1 - alpha) * lp + alpha * ft).astype(lp.dtype)


def _interpolated(variable) -> bool:
    """Float weights are interpolated (BatchNorm moving statistics too); RNG states and
    integer variables keep theta_FT's values."""
    return "seed_generator" not in variable.path and "float" in str(variable.dtype)


class WiseFT(Action):
    """Saves theta_LP (in `lp`, WORKDIR/checkpoints/lp) at the start of phase
    `finetune_index`, and at the run's end evaluates each a of `alphas`, writes each a's
    metrics to TensorBoard (eval scalars `wise_ft/METRIC` at step round(100 * a), and a
    `wise_ft` text table) and to the results (`wise_ft`: [{alpha, metrics}], and
    `wise_ft_export`: the a chosen and why, where theta_LP and theta_FT came from), and leaves
    the model holding the chosen a's interpolation: `export_alpha`, or with "best" the first
    a with the best `metric`."""

    def __init__(
        self,
        alphas: Sequence[float],
        export_alpha: str | float,
        metric: BestMetric,
        *,
        finetune_index: int,
        lp: checkpoint_lib.Checkpoints,
        summaries,
    ) -> None:
        self.alphas = tuple(alphas)
        self.export_alpha = export_alpha
        self.metric = metric
        self.finetune_index = finetune_index
        self.lp = lp
        self.summaries = summaries

    def on_run_begin(self) -> None:
        view = self.view
        self.lp.track(model=view.model)
        phase = view.resumed_phase
        if phase is None:
            return
        if phase >= self.finetune_index and not checkpoint_lib.latest(self.lp.directory):
            raise ConfigError(
                "wise_ft",
                problem=f"the run in {os.path.dirname(self.lp.directory)!r} is past its "
                f"linear-probe model and {self.lp.directory!r} holds none (the run was started "
                "without $wise_ft)",
                accepted="$overwrite to start afresh, or no $wise_ft",
            )

    def on_phase_begin(self, phase) -> None:
        # A resumed phase restores a later state after this hook: its lp was saved by the
        # process that started the phase, before that phase's first checkpoint.
        if phase.index == self.finetune_index and not self.view.resuming:
            step = self.view.step
            # The weights the phase before evaluated last: its moving averages, with EMA.
            with self.view.evaluated_weights():
                self.lp.save(step)
            logging.info("WiSE-FT: theta_LP saved at step %d in %s", step, self.lp.directory)

    def on_run_end(self, results: dict) -> None:
        view = self.view
        lp_path = checkpoint_lib.latest(self.lp.directory)
        if lp_path is None:  # a callback ended the run before fine-tuning began
            logging.warning("WiSE-FT skipped: the run ended before its backbone trained")
            results["wise_ft"] = []
            return
        variables = list(view.model.weights)
        ft_from = {"weights": "last", "step": view.step}
        ft = [np.array(v.numpy()) for v in variables]
        self.lp.restore(lp_path)
        lp = [np.array(v.numpy()) for v in variables]
        lp_step = int(lp_path.rsplit("-", 1)[-1])
        rows = []
        for alpha in self.alphas:
            self._assign(variables, alpha, lp, ft)
            metrics = view.evaluate()
            rows.append({"alpha": alpha, "metrics": metrics})
        chosen, by = self.export_alpha, "wise_ft_export"
        if chosen == "best":
            chosen, by, value = None, str(self.metric), float("nan")
            for row in rows:
                if self.metric.better(float(row["metrics"][self.metric.name]), value):
                    chosen, value = row["alpha"], float(row["metrics"][self.metric.name])
            if chosen is None:  # every value NaN: the a nearest the fine-tuned end
                chosen = max(self.alphas)
        self._assign(variables, chosen, lp, ft)
        results["wise_ft"] = rows
        results["wise_ft_export"] = {
            "alpha": chosen,
            "by": by,
            "theta_lp": {"path": lp_path, "step": lp_step},
            "theta_ft": ft_from,
        }
        self._write(rows, chosen)
        logging.info(
            "WiSE-FT: %s; the model holds a=%s",
            ", ".join(f"a={r['alpha']}: {_format(r['metrics'])}" for r in rows),
            chosen,
        )

    @staticmethod
    def _assign(variables, alpha: float, lp, ft) -> None:
        for variable, lp_value, ft_value in zip(variables, lp, ft, strict=True):
            variable.assign(
                interpolate(alpha, lp_value, ft_value) if _interpolated(variable) else ft_value
            )

    def _write(self, rows: list[dict], chosen: float) -> None:
        s = self.summaries
        for row in rows:
            s.scalars(
                "eval",
                {f"wise_ft/{k}": v for k, v in _numbers(row["metrics"]).items()},
                round(100 * row["alpha"]),
            )
        names = list(_numbers(rows[0]["metrics"]))
        lines = ["| a | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for row in rows:
            mark = " (exported)" if row["alpha"] == chosen else ""
            values = " | ".join(f"{_numbers(row['metrics'])[n]:.6g}" for n in names)
            lines.append(f"| {row['alpha']:g}{mark} | {values} |")
        s.text("wise_ft", "\n".join(lines), self.view.step)
        s.flush()


def _numbers(metrics: dict) -> dict[str, float]:
    """The metrics that are numbers (the example count included)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
    }


def _format(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in _numbers(metrics).items() if k != "examples")
