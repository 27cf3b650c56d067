"""Shared CLI plumbing: user errors become one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import functools
import sys

import click

from llmc.errors import LLMCError


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LLMCError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper
