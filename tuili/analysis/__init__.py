"""The roofline analyst: operator FLOPs and bytes, device ceilings, memory planning, the phase
profiler and plots. Nothing here loads weights."""
