"""Request and response shapes of the HTTP API (OpenAI's chat completions, plus personae's characters).

Requests ignore fields they do not know (OpenAI clients and front-ends such as SillyTavern send
many), but fields they do know are validated strictly. Every JSON answer is built through the
response model of its route (so ``/openapi.json`` describes what the server sends), except the
streamed chunks, built as plain dicts in :mod:`personae.serve.completions` (pydantic per token
would cost more than the model), and ``/stats``, whose counters are the scheduler's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from personae.config import INNER_PARAMS

MAX_SEED = 2**62  # a seed and seed + n - 1 must fit torch.Generator.manual_seed


def _valid_unicode(text: str) -> str:
    """A lone surrogate (a JSON ``\\ud800`` escape) is no character: refused here, not a 500 at the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"holds a lone surrogate U+{ord(text[error.start]):04X} at character {error.start}, "
                         "which is not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]  # request text: any valid Unicode string


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    """A text part of a message's content."""

    type: Literal["text"]
    text: Text


class ImageURL(_Lenient):
    """An image as a data: URL (remote http(s) URLs and file paths are refused)."""

    url: str
    detail: str | None = None


class ImagePart(_Lenient):
    """An image part of a message's content."""

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    """One message: system/developer, user or assistant; content is a string or a list of parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = Field(None, max_length=64)


class StreamOptions(_Lenient):
    """OpenAI's stream options: include_usage adds a last chunk with the token counts."""

    include_usage: bool = False


class SamplerFields(BaseModel):
    """Sampling options of /v1/chat/completions and /v1/completions; null or absent: the run's default."""

    # unknown fields are kept: unsupported samplers are refused by name; strict: "10" is no integer and
    # "true" no boolean (OpenAI's API says integer / number / boolean), refused rather than coerced
    model_config = ConfigDict(extra="allow", strict=True)

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="0 keeps only the most likely token")
    top_k: int | None = Field(None, ge=-1, description="0 or -1: off")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    typical_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
    max_repeats: int | None = Field(None, ge=0, description="personae's loop breaking (0: off)")
    dry_multiplier: float | None = Field(None, ge=0.0)
    dry_base: float | None = Field(None, ge=1.0)
    dry_allowed_length: int | None = Field(None, ge=1)
    dry_sequence_breakers: list[str] | str | None = Field(None, description="a list, or its JSON text")
    xtc_threshold: float | None = Field(None, ge=0.0, le=1.0)
    xtc_probability: float | None = Field(None, ge=0.0, le=1.0)


class ChatCompletionRequest(SamplerFields):
    """POST /v1/chat/completions; `character`, `top_k`, `repetition_penalty`, `ignore_eos`, `user_name` are ours."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None  # each token's logprob (after penalties, before temperature)
    top_logprobs: int | None = Field(None, ge=0, le=20)  # and this many alternatives per token
    tools: list[Any] | None = None  # a character has no tools: ignored unless tool_choice asks for one
    tool_choice: str | dict[str, Any] | None = None  # "none"/"auto": answered in text; "required" or a function: 400
    user: str | None = None  # OpenAI's end-user id: accepted, not used
    # personae extensions
    character: str | None = Field(None, description="a character id or name; wins over `model`")
    ignore_eos: bool | None = None
    user_name: Text | None = Field(None, max_length=64, description="who {{user}} is in the card")

    def texts(self) -> Iterator[str | None]:
        """Every text the request holds (what max_text_bytes counts before anything is tokenized)."""
        yield self.user_name
        yield from [self.stop] if isinstance(self.stop, str) else self.stop or []
        for message in self.messages:
            yield message.name
            if isinstance(message.content, str):
                yield message.content
            for part in message.content if isinstance(message.content, list) else []:
                if isinstance(part, TextPart):
                    yield part.text


class Usage(BaseModel):
    """Token counts; prompt_tokens includes the positions the image takes."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    """The reply of one choice."""

    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    """One alternative token: its text, logprob and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobInfo(TopLogprob):
    """A chosen token's logprob and the most likely alternatives (after penalties, before temperature)."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """OpenAI's choices[].logprobs of a chat completion."""

    content: list[TokenLogprobInfo] | None = None


