"""Request bodies of the HTTP APIs (pydantic), the error envelope, and the small response pieces.

Types are checked strictly (a string where a number belongs is a 422 naming the field, as DeepSeek's
"Invalid Parameters"); unknown fields are accepted and ignored, since clients send OpenAI fields DeepSeek
does not document (`user`, `metadata`, `store`, ...). Responses are plain dicts built by the routes: their
exact keys (which are null, which are absent) follow DeepSeek's and OpenAI's wire formats.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Strict scalars: no "0.7" for 0.7, no true for 1; NaN and infinities are refused by name.
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Int = Annotated[int, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]


# Sampling parameters, bounded so that no value can overflow the sampler's arithmetic (a temperature of 1e-300
# or a repetition penalty of 1e-300 make logits infinite; a seed must fit torch's 64-bit generator; a top_k of
# 10**30 does not fit a tensor index). a temperature below ModelService.TEMPERATURE_FLOOR
# is greedy.
Temperature = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=2)]
TopP = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1)]
TopK = Annotated[int, Field(strict=True, ge=-1, le=2**31 - 1)]  # clipped to the vocabulary by the route
MinP = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)]
Penalty = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-2, le=2)]
RepetitionPenalty = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.01, le=100)]
Seed = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
MAX_LOGIT_BIAS = 1024  # entries per request: each is applied to every row of every step


class APIError(Exception):
    """Raised anywhere in a route: becomes {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or {}
        self.type = type or {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
                             429: "rate_limit_error", 503: "overloaded_error"}.get(
                                 status, "server_error" if status >= 500 else "invalid_request_error")
        self.code = code or {400: "invalid_request_error", 401: "invalid_api_key", 404: "not_found",
                             413: "request_too_large", 422: "invalid_parameters",
                                 429: "rate_limit_exceeded", 503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- chat ------------------------------------------------------------------------------------------------


class ContentPart(_Body):
    type: Str
    text: Str | None = None


class FunctionCall(_Body):
    name: Str
    arguments: Str | dict = ""


class ToolCall(_Body):
    id: Str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Str | list[ContentPart] | None = None
    name: Str | None = None
    prefix: Bool = False  # DeepSeek chat prefix completion: continue this (last, assistant) message
    reasoning_content: Str | None = None
    reasoning: Str | None = None  # vLLM's newer name, accepted as an alias
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Str | None = None


class FunctionDef(_Body):
    name: Str
    description: Str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool = False


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Body):
    class Name(_Body):
        name: Str

    type: Literal["function"] = "function"
    function: Name


class JsonSchema(_Body):
    name: Str = "response"
    description: Str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: Bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StreamOptions(_Body):
    include_usage: Bool = False


class Thinking(_Body):
    type: Literal["enabled", "disabled", "auto"]


class SamplingFields(_Body):
    """What chat and completions share."""

    model: Str
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop: Str | Annotated[list[Str], Field(max_length=16)] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(max_length=64)] | None = None
    ignore_eos: Bool = False
    skip_special_tokens: Bool = True
    n: Annotated[int, Field(strict=True, ge=1, le=16)] = 1
    seed: Seed | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: Str | None = None
    cache_salt: Annotated[str, Field(strict=True, min_length=1, max_length=256)] | None = None  # vLLM's field
    # DeepSeek's end-user id; accepted (and checked as DeepSeek checks it) but not used for cache isolation
    user_id: Annotated[str, Field(strict=True, pattern=r"^[a-zA-Z0-9_-]+$", max_length=512)] | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v):
        if v is not None and any(not s for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("stop strings must be non-empty")
        return v


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    thinking: Thinking | None = None
    # DeepSeek-V4's low/high/max (medium is high, xhigh max) and OpenAI's other names; V4 renders max (its effort
    # preamble), other models' templates get it as the `reasoning_effort` variable
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Bool = True
    logprobs: Bool = False
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    continue_final_message: Bool = False  # vLLM's name for DeepSeek's `prefix`


class CompletionRequest(SamplingFields):
    prompt: Str | list[Str] | list[Int] | list[list[Int]]
    suffix: Str | None = None
    echo: Bool = False
    logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    best_of: Annotated[int, Field(strict=True, ge=1)] | None = None


# ---- ops -------------------------------------------------------------------------------------------------


class TokenizeRequest(_Body):
    model: Str | None = None
    prompt: Str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool = True
    add_generation_prompt: Bool = True
    return_token_strs: Bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None


class DetokenizeRequest(_Body):
    model: Str | None = None
    tokens: list[Int]


# ---- Ollama ----------------------------------------------------------------------------------------------


class OllamaFunctionCall(_Body):
    name: Str
    arguments: dict[str, Any] | Str | None = None


class OllamaToolCall(_Body):
    id: Str | None = None
    function: OllamaFunctionCall


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: Str = ""
    thinking: Str | None = None
    images: list[Str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: Str | None = None
    tool_call_id: Str | None = None


class OllamaOptions(_Body):
    """The runtime options Ollama documents that change sampling; others (num_ctx, num_gpu, ...) are accepted
    and ignored. Checked like the OpenAI fields, so a bad value is a 422 naming `options.<name>`."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    seed: Seed | None = None
    num_predict: Int | None = None  # -1 (or any value < 1): until the context is full
    repeat_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: Str | list[Str] | None = None


class OllamaRequest(_Body):
    model: Str
    stream: Bool = True
    format: Str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    think: Bool | Str | None = None
    keep_alive: Str | Int | Float | None = None


class OllamaChatRequest(OllamaRequest):
    messages: list[OllamaMessage] = []
    tools: list[Tool] | None = None


class OllamaGenerateRequest(OllamaRequest):
    prompt: Str = ""
    suffix: Str | None = None
    system: Str | None = None
    template: Str | None = None
    raw: Bool = False
    images: list[Str] | None = None
    context: list[Int] | None = None


class OllamaShowRequest(_Body):
    model: Str | None = None
    name: Str | None = None  # older clients
    verbose: Bool = False


# ---- responses ---------------------------------------------------------------------------------------------
# The 200 bodies, as /openapi.json documents them (the routes build plain dicts; tests check live answers against
# these). Extra keys are allowed, as clients must allow them; what is listed is always there (or null where typed so).


class _Out(BaseModel):
    """A response body (extra keys allowed)."""


class PromptTokensDetails(_Out):
    cached_tokens: int


class CompletionTokensDetails(_Out):
    reasoning_tokens: int


class Usage(_Out):
    """DeepSeek's usage (prompt_cache_hit/miss_tokens) with OpenAI's details."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_cache_hit_tokens: int
    prompt_cache_miss_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


FinishReason = Literal["stop", "length", "tool_calls", "insufficient_system_resource"]


class OutFunctionCall(_Out):
    name: str
    arguments: str  # JSON text


class OutToolCall(_Out):
    id: str
    type: Literal["function"]
    function: OutFunctionCall


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None  # present in thinking mode
    tool_calls: list[OutToolCall] | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob] | None
    reasoning_content: list[TokenLogprob] | None = None


class ChatCompletionChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class TextCompletion(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Out):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeResponse(_Out):
    prompt: str


# Anthropic's Messages API


class AnthropicText(_Out):
    type: Literal["text"]
    text: str


class AnthropicThinking(_Out):
    type: Literal["thinking"]
    thinking: str
    signature: str


class AnthropicToolUse(_Out):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class AnthropicUsage(_Out):
    input_tokens: int  # prompt tokens not read from the cache
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int


class AnthropicMessage(_Out):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[Annotated[AnthropicText | AnthropicThinking | AnthropicToolUse, Field(discriminator="type")]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: AnthropicUsage


class AnthropicTokenCount(_Out):
    input_tokens: int


# Ollama


class OllamaOutFunction(_Out):
    name: str
    arguments: dict[str, Any]  # an object, not JSON text


class OllamaOutToolCall(_Out):
    function: OllamaOutFunction


class OllamaOutMessage(_Out):
    role: Literal["assistant"]
    content: str
    thinking: str | None = None
    tool_calls: list[OllamaOutToolCall] | None = None


class _OllamaDone(_Out):
    """The last object of an answer (the whole non-streaming body); durations in nanoseconds."""

    model: str
    created_at: str
    done: bool
    done_reason: Literal["stop", "length", "load"] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaChatResponse(_OllamaDone):
    message: OllamaOutMessage


class OllamaGenerateResponse(_OllamaDone):
    response: str
    thinking: str | None = None
    context: list[int] | None = None


class OllamaModelEntry(_Out):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: dict[str, Any]


class OllamaTags(_Out):
    models: list[OllamaModelEntry]


class OllamaShowResponse(_Out):
    modelfile: str
    template: str
    details: dict[str, Any]
    model_info: dict[str, Any]
    capabilities: list[str]


class OllamaVersion(_Out):
    version: str
