"""llmc: convert a checkpoint once, build an engine once for your GPU, then serve it fast."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy: `import llmc` stays cheap for the CLI (torch loads only when a command needs it).
    if name == "LLM":
        from llmc.runtime.llm import LLM

        return LLM
    if name == "SamplingParams":
        from llmc.runtime.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
