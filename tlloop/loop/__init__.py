"""The loop's own parts: the run's position (resume arithmetic, host-call chunking) and the
phase's input (a positioned stream or cached features)."""
