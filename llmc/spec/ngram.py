"""Prompt-lookup (n-gram) proposer: if the last n tokens occurred earlier in the request's own tokens,
propose what followed them. Costs no model; pays on summarise/edit/code workloads that copy input."""
from __future__ import annotations

import numpy as np


def propose_ngram(tokens: list[int], k: int, max_n: int = 4, min_n: int = 1, window: int = 4096) -> list[int]:
    """Up to ``k`` tokens continuing the most recent earlier match of the longest suffix n-gram.

    Vectorised with numpy (one sliding-window compare per n), so a 4k-token window costs microseconds."""
    if k <= 0 or len(tokens) < min_n + 1:
        return []
    hay = np.asarray(tokens[-window:], dtype=np.int64)
    L = len(hay)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(hay[:-1], n)  # excludes the suffix's own position
        hits = np.flatnonzero((windows == hay[L - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return hay[start:start + k].tolist()
    return []
