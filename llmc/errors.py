"""User-facing errors.

Every error a user can cause (bad path, bad flag, bad request) is an ``LLMCError``: the CLI prints its
message on one line and exits non-zero, the server turns it into an OpenAI-style JSON error. Anything
else escaping is a bug in llmc.
"""
from __future__ import annotations


class LLMCError(Exception):
    """An error caused by input, with a message that names the problem and the fix."""

    exit_code = 2


class ConfigError(LLMCError):
    """A config file or option is invalid or unsupported."""


class CheckpointError(LLMCError):
    """A model/checkpoint/engine on disk is missing, corrupt or unsupported."""


class EngineVersionError(CheckpointError):
    """An engine was built by another format version or for another device."""


class RequestError(LLMCError):
    """A generation request has invalid parameters (maps to HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class CapacityError(LLMCError):
    """The engine cannot take more work right now (maps to HTTP 429/503)."""
