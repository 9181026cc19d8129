"""The command line above the library: what only flags need (see BUILD.md's layout)."""
