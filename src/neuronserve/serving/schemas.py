"""Request and response bodies. Validation errors name the field; limits come from settings."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

# A text with at least one character that is not whitespace (a blank input has no meaning).
Text = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]


class QAInput(BaseModel):
    """One question about one context (question-answering models)."""

    model_config = ConfigDict(extra="forbid")
    question: Text
    context: Text


class PredictParameters(BaseModel):
    """Options for ``POST /predict``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Strict booleans: no 0 or "yes" for false/true. Integers stay lax: JSON Schema counts 5.0
    # as an integer, so pydantic must too.
    truncate: StrictBool = Field(
        False, description="Cut inputs longer than the largest compiled sequence length instead of a 422."
    )
    normalize: StrictBool | None = Field(
        None, description="feature-extraction: L2-normalise embeddings (default: the model's own config)."
    )
    top_k: int | None = Field(
        None, ge=1, description="text-classification: labels to return, best first (default 1)."
    )
    timeout_ms: int | None = Field(
        None, ge=1, description="Deadline for this request, up to serve.max_request_timeout_ms."
    )
    prompt_name: str | None = Field(
        None,
        description="feature-extraction: the model's sentence-transformers prompt to put before each "
        "text (default: serve.default_prompt_name).",
    )


class PredictRequest(BaseModel):
    """``POST /predict``: one input or a list; strings, or question/context pairs for QA models."""

    model_config = ConfigDict(extra="forbid")
    inputs: (
        Text
        | QAInput
        | Annotated[list[Text], Field(min_length=1)]
        | Annotated[list[QAInput], Field(min_length=1)]
    )
    parameters: PredictParameters = PredictParameters()
    model: str | None = Field(
        None, description="The model to run (GET /v1/models lists them); needed when several could."
    )


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings``: the OpenAI embeddings request."""

    model_config = ConfigDict(extra="forbid")
    input: Text | Annotated[list[Text], Field(min_length=1)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        None,
        ge=1,
        description="Matryoshka-style: the first N values of each embedding (re-normalised when the "
        "model normalises); above the model's size is a 422.",
    )
    user: str | None = None
    prompt_name: str | None = Field(
        None,
        description="The model's sentence-transformers prompt to put before each input (default: "
        "serve.default_prompt_name).",
    )


class RerankRequest(BaseModel):
    """``POST /rerank``: TEI's request: one query, the texts to rank against it."""

    model_config = ConfigDict(extra="forbid")
    query: Text
    texts: Annotated[list[Text], Field(min_length=1)]
    truncate: StrictBool = Field(
        False, description="Cut pairs longer than the largest compiled length (else 422)."
    )
    raw_scores: StrictBool = Field(False, description="Logits instead of sigmoid scores.")
    return_text: StrictBool = Field(False, description="Echo each text in its result.")
    model: str | None = Field(
        None, description="The model to run (GET /v1/models lists them); needed when several could."
    )


class RerankResult(BaseModel):
    """One ranked text (TEI's shape), best first."""

    index: int
    score: float
    text: str | None = None


class RerankDocument(BaseModel):
    """A document given as an object (Cohere/Jina also accept bare strings); other keys are
    ignored, as those APIs rank on ``text``."""

    model_config = ConfigDict(extra="ignore")
    text: Text


class CohereRerankRequest(BaseModel):
    """``POST /v1/rerank``: the Cohere/Jina rerank request that LangChain and LlamaIndex send.
    Fields of those APIs that do not apply here (``rank_fields``, ``max_chunks_per_doc``,
    ``max_tokens_per_doc``) are accepted and ignored; a document longer than the model takes is
    cut, as those APIs do."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    query: Text
    documents: Annotated[list[Text | RerankDocument], Field(min_length=1)]
    top_n: int | None = Field(None, ge=1, description="Return the best N (default: all).")
    return_documents: StrictBool = Field(False, description="Include each document's text.")


class CohereRerankResponse(BaseModel):
    """``POST /v1/rerank`` answer, best first."""

    model: str
    results: list[dict[str, Any]]
    usage: dict[str, int]


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: one text or a list (TEI's request)."""

    model_config = ConfigDict(extra="forbid")
    inputs: Text | Annotated[list[Text], Field(min_length=1)]
    add_special_tokens: StrictBool = Field(
        True, description="Include the model's special tokens ([CLS], [SEP])."
    )
    model: str | None = Field(
        None, description="The model to run (GET /v1/models lists them); needed when several could."
    )


class Token(BaseModel):
    """One token: its id, its text, and (unless special) its character span in the input."""

    id: int
    text: str
    special: bool
    start: int | None = Field(None, description="First character of the token in the input (None: special).")
    stop: int | None = Field(None, description="One past its last character (None: special).")


class ModelCard(BaseModel):
    """One model in ``GET /v1/models`` (OpenAI's model object)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """``GET /v1/models``: the models this server serves (OpenAI's list)."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class RepositoryIndexRequest(BaseModel):
    """``POST /v2/repository/index`` body (optional): ``ready`` lists only ready models."""

    model_config = ConfigDict(extra="forbid")
    ready: StrictBool = False


class RepositoryModel(BaseModel):
    """One entry of the v2 repository index (Triton's shape)."""

    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str


class ErrorBody(BaseModel):
    """Every error answer."""

    error: str
    type: str
    field: str | None = None


class PredictResponse(BaseModel):
    """``POST /predict`` answer: one output per input, in order."""

    model: str
    outputs: list[Any]


class Liveness(BaseModel):
    """``GET /health``."""

    status: Literal["alive"]


class V2Live(BaseModel):
    """``GET /v2/health/live``."""

    live: bool


class V2Ready(BaseModel):
    """``GET /v2/health/ready``."""

    ready: bool


class V2ModelReady(BaseModel):
    """``GET /v2/models/{model}/ready``."""

    name: str
    ready: bool


class V2InputTensor(BaseModel):
    """One v2 input tensor of text: BYTES, ``shape`` elements in ``data`` (or, with the binary
    extension, ``parameters.binary_data_size`` bytes after the JSON header)."""

    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Literal["BYTES"]
    data: list[Text] | None = None
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    """An output the client wants, optionally as binary data (``parameters.binary_data``)."""

    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    """``POST /v2/models/{model}/infer`` (Open Inference Protocol), as tritonclient sends it."""

    id: str | None = None
    inputs: Annotated[list[V2InputTensor], Field(min_length=1)]
    outputs: list[V2RequestedOutput] | None = None
    parameters: dict[str, Any] | None = None
