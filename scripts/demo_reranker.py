"""Build the demo's second model: a cross-encoder made of the bundled all-MiniLM-L6-v2 encoder
and a new one-output classification head (seeded, untrained).

Its scores mean nothing: it exists so that ``make demo`` serves an embedder and a reranker of
real size side by side with nothing downloaded. Serve a trained cross-encoder (for example
cross-encoder/ms-marco-MiniLM-L-6-v2, downloaded on a connected host) the same way:
``models.reranker.source=<its directory>``.

Usage: python scripts/demo_reranker.py OUTPUT_DIR (does nothing when OUTPUT_DIR has a model).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(output: Path) -> int:
    if (output / "config.json").is_file():
        print(f"demo reranker: {output} (already built)")
        return 0
    import torch
    import transformers
    from transformers import AutoTokenizer, BertForSequenceClassification

    from neuronserve.models import resolve_source

    encoder = resolve_source("bundled:all-MiniLM-L6-v2")
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()  # the new head is expected: no warning about it
    model = BertForSequenceClassification.from_pretrained(encoder, num_labels=1)
    staging = output.with_name(output.name + ".partial")
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(staging)
    staging.rename(output)
    print(f"demo reranker: built {output} (MiniLM encoder, untrained head: scores are not meaningful)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
