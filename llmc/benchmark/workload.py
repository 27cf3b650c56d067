"""What to send: deterministic random-token prompts or a JSONL dataset, and Poisson arrival times.

Everything is drawn from ``numpy.random.default_rng(seed)`` so two runs (ours and a peer's) see the
same prompts, the same lengths and the same arrival schedule.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmc.errors import ConfigError

# Low ids are special tokens (bos/eos/pad/unk) in most vocabularies; random prompts stay above them.
MIN_RANDOM_TOKEN_ID = 10


@dataclass
class BenchRequest:
    """One request of a workload: a text prompt or token ids, and how many tokens to generate."""

    prompt: str | None
    prompt_token_ids: list[int] | None
    output_len: int

    @property
    def input_len(self) -> int | None:
        """Known without a tokenizer only for token-id prompts."""
        return len(self.prompt_token_ids) if self.prompt_token_ids is not None else None


def _lengths(rng: np.random.Generator, n: int, fixed: int, rng_range: tuple[int, int] | None, name: str) -> list[int]:
    if rng_range:
        lo, hi = rng_range
        if not 1 <= lo <= hi:
            raise ConfigError(f"--{name}-range must be 1 <= MIN <= MAX, got {lo} {hi}")
        return [int(x) for x in rng.integers(lo, hi + 1, size=n)]
    if fixed < 1:
        raise ConfigError(f"--{name} must be >= 1, got {fixed}")
    return [fixed] * n


def random_requests(num_requests: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0,
                    input_len_range: tuple[int, int] | None = None,
                    output_len_range: tuple[int, int] | None = None) -> list[BenchRequest]:
    """``num_requests`` prompts of uniformly random token ids, fixed lengths or uniform in a range.

    Random tokens on purpose: distinct prompts share no prefix, so prefix caching cannot flatter the
    figure unless a dataset asks for it."""
    if num_requests < 1:
        raise ConfigError(f"--num-requests must be >= 1, got {num_requests}")
    if vocab_size <= MIN_RANDOM_TOKEN_ID:
        raise ConfigError(f"vocabulary of {vocab_size} is too small for random prompts")
    rng = np.random.default_rng(seed)
    ins = _lengths(rng, num_requests, input_len, input_len_range, "input-len")
    outs = _lengths(rng, num_requests, output_len, output_len_range, "output-len")
    return [BenchRequest(None, rng.integers(MIN_RANDOM_TOKEN_ID, vocab_size, size=i).tolist(), o)
            for i, o in zip(ins, outs)]


def load_dataset(path: str | Path, num_requests: int | None, default_output_len: int,
                 seed: int = 0, shuffle: bool = False) -> list[BenchRequest]:
    """JSONL, one request a line: ``{"prompt": "text" | [token ids], "output_len": N}`` (output_len
    optional, default ``--output-len``). Takes the first ``num_requests`` (all when None), cycling when
    the file has fewer, so a small file still fills a large run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such dataset file")
    reqs: list[BenchRequest] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or "prompt" not in rec:
            raise ConfigError(f"{path}:{lineno}: expected an object with a 'prompt' field")
        prompt = rec["prompt"]
        out_len = rec.get("output_len", default_output_len)
        if not isinstance(out_len, int) or out_len < 1:
            raise ConfigError(f"{path}:{lineno}: output_len must be a positive integer, got {out_len!r}")
        if isinstance(prompt, str) and prompt:
            reqs.append(BenchRequest(prompt, None, out_len))
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            reqs.append(BenchRequest(None, list(prompt), out_len))
        else:
            raise ConfigError(f"{path}:{lineno}: prompt must be a non-empty string or list of token ids")
    if not reqs:
        raise ConfigError(f"{path}: the dataset is empty")
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(reqs))
        reqs = [reqs[i] for i in order]
    n = num_requests or len(reqs)
    return [reqs[i % len(reqs)] for i in range(n)]


def arrival_offsets(n: int, request_rate: float, seed: int = 0) -> list[float]:
    """Send times (seconds from start) of ``n`` requests: a Poisson process of rate ``request_rate``
    (exponential gaps), the way independent users arrive; ``inf`` sends everything at t=0."""
    if request_rate <= 0:
        raise ConfigError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / request_rate, size=n)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps).tolist()
