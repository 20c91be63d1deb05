"""Benchmarks shipped with the package (`tuili bench ...`)."""
