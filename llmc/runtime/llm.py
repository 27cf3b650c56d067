"""The offline Python API, shaped like vLLM's: ``LLM(engine_dir).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence as Seq

from tqdm import tqdm

from llmc.errors import RequestError
from llmc.runtime.engine import LLMEngine
from llmc.runtime.outputs import RequestOutput
from llmc.runtime.sampling_params import SamplingParams


class LLM:
    """Load an engine once, then generate for batches of prompts with in-flight batching.

    Keyword arguments go to ``LLMEngine`` (device, dtype, num_kv_blocks, enable_prefix_caching, ...).
    """

    def __init__(self, engine_dir: str | Path, **engine_kwargs):
        self.engine = LLMEngine(engine_dir, **engine_kwargs)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | Seq[str] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 prompt_token_ids: Seq[Seq[int]] | None = None, use_tqdm: bool = True,
                 priority: Seq[int] | None = None) -> list[RequestOutput]:
        """One output per prompt, in input order; ``outputs[i].outputs[j]`` is sample j of prompt i."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is None and prompt_token_ids is None:
            raise RequestError("generate() needs prompts or prompt_token_ids", "prompts")
        n = len(prompts) if prompts is not None else len(prompt_token_ids)
        if prompts is not None and prompt_token_ids is not None and len(prompt_token_ids) != n:
            raise RequestError("prompts and prompt_token_ids differ in length", "prompt_token_ids")
        params = sampling_params or SamplingParams()
        params = [params] * n if isinstance(params, SamplingParams) else list(params)
        if len(params) != n:
            raise RequestError(f"{len(params)} sampling params for {n} prompts", "sampling_params")
        reqs = []
        try:
            for i in range(n):
                reqs.append(self.engine.add_request(
                    prompts[i] if prompts is not None else None, params[i],
                    list(prompt_token_ids[i]) if prompt_token_ids is not None else None,
                    priority=priority[i] if priority is not None else 0))
            self._run(len(reqs), use_tqdm)
        except BaseException:
            for r in reqs:  # never leave half a batch holding KV blocks
                self.engine.abort_request(r.request_id)
            raise
        return [r.final_output() for r in reqs]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = [self.engine.apply_chat_template(c) for c in convs]
        return self.generate(prompt_token_ids=ids, sampling_params=sampling_params, use_tqdm=use_tqdm)

    def _run(self, total: int, use_tqdm: bool) -> None:
        bar = tqdm(total=total, desc="generate", unit="req", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    bar.update()
        bar.close()
