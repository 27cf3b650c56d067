"""Draft-model proposer: a second, smaller (or more quantized) engine with the same tokenizer proposes k
tokens by k cheap decode steps over its own paged KV cache.

Each target sequence has a shadow sequence in the draft's cache. Before proposing, the shadow catches up
on tokens the draft has not seen (the prompt at first, then the tokens the target accepted); after
verification its cache is rolled back to the tokens that are final, exactly like the target's.
"""
from __future__ import annotations

import torch

from llmc.build.engine import load_engine
from llmc.errors import ConfigError
from llmc.runtime.kv_cache import KVCacheManager
from llmc.runtime.model_runner import ModelRunner, ScheduledSeq
from llmc.runtime.sampler import SamplingBatch, exponential_noise, filtered_probs, seeded_generator
from llmc.runtime.sequence import Sequence


class DraftProposer:
    def __init__(self, cfg, engine):
        target = engine.engine
        draft = load_engine(cfg.draft_engine, engine.runner.device.type)
        if draft.model.vocab_size != target.model.vocab_size:
            raise ConfigError(f"draft engine vocabulary ({draft.model.vocab_size}) differs from the target's "
                              f"({target.model.vocab_size}); the draft must share the tokenizer")
        if draft.build.max_seq_len < target.build.max_seq_len:
            raise ConfigError(f"draft engine max_seq_len {draft.build.max_seq_len} is below the target's "
                              f"{target.build.max_seq_len}; rebuild the draft with --max-seq-len "
                              f"{target.build.max_seq_len}")
        r = engine.runner
        # As many blocks as the target: the draft shadows the same sequences (its blocks are smaller).
        self.runner = ModelRunner(draft, r.device, None if r.device.type == "cpu" else str(r.dtype).split(".")[-1],
                                  num_kv_blocks=r.num_kv_blocks * r.block_size // draft.build.block_size,
                                  show_progress=False, cuda_graph_batch_sizes=[])
        self.kv = KVCacheManager(self.runner.num_kv_blocks, draft.build.block_size, enable_prefix_caching=False)
        self.shadows: dict[int, Sequence] = {}
        self.max_tokens_per_forward = max(draft.build.max_num_tokens, 1)

    def _shadow(self, seq: Sequence) -> Sequence:
        sh = self.shadows.get(seq.seq_id)
        if sh is None:
            sh = Sequence(seq.request_id, list(seq.prompt_token_ids), seq.params)
            self.shadows[seq.seq_id] = sh
        # Mirror the target's final tokens; keep the cache only for the common prefix.
        sh.output_token_ids = list(seq.output_token_ids)
        if sh.num_computed_tokens > seq.num_tokens - 1:
            sh.num_computed_tokens = seq.num_tokens - 1
            self.kv.trim(sh, sh.num_computed_tokens)
        return sh

    def _forward(self, items: list[ScheduledSeq]) -> torch.Tensor | None:
        for it in items:
            if not self.kv.allocate_slots(it.seq, it.num_tokens):
                return None
        self.runner.copy_blocks(self.kv.take_pending_copies())
        logits = self.runner.forward(items)
        for it in items:
            it.seq.num_computed_tokens += it.num_tokens
        return logits

    def propose(self, seqs: list[Sequence], ks: list[int]):
        shadows = [self._shadow(s) for s in seqs]
        # Catch up in chunks until each shadow has computed all but its last token.
        while True:
            items = [ScheduledSeq(sh, min(sh.num_tokens - 1 - sh.num_computed_tokens, self.max_tokens_per_forward),
                                  False) for sh in shadows if sh.num_tokens - 1 > sh.num_computed_tokens]
            if not items:
                break
            if self._forward(items) is None:
                return [[] for _ in seqs], [None] * len(seqs)  # draft cache full: skip speculating
        proposals: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        dev = self.runner.device
        for step in range(max(ks)):
            live = [i for i, k in enumerate(ks) if step < k]
            items = [ScheduledSeq(shadows[i], 1, True) for i in live]
            logits = self._forward(items)
            if logits is None:
                break
            params = [seqs[i].params for i in live]
            batch = SamplingBatch.from_params(params, [[]] * len(live), [[]] * len(live), logits.shape[-1], dev,
                                              [0] * len(live))
            probs = filtered_probs(logits.float(), batch)
            gens = [seeded_generator(p.seed, 7_000_003 + seqs[i].num_output_tokens * 17 + step, dev)
                    if p.seed is not None else None for p, i in zip(params, live)]
            sampled = (probs / exponential_noise(tuple(probs.shape), gens, dev)).argmax(-1)
            tokens = torch.where(batch.temperature == 0, logits.argmax(-1), sampled).tolist()
            for j, i in enumerate(live):
                proposals[i].append(tokens[j])
                qs[i].append(probs[j])
                shadows[i].output_token_ids.append(tokens[j])
        out_q = []
        for i, s in enumerate(seqs):
            greedy = s.params.greedy
            out_q.append(None if greedy or not qs[i] else torch.stack(qs[i]))
        return proposals, out_q

    def rollback(self, seq: Sequence, num_valid_tokens: int) -> None:
        sh = self.shadows.get(seq.seq_id)
        if sh is None:
            return
        if sh.num_computed_tokens > num_valid_tokens:
            sh.num_computed_tokens = num_valid_tokens
            self.kv.trim(sh, num_valid_tokens)
        sh.output_token_ids = list(seq.output_token_ids)

    def release(self, seq: Sequence) -> None:
        sh = self.shadows.pop(seq.seq_id, None)
        if sh is not None:
            self.kv.free(sh)
