"""Request and response bodies. Validation errors name the field; limits come from settings."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# A text with at least one character that is not whitespace (a blank input has no meaning).
Text = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]


class QAInput(BaseModel):
    """One question about one context (question-answering models)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    question: Text
    context: Text


class PredictParameters(BaseModel):
    """Options for ``POST /predict``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # no 0 for false
    truncate: bool = Field(
        False, description="Cut inputs longer than the largest compiled sequence length instead of a 422."
    )
    normalize: bool | None = Field(
        None, description="feature-extraction: L2-normalise embeddings (default: the model's own config)."
    )
    top_k: int | None = Field(
        None, ge=1, description="text-classification: labels to return, best first (default 1)."
    )
    timeout_ms: int | None = Field(
        None, ge=1, description="Deadline for this request, up to serve.max_request_timeout_ms."
    )


class PredictRequest(BaseModel):
    """``POST /predict``: one input or a list; strings, or question/context pairs for QA models."""

    model_config = ConfigDict(extra="forbid", strict=True)
    inputs: (
        Text
        | QAInput
        | Annotated[list[Text], Field(min_length=1)]
        | Annotated[list[QAInput], Field(min_length=1)]
    )
    parameters: PredictParameters = PredictParameters()


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings``: the OpenAI embeddings request."""

    model_config = ConfigDict(extra="forbid", strict=True)
    input: Text | Annotated[list[Text], Field(min_length=1)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's dimension if given.")
    user: str | None = None


class ErrorBody(BaseModel):
    """Every error answer."""

    error: str
    type: str
    field: str | None = None


class PredictResponse(BaseModel):
    """``POST /predict`` answer: one output per input, in order."""

    model: str
    outputs: list[Any]


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
