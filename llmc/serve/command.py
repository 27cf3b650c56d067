"""``llmc serve``: load an engine (or build the bundled default model once) and serve it over HTTP."""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import click

from llmc.clitools import user_errors
from llmc.config import KV_CACHE_DTYPES, SCHEDULER_POLICIES
from llmc.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"
log = logging.getLogger("llmc.serve")


def default_engine_dir() -> Path:
    """The bundled model's engine, converted and built on first use into ``$LLMC_CACHE/engines`` (default
    ``~/.cache/llmc``). Built in a temporary directory beside it and renamed into place, so an interrupted
    build or a concurrent server never sees a half-written engine."""
    root = Path(os.environ.get("LLMC_CACHE") or Path.home() / ".cache" / "llmc") / "engines" / DEFAULT_MODEL
    if (root / "engine.json").is_file():
        return root
    from llmc.build.builder import build
    from llmc.config import BuildConfig
    from llmc.convert import convert

    click.echo(f"first run: converting and building {DEFAULT_MODEL} into {root} (once)", err=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{DEFAULT_MODEL}-build-") as tmp:
        ckpt = convert(DEFAULT_MODEL, Path(tmp) / "ckpt")
        engine = build(ckpt, Path(tmp) / "engine", BuildConfig(max_seq_len=2048, max_batch_size=32, max_num_tokens=512))
        if root.exists() and not (root / "engine.json").is_file():
            shutil.rmtree(root, ignore_errors=True)  # debris from a build of an older llmc
        try:
            os.replace(engine, root)
        except OSError:
            if not (root / "engine.json").is_file():  # not another process winning the race: a real error
                raise
    return root


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


def parse_size(text: str | None) -> int | None:
    """'8GiB', '512MB', '1.5g' or a plain byte count."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--kv-cache-memory: expected a size such as 4GiB or 512MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


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
@click.option("--kv-cache-memory", default=None, help="KV cache size in bytes, e.g. 4GiB (default: from memory).")
@click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True)
@click.option("--grace-period", type=float, default=30.0, show_default=True,
              help="Seconds in-flight requests get to finish on SIGTERM before they are aborted.")
@click.option("--max-body-bytes", type=int, default=4 << 20, show_default=True)
@click.option("--speculative", type=click.Choice(["ngram", "draft"]), default=None)
@click.option("--draft-engine", type=click.Path(), default=None)
@click.option("--num-speculative-tokens", type=int, default=4, show_default=True)
@click.option("--async-scheduling/--no-async-scheduling", default=None,
              help="Pipeline steps: schedule step N+1 while the GPU runs step N (default: on for one GPU).")
@click.option("--kv-cache-dtype", type=click.Choice(list(KV_CACHE_DTYPES)), default=None,
              help="Override the engine's KV cache format (default: as built).")
@click.option("--scheduler-policy", type=click.Choice(list(SCHEDULER_POLICIES)), default="max_utilization",
              show_default=True, help="guaranteed_no_evict admits a request only when its whole length (prompt + "
                                      "max_tokens) fits, so none is ever preempted.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@user_errors
def serve(engine, host, port, api_key, served_model_name, max_queued_requests, device, num_kv_blocks,
          kv_cache_memory, gpu_memory_utilization, grace_period, max_body_bytes, speculative, draft_engine,
          num_speculative_tokens, async_scheduling, kv_cache_dtype, scheduler_policy, log_level):
    """Serve ENGINE (default: the bundled SmolLM2-135M) with an OpenAI-compatible API."""
    import uvicorn

    from llmc.cli import spec_config
    from llmc.runtime.async_engine import AsyncLLMEngine
    from llmc.runtime.engine import LLMEngine
    from llmc.serve.app import build_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if max_queued_requests < 0 or grace_period < 0 or max_body_bytes <= 0:
        raise ConfigError("--max-queued-requests and --grace-period must be >= 0, --max-body-bytes > 0")
    kv_bytes = parse_size(kv_cache_memory)
    name = served_model_name
    if engine is None:
        engine = default_engine_dir()
        name = name or DEFAULT_MODEL
    name = name or Path(engine).resolve().name
    core = LLMEngine(engine, device=device, num_kv_blocks=num_kv_blocks, kv_cache_bytes=kv_bytes,
                     gpu_memory_utilization=gpu_memory_utilization,
                     speculative=spec_config(speculative, draft_engine, num_speculative_tokens),
                     async_scheduling=async_scheduling, kv_cache_dtype=kv_cache_dtype,
                     scheduler_policy=scheduler_policy)
    async_engine = AsyncLLMEngine(core, max_queued_requests)
    app = build_app(async_engine, name, api_key, max_body_bytes, grace_period)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %r at http://%s:%d/v1 (KV cache: %d blocks of %d tokens)", name, shown, port,
             core.kv.num_blocks, core.kv.block_size)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_period,
                            timeout_keep_alive=5)
    graceful_server(config, async_engine).run()


def graceful_server(config, async_engine):
    """A uvicorn server that drains gracefully (defined on first use: importing the CLI must not need
    uvicorn, which only ``serve`` uses)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """SIGTERM/SIGINT: stop accepting (new requests on open connections get 503, /health says so), let
        in-flight requests finish for the grace period, abort the rest, shut the engine down, exit 0.
        (Plain uvicorn re-raises the signal after draining, so the process would die with status 143.)"""

        def __init__(self, config, async_engine):
            super().__init__(config)
            self.async_engine = async_engine

        def handle_exit(self, sig, frame) -> None:
            self.async_engine.accepting = False
            super().handle_exit(sig, frame)

        def capture_signals(self):
            import contextlib
            import signal

            @contextlib.contextmanager
            def capture():
                sigs = (signal.SIGINT, signal.SIGTERM)
                old = {s: signal.signal(s, self.handle_exit) for s in sigs}
                try:
                    yield
                finally:
                    for s, h in old.items():
                        signal.signal(s, h)

            return capture()

    return GracefulServer(config, async_engine)
