"""LLMEngine: requests in, token deltas out, one ``step()`` at a time.

It glues the parts: the scheduler picks the batch, the model runner computes it, the sampler picks
tokens, and the engine applies them (stop conditions, detokenization, metrics, n > 1 forks). It is
single-threaded on purpose; ``AsyncLLMEngine`` drives it from a background task for the server.

Pipelined steps (``async_scheduling``, on by default on a GPU): a step is *launched* (forward and sampling
queued on the device, the sampled tokens copied back without waiting) and *resolved* later (tokens read,
stops checked, outputs made). ``step()`` launches step N, then resolves step N-1 while the GPU computes N,
so the host's scheduling and output work hides behind device time instead of adding to it. Step N is
scheduled before step N-1's tokens are known: each decode's input token is fed on the device from N-1's
sampled tokens (``TokenFeed``), and a sequence that N-1 finished (EOS, stop string) computes one token
that is thrown away. Requests whose sampling needs the previous token on the host (penalties) and
speculative decoding make the engine drain the pipeline and run steps synchronously while they live.
"""
from __future__ import annotations

import dataclasses

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmc.build.engine import load_engine
from llmc.errors import ConfigError, RequestError
from llmc.runtime.detokenizer import IncrementalDetokenizer
from llmc.runtime.kv_cache import KVCacheManager
from llmc.runtime.metrics import EngineMetrics
from llmc.plugins.metadata import upload
from llmc.runtime.model_runner import ModelRunner, ScheduledSeq, TokenFeed
from llmc.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from llmc.runtime.sampler import Sampler, SamplerOutput, SamplingBatch
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.scheduler import Scheduler, SchedulerOutput
from llmc.runtime.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from llmc.spec.decoder import SpecConfig

_request_ids = itertools.count()