class Choice(BaseModel):
    """One of the n replies."""

    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    """The non-streamed answer of /v1/chat/completions."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage
    warnings: list[str] = Field(default_factory=list, description="personae's: how the card was cut to fit")


class ModelInfo(BaseModel):
    """One entry of /v1/models: a character the run can play, and the model's context length."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "personae"
    name: str
    source: Literal["trained", "uploaded"]
    adapted: bool = Field(description="true only when the server plays the character with its adapter")
    context_length: int = Field(description="the decoder's positions: image prefix + prompt + reply (OpenRouter)")
    max_model_len: int = Field(description="the same number under vLLM's name")
    max_completion_tokens: int = Field(description="the most tokens one reply gets (max_tokens_limit)")


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelInfo]


class CharacterInfo(BaseModel):
    """One character: id, name, where it comes from, whether it has an adapter, and its card fields."""

    id: str
    object: Literal["character"] = "character"
    model: str
    name: str
    source: Literal["trained", "uploaded"]
    adapted: bool
    adapter: str | None = Field(description="'applied', 'not applied: <why>', or null without an adapter file")
    description: str
    greeting: str
    avatar_url: str
    tags: list[str]


class CharacterUploaded(CharacterInfo):
    """The answer to an upload: the character, and how its card fits the model's prompt budget."""

    prompt_tokens: int = Field(description="tokens of the card's whole prompt around an empty message, uncut")
    prompt_budget: int = Field(description="the prompt tokens a request with the default max_tokens may use")
    warnings: list[str] = Field(description="how the card will be cut to fit (lorebook, examples, description)")


class CharacterList(BaseModel):
    """GET /v1/characters."""

    object: Literal["list"] = "list"
    data: list[CharacterInfo]


class CharacterDeleted(BaseModel):
    """DELETE /v1/characters/{id}: OpenAI's deleted-object shape."""

    id: str
    object: Literal["character"] = "character"
    deleted: bool = True


class AdaptExample(_Lenient):
    """One example exchange for adaptation: the user's line, the character's reply, an optional image."""

    user: str = Field(max_length=4000)
    reply: str = Field(min_length=1, max_length=4000)
    image: str | None = Field(None, description="a data: URL")


class AdaptRequest(BaseModel):
    """POST /v1/characters/{id}/adapt: examples (default: the card's example dialogues) and options."""

    # ours, not OpenAI's: a misspelt option is a 400, not ignored; "20" is no number of steps
    model_config = ConfigDict(extra="forbid", strict=True)

    examples: list[AdaptExample] = Field(default_factory=list, description="at most max_adapt_examples")
    steps: int | None = Field(None, ge=1, description="at most max_adapt_steps")
    overwrite: bool = Field(False, description="replace the character's existing adapter (409 without)")
    inner_params: Literal[INNER_PARAMS] | None = None  # which parameters adapt (default: the run's meta.inner_params)


class AdaptJobInfo(BaseModel):
    """An adaptation job as polled: status queued|running|succeeded|failed|cancelled and progress in [0, 1]."""

    id: str
    object: Literal["adaptation.job"] = "adaptation.job"
    character: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float
    message: str
    error: str | None = None
    created: int
    finished: int | None = None


class AdaptJobCreated(AdaptJobInfo):
    """POST /v1/characters/{id}/adapt (202): the queued job and where to poll it."""

    status_url: str


class Health(BaseModel):
    """GET /health: the server is up, its version and how many characters it has."""

    status: Literal["ok"] = "ok"
    version: str
    characters: int


class ErrorDetail(BaseModel):
    """OpenAI's error body."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """{"error": {...}} as OpenAI returns it."""

    error: ErrorDetail


class AdapterLoad(BaseModel):
    """POST /v1/adapters: apply the adapter file at `path` (on the server's disk) to a character's requests."""

    model_config = ConfigDict(extra="forbid")  # ours: a misspelt field is a 400

    character: str = Field(description="a character id or name")
    path: str = Field(description="a .safetensors adapter file on the server's disk, as `personae adapt` writes")


class AdapterInfo(BaseModel):
    """One character adapter the server holds in memory."""

    character: str
    object: Literal["adapter"] = "adapter"
    resident: bool = Field(description="in memory now (false after DELETE)")
    source: str | None = Field(None, description="the file it was loaded from, when known")


class AdapterList(BaseModel):
    """GET /v1/adapters: resident adapters, least recently used first, and the cap."""

    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    max_adapters: int | None = Field(description="the cap on resident adapters (null: none)")
    evictions: int = Field(description="adapters evicted so far to keep under the cap")
