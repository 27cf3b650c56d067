"""``benchmarks/decode_latency.py --tactic``: global and per-weight-shape kernel tactic overrides, applied over
an engine's tuned tactics (the in-engine A/B of a tile the tuner timed alone)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: the kernel modules cannot load")

from llmc.build import tuning  # noqa: E402
from llmc.plugins import gemv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def decode_latency(monkeypatch):
    spec = importlib.util.spec_from_file_location("decode_latency", ROOT / "benchmarks" / "decode_latency.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "decode_latency", mod)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(tuning, "apply_tactics", tuning.apply_tactics)  # restored after the test
    saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in gemv.TACTICS.items()}
    yield mod
    gemv.TACTICS.clear()
    gemv.TACTICS.update(saved)


def test_per_shape_override_merges_over_the_engines_tuned_entry(decode_latency):
    decode_latency.override_tactics(["gemv.q8_stages=3", "gemv.per_shape.4096x11008.block_n=4"])
    assert gemv.TACTICS["q8_stages"] == 3
    # a GEMV shape's keys not given keep the width's defaults (stages too, not the pre-pipelining rule)
    t = gemv.shape_tactics(1, 4096, 11008, half=True)
    assert t["block_n"] == 4 and t["stages"] == gemv.TACTICS["h8_stages"] and t["block_k"] == gemv.TACTICS["h8_block_k"]
    assert gemv.shape_tactics(1, 4096, 4096, half=True)["block_n"] == gemv.TACTICS["h8_block_n"]
    # the engine loads its tuned tactics afterwards: the override is merged over them, the rest kept
    tuning.apply_tactics({"gemv": {"per_shape": {"4096x11008": {"block_k": 512, "stages": 2},
                                                 "4096x4096": {"block_n": 16, "stages": 1}}}})
    t = gemv.shape_tactics(1, 4096, 11008, half=True)
    assert (t["block_n"], t["block_k"], t["stages"]) == (4, 512, 2)
    assert gemv.shape_tactics(1, 4096, 4096, half=True)["block_n"] == 16
    assert gemv.TACTICS["q8_stages"] == 3


@pytest.mark.parametrize("spec", ["gemv.per_shape.4096x11008=4", "gemv.block_n=x", "nope.block_n=4",
                                  "gemv.per_shape.4096x11008.block_n.more=4"])
def test_malformed_overrides_are_refused(decode_latency, spec):
    with pytest.raises(SystemExit, match="expected MODULE.KEY=INT"):
        decode_latency.override_tactics([spec])


def test_unknown_keys_are_refused(decode_latency):
    with pytest.raises(Exception, match="unknown keys"):
        decode_latency.override_tactics(["gemv.per_shape.4096x11008.blok_n=4"])
