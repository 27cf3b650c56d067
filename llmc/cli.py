"""The ``llmc`` command line. Thin: it parses, calls the library, and turns ``LLMCError`` into one line
on stderr and a non-zero exit (never a traceback for bad input)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from llmc import __version__
from llmc.clitools import user_errors
from llmc.config import KV_CACHE_DTYPES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmc")
def main() -> None:
    """llmc: convert a checkpoint, build an engine for your GPU, serve it."""


QUANT_CHOICES = click.Choice(["none", "int8", "int4", "int4-awq", "fp8", "w8a8"])


def quant_options(fn):
    for opt in reversed([
        click.option("--quant", type=QUANT_CHOICES, default=None, help="Quantize weights with this method."),
        click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="128", show_default=True,
                     help="Group size for int4 methods."),
        click.option("--calib-data", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Calibration text (one sample per line) or JSONL with a 'text' field."),
        click.option("--calib-samples", type=int, default=64, show_default=True),
        click.option("--calib-seq-len", type=int, default=256, show_default=True),
    ]):
        fn = opt(fn)
    return fn


def _quant_kwargs(group_size, calib_data, calib_samples, calib_seq_len) -> dict:
    return {"group_size": int(group_size), "calib_data": calib_data, "calib_samples": calib_samples,
            "calib_seq_len": calib_seq_len}


@main.command()
@click.option("--model", "-m", required=True, help="HF model directory, .gguf file, or alias (smollm2-135m).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Checkpoint directory.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True)
@click.option("--allow-pickle", is_flag=True, help="Load *.bin/*.pt weights (with torch.load(weights_only=True)).")
@quant_options
@user_errors
def convert(model, output, dtype, allow_pickle, quant, group_size, calib_data, calib_samples, calib_seq_len):
    """Convert a Hugging Face or GGUF model into an llmc checkpoint."""
    from llmc.convert import convert as do_convert

    out = do_convert(model, output, dtype=dtype, allow_pickle=allow_pickle, quant=quant,
                     **(_quant_kwargs(group_size, calib_data, calib_samples, calib_seq_len) if quant else {}))
    click.echo(f"checkpoint written to {out}")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Engine directory.")
@click.option("--max-batch-size", type=int, default=256, show_default=True,
              help="Most sequences decoding at once (a CUDA graph is captured per bucket up to it).")
@click.option("--max-seq-len", type=int, default=None, help="Default: min(4096, the model's context).")
@click.option("--max-num-tokens", type=int, default=2048, show_default=True, help="Token budget of one step.")
@click.option("--block-size", type=int, default=16, show_default=True, help="KV cache block size (tokens).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Compute dtype on the GPU (the CPU always computes in float32).")
@click.option("--kv-cache-dtype", type=click.Choice(list(KV_CACHE_DTYPES)), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Target device; cuda tunes kernels for the GPU on this machine.")
@click.option("--tp-size", type=int, default=1, show_default=True)
@click.option("--tune/--no-tune", default=True, show_default=True,
              help="With --device cuda: time kernel variants on this GPU and store the fastest in the engine.")
@quant_options
@user_errors
def build(checkpoint, output, max_batch_size, max_seq_len, max_num_tokens, block_size, dtype, kv_cache_dtype,
          device, tp_size, tune, quant, group_size, calib_data, calib_samples, calib_seq_len):
    """Build an engine from a checkpoint."""
    from llmc.build.builder import build as do_build
    from llmc.config import BuildConfig
    from llmc.convert.checkpoint import load_checkpoint

    if max_seq_len is None:
        max_seq_len = min(4096, load_checkpoint(checkpoint).config.max_position_embeddings)
    cfg = BuildConfig(max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
                      kv_cache_dtype=kv_cache_dtype, block_size=block_size, dtype=dtype, device=device,
                      tp_size=tp_size)
    out = do_build(checkpoint, output, cfg, quant=quant, tune=tune,
                   **(_quant_kwargs(group_size, calib_data, calib_samples, calib_seq_len) if quant else {}))
    click.echo(f"engine written to {out}")


@main.command()
@click.argument("engine", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print engine.json as is.")
@user_errors
def info(engine, as_json):
    """Show what is inside an engine (or a checkpoint)."""
    from llmc.build.engine import load_engine
    from llmc.convert.checkpoint import load_checkpoint

    path = Path(engine)
    if not (path / "engine.json").is_file() and (path / "config.json").is_file():
        ck = load_checkpoint(path)
        rows = [("kind", "checkpoint"), *_model_rows(ck.config), ("quantization", ck.quant.method),
                ("source", ck.source.get("model", "?"))]
    else:
        e = load_engine(path)
        if as_json:
            click.echo((path / "engine.json").read_text())
            return
        size = sum(w.stat().st_size for w in e.weights)
        rows = [("kind", "engine"), ("llmc version", e.llmc_version), *_model_rows(e.model),
                ("quantization", e.quant.method + (f" (group {e.quant.group_size})" if e.quant.group_size else "")),
                ("target", e.target.get("device_name", e.target.get("device", "?"))),
                ("compute capability", e.target.get("compute_capability", "-")),
                ("max batch size", e.build.max_batch_size), ("max seq len", e.build.max_seq_len),
                ("max tokens / step", e.build.max_num_tokens), ("kv cache", f"{e.build.kv_cache_dtype}, "
                                                                        f"block {e.build.block_size}"),
                ("compute dtype", e.build.dtype), ("tp size", e.build.tp_size),
                ("tactics", json.dumps(e.tactics) if e.tactics else "-"),
                ("tokenizer", "yes" if e.tokenizer_dir else "no (token ids only)"),
                ("weights", f"{len(e.weights)} file(s), {size / 2**20:.1f} MiB")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def _model_rows(m) -> list[tuple[str, object]]:
    return [("model type", m.model_type), ("layers", m.num_hidden_layers), ("hidden size", m.hidden_size),
            ("heads (q/kv)", f"{m.num_attention_heads}/{m.num_key_value_heads}"), ("head dim", m.head_dim),
            ("vocab", m.vocab_size), ("context", m.max_position_embeddings), ("weights dtype", m.dtype),
            ("rope", f"theta {m.rope_theta:g}" + (f", {m.rope_scaling}" if m.rope_scaling else "")),
            ("tied embeddings", m.tie_word_embeddings)]


def sampling_options(fn):
    for opt in reversed([
        click.option("--max-tokens", type=int, default=128, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]):
        fn = opt(fn)
    return fn


def speculative_options(fn):
    for opt in reversed([
        click.option("--speculative", type=click.Choice(["ngram", "draft"]), default=None,
                     help="Speculative decoding: prompt-lookup n-grams, or a draft engine."),
        click.option("--draft-engine", type=click.Path(), default=None, help="Draft engine (with --speculative draft)."),
        click.option("--num-speculative-tokens", type=int, default=4, show_default=True),
    ]):
        fn = opt(fn)
    return fn


def spec_config(speculative, draft_engine, num_speculative_tokens):
    if speculative is None:
        return None
    from llmc.spec.decoder import SpecConfig

    return SpecConfig(method=speculative, draft_engine=draft_engine, num_speculative_tokens=num_speculative_tokens)


@main.command()
@click.argument("engine", type=click.Path())
@click.argument("prompt")
@click.option("--chat", is_flag=True, help="Apply the model's chat template (PROMPT is the user message).")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda if available.")
@sampling_options
@speculative_options
@user_errors
def generate(engine, prompt, chat, system, device, max_tokens, temperature, top_p, top_k, min_p,
             repetition_penalty, seed, stop, speculative, draft_engine, num_speculative_tokens):
    """Generate a completion for PROMPT, streaming it to the terminal."""
    from llmc.runtime.engine import LLMEngine
    from llmc.runtime.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed, stop=list(stop))
    eng = LLMEngine(engine, device=device, show_progress=False,
                    speculative=spec_config(speculative, draft_engine, num_speculative_tokens))
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        req = eng.add_request(params=params, prompt_token_ids=eng.apply_chat_template(messages))
    else:
        req = eng.add_request(prompt, params)
    reason = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            for c in out.outputs:
                click.echo(c.text, nl=False)
                reason = c.finish_reason or reason
    click.echo("")
    m = req.metrics
    n = len(req.states[0].seq.output_token_ids)
    if m.first_token_time and m.finished_time:
        dt = m.finished_time - m.first_token_time
        click.echo(f"[{n} tokens, finish: {reason}, TTFT {1e3 * (m.first_token_time - m.arrival_time):.0f} ms"
                   + (f", {(n - 1) / dt:.1f} tok/s" if n > 1 and dt > 0 else "")
                   + (f", speculation accepted {req.spec_accepted}/{req.spec_proposed}" if req.spec_proposed else "")
                   + "]", err=True)


def _register_subcommands() -> None:
    from llmc.benchmark.command import bench
    from llmc.cli_quant import eval_ppl
    from llmc.serve.command import serve

    main.add_command(bench)
    main.add_command(eval_ppl)
    main.add_command(serve)


_register_subcommands()

if __name__ == "__main__":
    main()
