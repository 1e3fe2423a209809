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


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings``: the OpenAI embeddings request."""

    model_config = ConfigDict(extra="forbid")
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
