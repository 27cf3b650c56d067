"""Hugging Face transformers' own continuous batching (``generate_batch``) on random weights of a named shape:
the peer figure beside ``llmc bench throughput`` in the same device call.

    python benchmarks/hf_throughput.py llama-2-7b -n 128 --input-len 128 --output-len 128

Prints one JSON object; a failure of transformers' API is reported in it (``error``), not raised, so the
device call carries on with its other measurements.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_ckpt import SHAPES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("-n", "--num-requests", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    a = ap.parse_args()
    import transformers
    from transformers import GenerationConfig

    s = SHAPES[a.shape]
    cfg = transformers.LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], head_dim=s["head_dim"], rope_theta=s["rope_theta"],
        max_position_embeddings=s["max_position_embeddings"])
    res = {"shape": a.shape, "weights": "synthetic (random init)", "transformers": transformers.__version__,
           "num_requests": a.num_requests, "input_len": a.input_len, "output_len": a.output_len}
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randint(10, s["vocab_size"], (a.input_len,), generator=g).tolist()
                  for _ in range(a.num_requests)]
        gen = GenerationConfig(max_new_tokens=a.output_len, min_new_tokens=a.output_len, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        model.generate_batch(inputs[:4], generation_config=gen, progress_bar=False)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = model.generate_batch(inputs, generation_config=gen, progress_bar=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        n_out = sum(len(getattr(o, "generated_tokens", []) or []) for o in outs.values())
        res.update({"elapsed_s": dt, "output_tokens": n_out, "output_tokens_per_s": n_out / dt})
    except Exception as e:  # noqa: BLE001 - the peer's failure is a result to report, not a crash
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
