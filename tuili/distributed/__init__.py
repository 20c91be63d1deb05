"""Tensor parallelism: process groups (group.py), the ranks' start and watch (launch.py), each
step's flat inputs sent from rank 0 (channel.py), and the loop of ranks 1..N-1 (worker.py)."""
