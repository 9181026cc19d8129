"""Entry point: `python -m tlloop.rank --flagfile=experiments/NAME.flags --candidates=A,B,C`.

Scores each candidate backbone with LogME on the run's training data (`tlloop.rank`, the
library's function in tlloop/ranking.py), prints the table (best first) and writes rank.json
and rank.md to --output (default WORKDIR/rank). Bad input: one line naming the flag, exit 2.
Wiring only: the candidates are built by `tlloop.cli.candidates`.

`tlloop.rank` is the function (`import tlloop` binds it): import the library as
`tlloop.ranking`; this module is meant to be run, not imported.
"""

from __future__ import annotations

import os

from absl import app, flags

from tlloop.cli import flags as tlloop_flags
from tlloop.cli.candidates import candidate_backbones, candidate_specs
from tlloop.cli.entry import fail
from tlloop.errors import ConfigError


def _define_flags() -> None:
    tlloop_flags.define_flags(flags.FLAGS)
    flags.mark_flag_as_required("workdir")
    flags.DEFINE_list(
        "candidates",
        [],
        "Backbones to score, each a --backbone value, optionally with its own --weights after "
        "@ (small_cnn@none, model.keras@none: random initialisation); empty: --backbone alone. "
        "Each is built with the other model flags (--image_size, --backbone_layer, ...).",
    )
    flags.DEFINE_string("output", "", "Directory for rank.json and rank.md; empty: WORKDIR/rank.")


def main(argv: list[str]) -> int:
    values = flags.FLAGS
    try:
        if len(argv) > 1:
            raise ConfigError(f"unexpected arguments {argv[1:]}; accepted: only --name=value flags")
        config = tlloop_flags.to_config(values)
        output = values.output or os.path.join(config.workdir, "rank")
        specs = candidate_specs(values.candidates, config.model.backbone, config.model.weights)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        from tlloop.cli.data import is_text, load_task_data

        if is_text(config.data):
            raise ConfigError(
                "dataset",
                config.data.dataset,
                "tlloop.rank scores image backbones",
                "an image dataset",
            )
        data = load_task_data(config.data)
        backbones = candidate_backbones(specs, config.model)
    except ConfigError as error:
        return fail("tlloop.rank", error, values)
    from tlloop.ranking import rank

    ranking = rank(backbones, data.train_examples, batch_size=config.data.eval_batch)
    paths = ranking.save(output)
    print(ranking.to_markdown(), end="")
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    # Defined only when run: `import tlloop.rank` (which `tlloop.rank`, the function, hides)
    # must not define flags another entry point defines.
    _define_flags()
    app.run(main)