@dataclass
class SeqState:
    """Per-sequence output state kept by the engine (text, logprobs, what was already emitted)."""

    seq: Sequence
    detok: IncrementalDetokenizer | None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    emitted_tokens: int = 0
    emitted_logprobs: int = 0
    last_token_time: float | None = None
    finish_reported: bool = False


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    states: list[SeqState]
    metrics: RequestMetrics
    spec_proposed: int = 0
    spec_accepted: int = 0

    @property
    def finished(self) -> bool:
        if len(self.states) != self.params.n:
            return False
        for s in self.states:  # a loop, not all(genexpr): this runs once per output of every step
            if not s.seq.is_finished:
                return False
        return True

    def final_output(self) -> RequestOutput:
        outs = []
        for st in sorted(self.states, key=lambda s: s.seq.index):
            text = st.detok.text if st.detok else ""
            outs.append(CompletionOutput(
                index=st.seq.index, text=text, token_ids=list(st.seq.output_token_ids),
                cumulative_logprob=st.cumulative_logprob if self.params.logprobs is not None else None,
                logprobs=list(st.logprobs) if self.params.logprobs is not None else None,
                finish_reason=st.seq.status.value if st.seq.is_finished else None, stop_reason=st.seq.stop_reason))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished, self.metrics)


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are queued on the device; ``LLMEngine._resolve`` reads it back."""

    seqs: list[Sequence] = field(default_factory=list)  # seqs[i] sampled row i of ``tokens``
    tokens: torch.Tensor | None = None  # device int64 [len(seqs)]: the next step's pending inputs
    host: SamplerOutput | None = None  # host copies of the sampler's output, valid once ``event`` is done
    event: "torch.cuda.Event | None" = None
    spec_items: list[tuple[Sequence, torch.Tensor]] = field(default_factory=list)


def copy_to_host(res: SamplerOutput) -> tuple[SamplerOutput, "torch.cuda.Event | None"]:
    """Pinned host copies of a device sampler output, queued behind the sampling kernels, and the event that
    says they have landed. On the CPU the output is already on the host."""
    if res.token_ids.device.type != "cuda":
        return res, None

    def copy(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        return h

    host = SamplerOutput(copy(res.token_ids), copy(res.logprobs), copy(res.top_logprobs), copy(res.top_token_ids))
    event = torch.cuda.Event()
    event.record()
    return host, event


class LLMEngine:
    def __init__(self, engine_dir: str | Path, device: str | None = None, dtype: str | None = None,
                 num_kv_blocks: int | None = None, enable_prefix_caching: bool = True,
                 max_batch_size: int | None = None, max_num_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.9, kv_cache_bytes: int | None = None,
                 show_progress: bool = True, cuda_graph_batch_sizes: list[int] | None = None,
                 speculative: "SpecConfig | None" = None, async_scheduling: bool | None = None,
                 kv_cache_dtype: str | None = None, scheduler_policy: str = "max_utilization"):
        """``async_scheduling``: pipeline steps (module docstring); default on for one GPU, off on the CPU
        (nothing to overlap there) and under tensor parallelism. ``kv_cache_dtype`` (auto / fp8 / int8)
        overrides the engine's: the cache's format is a memory choice, not part of the weights.
        ``scheduler_policy``: ``max_utilization`` or ``guaranteed_no_evict`` (``runtime.scheduler``)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = load_engine(engine_dir, device)
        if kv_cache_dtype is not None and kv_cache_dtype != self.engine.build.kv_cache_dtype:
            if self.engine.build.tp_size > 1:
                raise ConfigError("--kv-cache-dtype cannot be overridden for a tensor-parallel engine yet; rebuild "
                                  "it with `llmc build ... --kv-cache-dtype " + kv_cache_dtype + "`")
            self.engine.build = dataclasses.replace(self.engine.build, kv_cache_dtype=kv_cache_dtype)
        b = self.engine.build
        self.max_seq_len = b.max_seq_len
        self.max_batch_size = min(max_batch_size or b.max_batch_size, b.max_batch_size)
        self.max_num_tokens = min(max_num_tokens or b.max_num_tokens, b.max_num_tokens)
        if b.tp_size > 1:
            from llmc.distributed.executor import TPExecutor

            self.runner = TPExecutor(self.engine, device, dtype, num_kv_blocks, gpu_memory_utilization,
                                     kv_cache_bytes, show_progress, cuda_graph_batch_sizes)
        else:
            self.runner = ModelRunner(self.engine, device, dtype, num_kv_blocks, gpu_memory_utilization,
                                      kv_cache_bytes, show_progress, cuda_graph_batch_sizes)
        self.kv = KVCacheManager(self.runner.num_kv_blocks, b.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, self.max_num_tokens, self.max_batch_size, policy=scheduler_policy)
        self.sampler = Sampler()
        self.tokenizer = self._load_tokenizer()
        self.eos_token_ids = set(self.engine.model.eos_token_id)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, Request] = {}
        self.metrics = EngineMetrics()
        if async_scheduling is None:
            async_scheduling = torch.device(device).type == "cuda" and b.tp_size == 1
        if async_scheduling and b.tp_size > 1:
            raise ConfigError("async scheduling is not supported with tensor parallelism yet; leave it off")
        self.async_scheduling = async_scheduling
        self._inflight: LaunchedStep | None = None  # launched, not yet resolved (pipelined steps)
        self._sync_requests = 0  # live requests whose sampling needs the host to know the previous token
        self.spec = None
        if speculative is not None:
            from llmc.spec.decoder import SpecDecoder

            self.spec = SpecDecoder(speculative, self)

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (a no-op for one rank)."""
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()

    def _load_tokenizer(self):
        tok_dir = self.engine.tokenizer_dir
        if tok_dir is None:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tok_dir))

    @property
    def vocab_size(self) -> int:
        return self.engine.model.vocab_size

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this engine has no tokenizer; pass prompt_token_ids instead of text", "prompt")
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model has no chat template; use a plain completion prompt", "messages")
        try:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        except Exception as e:  # template errors are caused by the messages
            raise RequestError(f"chat template failed on these messages: {e}", "messages") from None

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise RequestError("prompt is empty; give at least one token", "prompt")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})", "prompt")
        total = len(prompt_token_ids) + (params.max_tokens or 1)
        if total > self.max_seq_len:
            raise RequestError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"this engine's max_seq_len {self.max_seq_len}; shorten the prompt or lower max_tokens",
                "max_tokens")

    def add_request(self, prompt: str | None = None, params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, request_id: str | None = None,
                    priority: int = 0, arrival_time: float | None = None) -> Request:
        params = params or SamplingParams()
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestError("give a prompt or prompt_token_ids", "prompt")
            prompt_token_ids = self.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        if params.max_tokens is None:  # "as many as fit"
            params.max_tokens = max(1, self.max_seq_len - len(prompt_token_ids))
        self.validate(prompt_token_ids, params)
        request_id = request_id or f"req-{next(_request_ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        now = time.monotonic()
        seq = Sequence(request_id, prompt_token_ids, params, priority=priority,
                       arrival_time=arrival_time if arrival_time is not None else now)
        req = Request(request_id, prompt, prompt_token_ids, params, [self._state(seq)],
                      RequestMetrics(arrival_time=seq.arrival_time))
        self.requests[request_id] = req
        self._sync_requests += self._needs_sync(params)
        self.scheduler.add(seq)
        self.metrics.prompt_tokens += len(prompt_token_ids)
        return req

    def _state(self, seq: Sequence) -> SeqState:
        detok = None
        if self.tokenizer is not None:
            p = seq.params
            detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, p.stop, p.skip_special_tokens,
                                           p.include_stop_str_in_output)
        return SeqState(seq, detok)

    @staticmethod
    def _needs_sync(params: SamplingParams) -> bool:
        """Penalties count the output tokens on the host, so they cannot run a step ahead of them."""
        return params.has_penalties

    def _drop(self, request_id: str) -> Request | None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self._sync_requests -= self._needs_sync(req.params)
        return req

    def abort_request(self, request_id: str) -> bool:
        """Abort a request at any point; its blocks are freed at once (a step still in flight that writes
        into them runs before any later step that reuses them). Returns False if unknown/finished."""
        req = self._drop(request_id)
        if req is None:
            return False
        for st in req.states:
            if not st.seq.is_finished:
                st.seq.status = SequenceStatus.FINISHED_ABORTED
            self.scheduler.remove(st.seq)
            if self.spec is not None:
                self.spec.release(st.seq)
        self._count_finish("abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step, and return the delta outputs of the step that just completed: this
        one when running synchronously, the previous one when pipelined."""
        pipelined = self.async_scheduling and self.spec is None and not self._sync_requests
        if self._inflight is not None and not pipelined:  # drain before a synchronous step
            done, self._inflight = self._inflight, None
            return self._resolve(done)
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        out = self.scheduler.schedule()
        self.metrics.num_preemptions += len(out.preempted)
        for seq in out.preempted:
            if self.spec is not None:
                self.spec.release(seq)
        launched = self._launch(out) if not out.empty else None
        if pipelined:
            launched, self._inflight = self._inflight, launched
        if launched is None:
            self._update_gauges()
            return []
        return self._resolve(launched)

    def _feed(self, items: list[ScheduledSeq]) -> TokenFeed | None:
        """Device sources of the pending input tokens: the previous launched step's sampled rows."""
        dst: list[int] = []
        src: list[int] = []
        flat = 0
        for item in items:
            seq = item.seq
            start, known = seq.num_computed_tokens, seq.num_known_tokens
            if seq.num_pending and start + item.num_tokens > known:  # input includes the pending (last) token
                if seq.num_pending != 1 or self._inflight is None or self._inflight.tokens is None:
                    raise AssertionError(f"sequence {seq.seq_id}: pending input token with no step to feed it")
                dst.append(flat + known - start)
                src.append(seq.pending_row)
            flat += item.num_tokens
        return TokenFeed(self._inflight.tokens, dst, src) if dst else None

    def _launch(self, out: SchedulerOutput) -> LaunchedStep:
        """Queue the forward and the sampling of one scheduled batch; nothing here waits for the device."""
        self.runner.copy_blocks(self.kv.take_pending_copies())
        feed = self._feed(out.scheduled)
        logits = self.runner.forward(out.scheduled, feed=feed)
        self.scheduler.commit(out)
        self.metrics.computed_tokens += out.num_tokens
        now = time.monotonic()
        launched = LaunchedStep()
        rows: list[int] = []
        row = 0
        for item in out.scheduled:
            if not item.sample:
                continue
            seq = item.seq
            req = self.requests[seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
                req.metrics.num_cached_tokens = seq.num_cached_prompt_tokens
            if item.num_logits > 1:
                launched.spec_items.append((seq, logits[row:row + item.num_logits]))
            else:
                launched.seqs.append(seq)
                rows.append(row)
                if seq.params.n > 1 and seq.index == 0 and len(req.states) == 1:
                    for child in self._fork(req, seq):
                        launched.seqs.append(child)
                        rows.append(row)
            row += item.num_logits
        if launched.seqs:
            if rows != list(range(logits.shape[0])):
                logits = logits[upload([rows], logits.device)[0]]
            res = self._sample(logits, launched.seqs)
            for i, seq in enumerate(launched.seqs):
                seq.num_pending += 1
                seq.pending_row = i
            launched.tokens = res.token_ids
            launched.host, launched.event = copy_to_host(res)
        return launched

    def _resolve(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Read a launched step's tokens back (waiting for the device if it is still busy) and apply them."""
        if launched.event is not None:
            launched.event.synchronize()
        if launched.seqs:
            assert launched.host is not None
            self._apply_samples(launched.host, launched.seqs)
        if launched.spec_items:
            self._verify_and_apply(launched.spec_items)
        touched = launched.seqs + [s for s, _ in launched.spec_items]
        return self._collect_outputs(touched)

    def _verify_and_apply(self, items: list[tuple[Sequence, torch.Tensor]]) -> None:
        """Append the verified tokens, then roll the caches back to the tokens that are final."""
        assert self.spec is not None
        results = self.spec.verify(items)
        now = time.monotonic()
        for (seq, _), toks in zip(items, results):
            if seq.is_finished:
                continue
            st = self._seq_state(seq)
            k, a = len(seq.spec_token_ids), len(toks) - 1
            seq.spec_token_ids = []
            req = self.requests[seq.request_id]
            req.spec_proposed += k
            req.spec_accepted += a
            for tok in toks:
                self._record_token(seq, st, tok, now, None)
                if seq.is_finished:
                    break
            if seq.is_finished:
                self.spec.release(seq)
                continue
            # K/V are valid for every token but the last appended one (it is fed back next step).
            valid = seq.num_tokens - 1
            seq.num_computed_tokens = valid
            self.kv.trim(seq, valid)
            self.spec.rollback(seq, valid)

    def _fork(self, req: Request, parent: Sequence) -> list[Sequence]:
        """n > 1: once the prompt is computed, the other samples share its blocks (copy-on-write)."""
        children = []
        for i in range(1, parent.params.n):
            child = Sequence(parent.request_id, parent.prompt_token_ids, parent.params, index=i,
                             priority=parent.priority, arrival_time=parent.arrival_time,
                             num_computed_tokens=parent.num_computed_tokens)
            self.kv.fork(parent, child)
            self.scheduler.add_running(child)
            req.states.append(self._state(child))
            children.append(child)
        return children

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        params = [s.params for s in seqs]
        batch = SamplingBatch.from_params(
            params, [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs], self.vocab_size,
            logits.device, [s.index * 1_000_003 + s.num_generated for s in seqs])
        if any(p.min_tokens for p in params):
            banned = [self._banned(s) for s in seqs]
            batch.banned_token_ids = banned if any(banned) else None
        return self.sampler(logits, batch)

    def _apply_samples(self, res: SamplerOutput, seqs: list[Sequence]) -> None:
        tokens = res.token_ids.tolist()
        lps = res.logprobs.tolist() if res.logprobs is not None else None
        top_ids = res.top_token_ids.tolist() if res.top_token_ids is not None else None
        top_lps = res.top_logprobs.tolist() if res.top_logprobs is not None else None
        now = time.monotonic()
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            seq.num_pending -= 1
            if seq.is_finished:  # finished or aborted while this step was in flight: the token is void
                continue
            lp = None
            if seq.params.logprobs is not None and lps is not None:
                k = seq.params.logprobs
                top = list(zip(top_ids[i][:k], top_lps[i][:k])) if top_ids is not None and k else []
                lp = TokenLogprob(tok, lps[i], top)
            self._record_token(seq, self._seq_state(seq), tok, now, lp)

    def _record_token(self, seq: Sequence, st: SeqState, tok: int, now: float, lp: TokenLogprob | None) -> None:
        """Append one token: timing metrics, logprobs, stop conditions."""
        req = self.requests[seq.request_id]
        seq.append_token(tok)
        self.metrics.generation_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
            self.metrics.ttft.observe(now - req.metrics.arrival_time)
        elif st.last_token_time is not None:
            self.metrics.inter_token.observe(now - st.last_token_time)
        st.last_token_time = now
        if lp is not None:
            st.logprobs.append(lp)
            st.cumulative_logprob += lp.logprob
        self._check_stop(seq, st, tok)

    def _banned(self, seq: Sequence) -> list[int]:
        """min_tokens: EOS and stop tokens are not allowed before it is reached."""
        p = seq.params
        if seq.num_generated >= p.min_tokens:
            return []
        return sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))

    def _seq_state(self, seq: Sequence) -> SeqState:
        states = self.requests[seq.request_id].states
        if len(states) == 1:  # n == 1
            return states[0]
        for st in states:
            if st.seq is seq:
                return st
        raise KeyError(seq.seq_id)

    def _check_stop(self, seq: Sequence, st: SeqState, tok: int) -> None:
        p = seq.params
        if not p.ignore_eos and tok in self.eos_token_ids:
            self._finish(seq, SequenceStatus.FINISHED_STOPPED, None)
            return
        if tok in p.stop_token_ids:
            self._finish(seq, SequenceStatus.FINISHED_STOPPED, tok)
            return
        if st.detok is not None:
            st.detok.add(tok)
            if st.detok.stopped_by is not None:
                self._finish(seq, SequenceStatus.FINISHED_STOPPED, st.detok.stopped_by)
                return
        if seq.num_output_tokens >= (p.max_tokens or 0) or seq.num_known_tokens >= self.max_seq_len:
            self._finish(seq, SequenceStatus.FINISHED_LENGTH, None)

    def _finish(self, seq: Sequence, status: SequenceStatus, reason) -> None:
        seq.status = status
        seq.stop_reason = reason
        self.scheduler.remove(seq)
        if self.spec is not None:
            self.spec.release(seq)

    def _count_finish(self, reason: str) -> None:
        self.metrics.requests_finished[reason] = self.metrics.requests_finished.get(reason, 0) + 1

    def _collect_outputs(self, sampled: list[Sequence]) -> list[RequestOutput]:
        touched: dict[str, Request] = {}
        for seq in sampled:
            req = self.requests.get(seq.request_id)
            if req is not None:
                touched[seq.request_id] = req
        results = []
        now = time.monotonic()
        for rid, req in touched.items():
            deltas = []
            for st in req.states:
                seq = st.seq
                new_tokens = seq.output_token_ids[st.emitted_tokens:]
                finished = seq.is_finished
                if not new_tokens and not (finished and not st.finish_reported):
                    continue
                text = st.detok.take_delta(finished) if st.detok else ""
                lps = st.logprobs[st.emitted_logprobs:] if seq.params.logprobs is not None else None
                st.emitted_tokens = seq.num_output_tokens
                st.emitted_logprobs = len(st.logprobs)
                if finished:
                    st.finish_reported = True
                deltas.append(CompletionOutput(seq.index, text, new_tokens,
                                               st.cumulative_logprob if lps is not None else None, lps,
                                               seq.status.value if finished else None, seq.stop_reason))
            req_finished = req.finished
            if req_finished:
                req.metrics.finished_time = now
                self.metrics.e2e.observe(now - req.metrics.arrival_time)
                self._count_finish(req.states[0].seq.status.value)
                self._drop(rid)
            results.append(RequestOutput(rid, req.prompt, req.prompt_token_ids, deltas, req_finished, req.metrics,
                                         delta=True))
        self._update_gauges()
        return results

    def _update_gauges(self) -> None:
        m = self.metrics
        m.num_waiting, m.num_running = self.scheduler.num_waiting, self.scheduler.num_running
        m.kv_usage = self.kv.usage
        m.prefix_queries, m.prefix_hits = self.kv.stats.prefix_queries, self.kv.stats.prefix_hits
