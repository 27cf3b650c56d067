"""``llmc eval-ppl``: perplexity of an engine over a text file (and agreement with a reference engine)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from llmc.clitools import user_errors


@click.command("eval-ppl")
@click.argument("engine", type=click.Path())
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="UTF-8 text to score (default: the held-out half of Python's pydoc topics, PSF license).")
@click.option("--window", type=int, default=512, show_default=True, help="Tokens per forward.")
@click.option("--stride", type=int, default=256, show_default=True,
              help="Tokens between window starts; each token is scored once, with >= window-stride context.")
@click.option("--max-tokens", type=int, default=None, help="Score only the first N tokens.")
@click.option("--reference", type=click.Path(), default=None,
              help="Engine (e.g. the float one) to compare greedy next-token predictions with.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@user_errors
def eval_ppl(engine, text_file, window, stride, max_tokens, reference, device):
    """Perplexity of ENGINE over a text (strided windows, teacher-forced); JSON on stdout."""
    from llmc.build.engine import load_engine
    from llmc.convert.quantize import heldout_eval_text
    from llmc.runtime.perplexity import perplexity

    eng = load_engine(engine)
    if text_file:
        try:
            text, source = Path(text_file).read_text(encoding="utf-8"), text_file
        except UnicodeDecodeError as e:
            raise click.BadParameter(f"{text_file} is not UTF-8 text ({e})", param_hint="--text") from None
    else:
        text, source = heldout_eval_text()
    res = perplexity(engine, text, window, stride, reference_engine=reference, max_tokens=max_tokens, device=device)
    click.echo(json.dumps({"engine": str(engine), "quantization": eng.quant.method, "text": source,
                           "reference": reference, **res}, indent=1))
