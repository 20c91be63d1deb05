"""Kernels. `reference` holds the plain-torch version of each: the CPU path and the test oracle."""
