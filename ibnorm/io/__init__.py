"""Checkpoint I/O: resolving sources, reading headers lazily, writing and loading converted models."""
