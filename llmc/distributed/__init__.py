"""Tensor parallelism: one worker process per rank, driven by the engine process (rank 0)."""
