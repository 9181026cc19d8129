"""Command-line flags of `python -m tlloop.run`, and their conversion into a RunConfig.

Nothing here defines an option: every flag is made from an option field of the config
dataclasses (`tlloop.cli.config.options()`), which holds its default, check and help. The flags are
defined on a FlagValues the entry point passes in; nothing here keeps or reads a global FLAGS.
Values are checked once, by the config dataclasses, with messages that name the flag.
"""

from __future__ import annotations

from collections.abc import Collection

from absl import flags

from tlloop.cli import config as config_lib
from tlloop.errors import Problem, with_names

_OPTIONS = config_lib.options()
# Every tlloop flag, in the order flags.txt lists them.
FLAG_NAMES: tuple[str, ...] = tuple(meta.flag for meta in _OPTIONS)
# The flags that say which examples a run evaluates on; tlloop.evaluate takes these.
DATA_FLAGS: tuple[str, ...] = tuple(meta.flag for meta in _OPTIONS if meta.evaluation)

# Library argument names that differ from the flag setting the same thing.
_FLAG_OF_ARGUMENT = {
    "source": "backbone",
    "layer": "backbone_layer",
    "channels": "backbone_channels",
    "value_range": "backbone_range",
    "memory_budget": "data_memory",
}
_PHASE_ARGUMENTS = {"learning_rate": "lr", "epochs": "epochs", "unfreeze": "unfreeze"}


# Boolean flags, which absl also takes as --noNAME.
_BOOL_FLAGS = frozenset(meta.flag for meta in _OPTIONS if meta.kind == "bool")


def flag_of(argument: str) -> str | None:
    """The flag that sets a library argument (`PHASE.ARGUMENT` for a phase's own, e.g.
    `finetune.learning_rate` -> `finetune_lr`; `noNAME` for a boolean flag turned off);
    None when no flag sets it."""
    phase, _, name = argument.rpartition(".")
    if phase and name in _PHASE_ARGUMENTS:
        return f"{phase}_{_PHASE_ARGUMENTS[name]}"
    flag = _FLAG_OF_ARGUMENT.get(argument, argument)
    known = flag in FLAG_NAMES or (flag.startswith("no") and flag[2:] in _BOOL_FLAGS)
    return flag if known else None


def flag_line(error: Exception, own: Collection[str] = ()) -> str:
    """The one line the command line prints for `error`, in flags' words; an argument named
    as one of `own` (an entry point's own flags, e.g. lr_find's `lr_min`) is that flag too."""
    if not isinstance(error, Problem):
        return str(error)
    return error.flag_line(lambda name: flag_of(name) or (name if name in own else None))


def help_text(meta: config_lib.Option) -> str:
    """An option's help in flags' words (`$name` references rendered as `--flag`)."""
    return with_names(meta.help, lambda name: f"--{flag_of(name) or name}")


_PARSERS = {
    "integer": (flags.IntegerParser, flags.ArgumentSerializer),
    "float": (flags.FloatParser, flags.ArgumentSerializer),
    "string": (flags.ArgumentParser, flags.ArgumentSerializer),
    "list": (flags.ListParser, lambda: flags.CsvListSerializer(",")),
}


def define_flags(flag_values: flags.FlagValues, only: Collection[str] | None = None) -> None:
    """Defines tlloop's flags on `flag_values` (those named in `only`, if given).

    `--helpfull` lists them under the config dataclass that defines each (e.g.
    tlloop.cli.config.DataConfig)."""
    for meta in _OPTIONS:
        if only is not None and meta.flag not in only:
            continue
        common = {"flag_values": flag_values, "module_name": meta.owner}
        if meta.kind == "bool":
            flags.DEFINE_bool(meta.flag, meta.default, help_text(meta), **common)
        elif meta.kind == "enum":
            flags.DEFINE_enum(
                meta.flag, meta.default, list(meta.choices), help_text(meta), **common
            )
        else:
            parser, serializer = _PARSERS[meta.kind]
            flags.DEFINE(
                parser(),
                meta.flag,
                meta.default,
                help_text(meta),
                serializer=serializer(),
                **common,
            )


def to_config(flag_values: flags.FlagValues) -> config_lib.RunConfig:
    """The RunConfig the parsed `flag_values` describe (tlloop flags it lacks keep their
    defaults), knowing which flags were given (on the command line or in a flagfile);
    raises ConfigError naming a bad flag."""
    names = [name for name in FLAG_NAMES if name in flag_values]
    return config_lib.from_flags(
        {name: flag_values[name].value for name in names},
        given=[name for name in names if flag_values[name].present],
    )


def run_flags(flags_file: str, overrides: flags.FlagValues | None = None) -> flags.FlagValues:
    """The flags of a past run, read from its flags.txt, with the `overrides` given on the
    command line (flags present there) applied on top. Raises ConfigError naming the file."""
    values = flags.FlagValues()
    define_flags(values)
    try:
        values(["tlloop", f"--flagfile={flags_file}"])
    except (flags.Error, OSError) as error:
        raise config_lib.ConfigError(
            f"{flags_file!r}: not a readable tlloop flags file ({error}); accepted: the "
            "flags.txt a tlloop run writes into its workdir"
        ) from None
    if overrides is not None:
        for name in FLAG_NAMES:
            if name in overrides and overrides[name].present:
                values[name].value = overrides[name].value
    return values


def flags_text(source: flags.FlagValues | config_lib.RunConfig) -> str:
    """The resolved tlloop flags, one per line: a flagfile that re-runs the same experiment.

    From parsed flags, each as given (`--classes=5-9`); from a RunConfig, each as the config
    holds it (`--classes=5,6,7,8,9`), which parses back to an equal RunConfig."""
    if isinstance(source, config_lib.RunConfig):
        values = flags.FlagValues()
        define_flags(values)
        for name, value in config_lib.flag_values(source).items():
            values[name].value = value
        source = values
    lines = ["# Resolved flags of this run; re-run with --flagfile=flags.txt"]
    for name in FLAG_NAMES:
        serialized = source[name].serialize()
        if serialized:
            lines.append(serialized)
    return "\n".join(lines) + "\n"
