"""Tokenization for serving: the artifacts' ``tokenizer.json`` through the Rust tokenizers library.

Many ``tokenizer.json`` files carry their own truncation and padding (all-MiniLM-L6-v2 truncates
at 128 and pads to 128). Serving turns both off: padding belongs to the batcher (to a compiled
shape), and truncation happens only when a request asks for it. Anything longer than the
largest compiled sequence length is otherwise refused, never silently cut.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from neuronserve.serving.errors import validation

# How a route's caller asks for truncation, unless the route says otherwise (InferRequest).
DEFAULT_HINT = 'send "parameters": {"truncate": true} to cut it to {n} tokens, or shorten it'
# Characters per token assumed when looking for a long text's first tokens (English averages
# ~4; starting at 8 means one look almost always suffices).
CHARS_PER_TOKEN_GUESS = 8


@dataclass(slots=True)
class Encoded:
    """One tokenized input: token ids, segment ids and (for QA) context character offsets.

    Built once per input on the event loop and never changed (slots, not frozen: a frozen
    dataclass pays a setattr per field, measurable at tens of inputs per request)."""

    ids: np.ndarray  # int64, unpadded
    type_ids: np.ndarray | None = None  # int64, unpadded; None when all zero (single texts)
    offsets: list[tuple[int, int]] | None = None
    sequence_ids: list[int | None] | None = None
    truncated: bool = False  # cut to the largest compiled length (on request or serve.auto_truncate)
    length: int = field(init=False)

    def __post_init__(self) -> None:
        self.length = len(self.ids)


class TokenizerMissingError(FileNotFoundError):
    """The artifact directory has no tokenizer.json."""


def load_plain_tokenizer(directory: Path) -> Tokenizer:
    """``directory/tokenizer.json`` with the file's own truncation and padding turned off."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise TokenizerMissingError(f"{directory}: no tokenizer.json; re-run `neuronserve trace --force`")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class TextEncoder:
    """Tokenizes single texts or (question, context) pairs against a maximum length."""

    def __init__(self, directory: Path, max_length: int) -> None:
        # The Rust tokenizer's own thread pool spins on the cores the model copies need; serving
        # tokenizes small requests, one at a time, where that pool only costs (measured: -15%).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.max_length = max_length
        self._plain = load_plain_tokenizer(directory)
        self._truncating = load_plain_tokenizer(directory)
        self._truncating.enable_truncation(max_length)
        self._truncating_pairs = load_plain_tokenizer(directory)
        # Pairs keep the whole question and cut the context, as QA pipelines do.
        self._truncating_pairs.enable_truncation(max_length, strategy="only_second")

    def encode(
        self, texts: list[str], *, truncate: bool, field: str = "inputs", hint: str = ""
    ) -> list[Encoded]:
        """``hint``: how the caller's route asks for truncation, for the refusal of a long input."""
        tokenizer = self._truncating if truncate else self._plain
        bounded = [self.bounded(text) for text in texts]
        if len(bounded) == 1:
            # One text keeps the GIL: the batch calls release it, and taking it back from a copy
            # thread costs a single short text more than the whole tokenization (measured: 285
            # vs 322-366 us of CPU per request at saturation).
            encodings = [tokenizer.encode(bounded[0])]
        else:
            # Single texts need no character offsets (only question answering reads them), and
            # skipping them halves the tokenizer's time on short texts (measured).
            # (encode_batch_fast is tokenizers >= 0.20.1; older ones compute offsets anyway.)
            encodings = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)(bounded)
        return [
            self._check(enc, i, field, truncate, cut=len(bounded[i]) < len(texts[i]), hint=hint)
            for i, enc in enumerate(encodings)
        ]

    def tokens(self, texts: list[str], *, add_special_tokens: bool) -> list[list[dict[str, Any]]]:
        """Each text's tokens as TEI's ``/tokenize`` gives them: id, text, special, and the
        character span ``[start, stop)`` of the input it came from (None for special tokens).
        No length limit applies: this only tokenizes (the body size limit bounds the work)."""
        out = []
        for text, enc in zip(
            texts, self._plain.encode_batch(texts, add_special_tokens=add_special_tokens), strict=True
        ):
            tokens = []
            for token_id, token, (start, stop), special in zip(
                enc.ids, enc.tokens, enc.offsets, enc.special_tokens_mask, strict=True
            ):
                if special:
                    tokens.append(
                        {"id": token_id, "text": token, "special": True, "start": None, "stop": None}
                    )
                else:
                    tokens.append(
                        {
                            "id": token_id,
                            "text": text[start:stop],
                            "special": False,
                            "start": start,
                            "stop": stop,
                        }
                    )
            out.append(tokens)
        return out

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to this, exclusive (added tokens included)."""
        return int(self._plain.get_vocab_size(with_added_tokens=True))

    def decode(self, ids: list[list[int]], *, skip_special_tokens: bool) -> list[str]:
        """Each id list as text (TEI's ``/decode``); an id outside the vocabulary is a 422."""
        size = self.vocab_size
        for i, row in enumerate(ids):
            for j, token_id in enumerate(row):
                if not 0 <= token_id < size:
                    raise validation(
                        f"ids[{i}][{j}]", f"{token_id} is not a token id of this model (0 to {size - 1})"
                    )
        return list(self._plain.decode_batch(ids, skip_special_tokens=skip_special_tokens))

    def bounded(self, text: str) -> str:
        """A prefix of ``text`` whose tokens begin like the whole text's and already number more
        than ``max_length``; ``text`` itself when it is short.

        Only the first ``max_length`` tokens can ever be served (the rest is cut on request or
        refused), so a 1 MB text costs what its first few KB cost. The prefix ends at whitespace,
        so its last word is whole and tokenizes as in the full text.
        """
        limit = self.max_length * CHARS_PER_TOKEN_GUESS
        while len(text) > limit:
            cut = text.rfind(" ", 0, limit)
            prefix = text[: cut if cut > 0 else limit]
            if len(self._plain.encode(prefix, add_special_tokens=False).ids) > self.max_length:
                return prefix
            limit *= 4  # long words, or many characters per token: look further
        return text

    def encode_pairs(
        self, pairs: list[tuple[str, str]], *, truncate: bool, field: str = "inputs", hint: str = ""
    ) -> list[Encoded]:
        tokenizer = self._truncating_pairs if truncate else self._plain
        try:
            encodings = tokenizer.encode_batch(pairs)
        except Exception as exc:  # only_second cannot fit when the question alone is too long
            raise validation(
                field,
                f"the first text of a pair (the question or query) is longer than the largest compiled "
                f"sequence length {self.max_length}",
            ) from exc
        return [self._check(enc, i, field, truncate, pair=True, hint=hint) for i, enc in enumerate(encodings)]

    def _check(
        self,
        enc: Encoding,
        index: int,
        field: str,
        truncate: bool,
        *,
        pair: bool = False,
        cut: bool = False,
        hint: str = "",
    ) -> Encoded:
        ids = enc.ids
        length = len(ids)
        if length > self.max_length:
            advice = "" if truncate else "; " + (hint or DEFAULT_HINT).replace("{n}", str(self.max_length))
            count = f"more than {length}" if cut else f"{length}"
            raise validation(
                f"{field}[{index}]",
                f"{count} tokens exceed the largest compiled sequence length {self.max_length}{advice}",
            )
        types = enc.type_ids
        return Encoded(
            ids=np.asarray(ids, dtype=np.int64),
            type_ids=np.asarray(types, dtype=np.int64) if pair or any(types) else None,
            offsets=list(enc.offsets) if pair else None,
            sequence_ids=list(enc.sequence_ids) if pair else None,
            truncated=truncate and (cut or bool(enc.overflowing)),
        )
