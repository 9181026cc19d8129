"""The command line above the library: what only flags need (configs, flags, adapters)."""
