"""``llmc eval-ppl``: perplexity of an engine over a text file (and agreement with a reference engine)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from llmc.clitools import user_errors


@click.command("eval-ppl")
@click.argument("engine", type=click.Path())
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text to score (default: the held-out half of Python's pydoc topics, PSF license).")
@click.option("--window", type=int, default=512, show_default=True)
@click.option("--stride", type=int, default=256, show_default=True)
@click.option("--max-tokens", type=int, default=None, help="Score only the first N tokens.")
@click.option("--reference", type=click.Path(), default=None, help="Engine to compare greedy predictions with.")
@user_errors
def eval_ppl(engine, text_file, window, stride, max_tokens, reference):
    """Perplexity of ENGINE over a text (strided windows); JSON on stdout."""
    from transformers import AutoTokenizer

    from llmc.build.engine import load_engine
    from llmc.convert.quantize import heldout_eval_text
    from llmc.errors import ConfigError
    from llmc.runtime.perplexity import perplexity

    eng = load_engine(engine)
    if eng.tokenizer_dir is None:
        raise ConfigError("this engine has no tokenizer to encode the text with")
    text, source = (Path(text_file).read_text(encoding="utf-8"), text_file) if text_file else heldout_eval_text()
    ids = AutoTokenizer.from_pretrained(str(eng.tokenizer_dir)).encode(text)[:max_tokens]
    res = perplexity(engine, ids, window, stride, reference)
    click.echo(json.dumps({"engine": str(engine), "quantization": eng.quant.method, "text": source, **res}, indent=1))
