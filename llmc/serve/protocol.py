"""Request and response bodies of the OpenAI API, as the official ``openai`` client sends and reads them.

Requests accept unknown fields (clients send extras such as ``user``). Value ranges are checked by
``SamplingParams`` so the CLI, the Python API and the server share one set of rules and messages; the
bounds here only keep values the engine cannot hold (ints beyond int64, ``n`` in the millions) out of it,
because a bad value that reaches an engine step would fail every request in that batch.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from llmc.errors import RequestError
from llmc.runtime.sampling_params import SamplingParams

I32 = 2 ** 31 - 1
MAX_N = 128  # OpenAI's own limit
TokenId = Annotated[int, Field(ge=0, le=I32)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, le=I32)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = Field(None, ge=-1, le=I32)
    min_p: Optional[float] = None
    n: int = Field(1, le=MAX_N)
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[TokenId]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, le=I32)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    num_speculative_tokens: Optional[int] = None
    priority: int = Field(0, ge=-I32, le=I32)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            min_p=self.min_p or 0.0, seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            num_speculative_tokens=self.num_speculative_tokens)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, le=I32)
    echo: bool = False
    suffix: Optional[str] = None

    def prompts(self) -> list[tuple[str | None, list[int] | None]]:
        """(text, token ids) per prompt: a string, a list of strings, token ids, or lists of token ids."""
        if self.suffix:
            raise RequestError("suffix is not supported", "suffix")
        p = self.prompt
        if isinstance(p, str):
            return [(p, None)]
        if not p:
            raise RequestError("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [(None, list(p))]
        if all(isinstance(x, str) for x in p):
            return [(x, None) for x in p]
        if all(isinstance(x, list) for x in p):
            return [(None, list(x)) for x in p]
        raise RequestError("prompt must be a string, a list of strings, a list of token ids, or a list of lists "
                           "of token ids", "prompt")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = Field(None, le=I32)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class TokenizeRequest(BaseModel):
    """Either ``prompt`` (encoded as a completion prompt) or ``messages`` (through the chat template)."""
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None


class DetokenizeRequest(BaseModel):
    model: Optional[str] = None
    tokens: list[TokenId]


# ---------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


FinishReason = Optional[Literal["stop", "length", "abort"]]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprobEntry]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "llmc"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorBody
