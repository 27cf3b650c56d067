"""``llmc serve``: load an engine (or build the bundled default model once) and serve it over HTTP."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import click

from llmc.clitools import user_errors

DEFAULT_MODEL = "smollm2-135m"


def default_engine_dir() -> Path:
    """The bundled model's engine, converted and built on first use into the llmc cache."""
    root = Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmc")) / "engines" / DEFAULT_MODEL
    if (root / "engine.json").is_file():
        return root
    from llmc.build.builder import build
    from llmc.config import BuildConfig
    from llmc.convert import convert

    click.echo(f"first run: converting and building {DEFAULT_MODEL} into {root} (once)", err=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".build-") as tmp:
        ckpt = convert(DEFAULT_MODEL, Path(tmp) / "ckpt")
        engine = build(ckpt, Path(tmp) / "engine", BuildConfig(max_seq_len=2048, max_batch_size=32, max_num_tokens=512))
        if not (root / "engine.json").is_file():  # another process may have won the race
            if root.exists():
                shutil.rmtree(root)
            os.replace(engine, root)
    return root


@click.command("serve")
@click.argument("engine", required=False, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless told).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, envvar="LLMC_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--served-model-name", default=None, help="Model name clients use (default: engine dir name).")
@click.option("--max-queued-requests", default=256, show_default=True, type=int,
              help="Waiting sequences beyond which new requests get 429.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda if available.")
@click.option("--num-kv-blocks", type=int, default=None, help="KV cache size in blocks (default: from memory).")
@click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True)
@click.option("--grace-period", type=float, default=30.0, show_default=True,
              help="Seconds in-flight requests get to finish on SIGTERM.")
@click.option("--max-body-bytes", type=int, default=4 << 20, show_default=True)
@click.option("--speculative", type=click.Choice(["ngram", "draft"]), default=None)
@click.option("--draft-engine", type=click.Path(), default=None)
@click.option("--num-speculative-tokens", type=int, default=4, show_default=True)
@click.option("--log-level", default="info", show_default=True)
@user_errors
def serve(engine, host, port, api_key, served_model_name, max_queued_requests, device, num_kv_blocks,
          gpu_memory_utilization, grace_period, max_body_bytes, speculative, draft_engine, num_speculative_tokens,
          log_level):
    """Serve ENGINE (default: the bundled SmolLM2-135M) with an OpenAI-compatible API."""
    import uvicorn

    from llmc.cli import spec_config
    from llmc.runtime.async_engine import AsyncLLMEngine
    from llmc.runtime.engine import LLMEngine
    from llmc.serve.app import build_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = served_model_name
    if engine is None:
        engine = default_engine_dir()
        name = name or DEFAULT_MODEL
    name = name or Path(engine).resolve().name
    core = LLMEngine(engine, device=device, num_kv_blocks=num_kv_blocks,
                     gpu_memory_utilization=gpu_memory_utilization,
                     speculative=spec_config(speculative, draft_engine, num_speculative_tokens))
    app = build_app(AsyncLLMEngine(core, max_queued_requests), name, api_key, max_body_bytes, grace_period)
    click.echo(f"serving {name!r} at http://{host}:{port}/v1 (KV cache: {core.kv.num_blocks} blocks of "
               f"{core.kv.block_size} tokens)", err=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(grace_period) + 5)
    _graceful_server_class()(config).run()


def _graceful_server_class():
    import contextlib
    import signal

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """SIGTERM/SIGINT: stop accepting, drain within the grace period (lifespan), then exit 0.
        (Plain uvicorn re-raises the signal after draining, so the process would die with status 143.)"""

        @contextlib.contextmanager
        def capture_signals(self):
            sigs = (signal.SIGINT, signal.SIGTERM)
            old = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return GracefulServer

