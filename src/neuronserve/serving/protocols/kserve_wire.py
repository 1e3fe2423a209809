"""Open Inference Protocol (KServe v2) infer bodies on the wire, JSON and binary.

``tritonclient.http`` sends tensors with the binary data extension by default: the body is a
JSON header of ``Inference-Header-Content-Length`` bytes followed by raw tensor bytes, each input
saying its size in ``parameters.binary_data_size``. BYTES elements are 4-byte little-endian
lengths followed by the bytes. Outputs are binary when the request asks for it, per output
(``parameters.binary_data``) or for all (``parameters.binary_data_output``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from neuronserve.serving.errors import ServeError, validation

HEADER_LENGTH = "inference-header-content-length"
_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


@dataclass(frozen=True)
class V2Request:
    """A parsed infer request: request id, BYTES inputs by name, and which outputs go binary."""

    id: str | None
    inputs: dict[str, list[str]]
    requested: list[str] | None
    binary_outputs: set[str]


def _decode_bytes_tensor(raw: bytes, name: str) -> list[str]:
    items: list[str] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise validation(f"inputs.{name}", "truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise validation(f"inputs.{name}", "BYTES element runs past the end of its data")
        try:
            items.append(raw[pos : pos + size].decode("utf-8", errors="strict"))
        except UnicodeDecodeError:
            raise validation(f"inputs.{name}", f"BYTES element {len(items)} is not UTF-8 text") from None
        pos += size
    return items


def parse_infer(body: bytes, header_length: str | None) -> V2Request:
    """Parse a v2 infer body; every problem is a 422/400 naming the field."""
    try:
        json_size = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise ServeError(
            "invalid_request", f"{HEADER_LENGTH} must be a number", field=HEADER_LENGTH
        ) from None
    if not 0 < json_size <= len(body):
        raise ServeError(
            "invalid_request", f"{HEADER_LENGTH} {json_size} does not fit the body", field=HEADER_LENGTH
        )
    try:
        header = orjson.loads(body[:json_size])
    except orjson.JSONDecodeError as exc:
        raise validation("body", f"malformed JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise validation("inputs", "a non-empty list of input tensors is required")
    binary = body[json_size:]
    offset = 0
    inputs: dict[str, list[str]] = {}
    for index, tensor in enumerate(header["inputs"]):
        name, values, offset = _parse_input(index, tensor, binary, offset)
        if name in inputs:
            raise validation(f"inputs[{index}].name", f"input {name!r} is given twice; send each input once")
        inputs[name] = values
    outputs = header.get("outputs")
    requested: list[str] | None = None
    binary_outputs: set[str] = set()
    params = _parameters(header.get("parameters"), "parameters")
    if outputs is not None and not isinstance(outputs, list):
        raise validation("outputs", "must be a list of {name, parameters} objects")
    if isinstance(outputs, list):
        requested = []
        for i, out in enumerate(outputs):
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise validation(f"outputs[{i}]", "each requested output needs a name")
            requested.append(out["name"])
            if _parameters(out.get("parameters"), f"outputs[{i}].parameters").get("binary_data"):
                binary_outputs.add(out["name"])
    if params.get("binary_data_output"):
        binary_outputs.add("*")
    request_id = header.get("id")
    return V2Request(str(request_id) if request_id is not None else None, inputs, requested, binary_outputs)


def _parse_input(index: int, tensor: Any, binary: bytes, offset: int) -> tuple[str, list[str], int]:
    """One BYTES input tensor: its name, its strings, and the offset after its binary data."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str) or not tensor["name"]:
        raise validation(f"inputs[{index}]", "each input needs a name")
    name = tensor["name"]
    if tensor.get("datatype") != "BYTES":
        raise validation(f"inputs.{name}.datatype", "must be BYTES (text)")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise validation(f"inputs.{name}.shape", "must be a list of non-negative integers")
    params = _parameters(tensor.get("parameters"), f"inputs.{name}.parameters")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise validation(f"inputs.{name}.parameters.binary_data_size", "does not fit the body")
        values = _decode_bytes_tensor(binary[offset : offset + size], name)
        offset += size
    else:
        flat = _flatten(tensor.get("data"))
        if flat is None or not all(isinstance(v, str) for v in flat):
            raise validation(f"inputs.{name}.data", "must be a list of strings")
        values = flat
    expected = int(np.prod(shape)) if shape else 1
    if len(values) != expected:
        raise validation(f"inputs.{name}", f"shape {shape} needs {expected} elements, got {len(values)}")
    if not values:
        raise validation(f"inputs.{name}", "must hold at least one text")
    if any(not v.strip() for v in values):
        raise validation(f"inputs.{name}", "empty or blank strings are not valid inputs")
    return name, values, offset


def _parameters(value: Any, field: str) -> dict[str, Any]:
    """A ``parameters`` object (absent or null means none); anything else is a 422."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise validation(field, "must be an object")
    return value


def _flatten(data: Any) -> list[Any] | None:
    if not isinstance(data, list):
        return None
    flat: list[Any] = []
    for value in data:
        if isinstance(value, list):
            inner = _flatten(value)
            if inner is None:
                return None
            flat.extend(inner)
        else:
            flat.append(value)
    return flat


@dataclass(frozen=True)
class V2Tensor:
    """An output tensor: name, datatype and data (a numpy array, or a list of str for BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    data: Any


def _bytes_payload(values: list[str]) -> bytes:
    chunks = []
    for v in values:
        raw = v.encode("utf-8")
        chunks.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(chunks)


def encode_infer(
    model: str, request_id: str | None, tensors: list[V2Tensor], binary: set[str]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (binary outputs add the header length)."""
    header_outputs: list[dict[str, Any]] = []
    payloads: list[bytes] = []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if "*" in binary or t.name in binary:
            raw = (
                _bytes_payload(t.data)
                if t.datatype == "BYTES"
                else np.ascontiguousarray(t.data, dtype=_DTYPES[t.datatype]).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(raw)}
            payloads.append(raw)
        else:
            entry["data"] = t.data if t.datatype == "BYTES" else np.asarray(t.data).reshape(-1)
        header_outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "outputs": header_outputs}
    if request_id is not None:
        doc["id"] = request_id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not payloads:
        return header, {"content-type": "application/json"}
    return header + b"".join(payloads), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }
