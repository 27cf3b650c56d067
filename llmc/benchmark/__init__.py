"""``llmc bench``: throughput and latency of an engine in-process, and a streaming client for any
OpenAI-compatible server (ours or a peer's), all printing JSON.

Kept free of torch/aiohttp imports at package level so ``llmc --help`` stays fast.
"""
from __future__ import annotations

from llmc.benchmark.report import percentiles, summarize

__all__ = ["percentiles", "summarize"]
