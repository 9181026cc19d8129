"""The command line above the library: what only flags need.

`config` (RunConfig and the sections only the flags describe), `flags` (absl flags made from
the option fields, and the flag line an error prints), `recipe` (--recipe's resolution),
`experiment` (build_experiment: data, model and phase plan from a RunConfig, the task-vs-flags
rules, the Trainer the flags describe), and the adapters from config sections to the library's
explicit arguments (`model`, `strategy`). The entry points (`python -m tlloop.run`, ...) wire
these; nothing below this package imports it.
"""
