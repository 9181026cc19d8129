"""Benchmarks: tlloop measured against itself and Keras Model.fit, in one process, as ratios."""
