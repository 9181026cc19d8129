"""Readers: each kind of example source, from explicit arguments to a labelled `Source`."""
