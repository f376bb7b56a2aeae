"""Launchers for multi-process / multi-host runs of `python -m owl_jax.train` (see README.md)."""
