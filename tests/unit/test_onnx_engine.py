"""The cpu backend's ONNX Runtime engine (trace.cpu_engine=onnxruntime) and its int8 option, on
tiny random models: traced, verified against eager, served with the same answers as TorchScript."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronserve.backends.base import ArrayModel, BackendError
from neuronserve.backends.cpu import _load_onnx, export_onnx, onnx_thread_counts, set_call_threads
from neuronserve.config import ConfigError
from neuronserve.trace import TraceReport, VerificationError, served_cosine
from tests.conftest import make_settings, ready_client, trace_tiny

TEXTS = ["a", "the cat sat on the mat", "what is the capital of france? " * 4, "b c d e f g h i j k"]


def _trace(tmp_path: Path, out: str, task: str = "feature-extraction", **values: str) -> TraceReport:
    """The tiny model of ``task`` (the same weights every call) traced on cpu into ``tmp_path/out``."""
    grid = {"trace__batch_sizes": "1,4", "trace__sequence_lengths": "16,64", **values}
    report: TraceReport = trace_tiny(
        tmp_path, task, num_labels=3, trace__output_dir=str(tmp_path / out), **grid
    )
    return report


def _embeddings(tmp_path: Path, artifacts: Path) -> np.ndarray:
    settings = make_settings(tmp_path, serve__artifacts=str(artifacts), serve__cores="0")
    with ready_client(settings) as client:
        answer = client.post("/v1/embeddings", json={"input": TEXTS})
        assert answer.status_code == 200, answer.text
        single = client.post("/v1/embeddings", json={"input": TEXTS[2]})
        assert single.status_code == 200, single.text
    vectors = np.array([row["embedding"] for row in answer.json()["data"]])
    # batch invariance: a text alone gets what it gets among others
    assert np.abs(np.array(single.json()["data"][0]["embedding"]) - vectors[2]).max() < 1e-5
    return vectors


def test_onnx_artifacts_are_verified_and_serve_what_torchscript_serves(tmp_path: Path) -> None:
    torchscript = _trace(tmp_path, "ts", trace__cpu_engine="torchscript")
    onnx = _trace(tmp_path, "ort")  # the default engine
    manifest = onnx.manifest
    # one ONNX file, dynamic axes, serves every shape (and every length: TorchScript's, every
    # multiple of 8 tokens)
    assert manifest.artifact_files == ("model-b4-s64.onnx",)
    assert (manifest.trim_step, torchscript.manifest.trim_step) == (1, 8)
    assert manifest.compiler_args == "engine=onnxruntime attention=fused"
    assert "onnxruntime" in manifest.versions
    for entry in manifest.shapes:
        assert entry.verification["max_abs_diff"] < 1e-4
        assert entry.verification["min_cosine"] > 0.9999
    # its attention runs as ONNX Runtime's fused operator, one per layer (the file verified above)
    assert _ops(onnx.directory / "model-b4-s64.onnx").count("Attention") == 2
    got, expected = _embeddings(tmp_path, onnx.directory), _embeddings(tmp_path, torchscript.directory)
    cosine = (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.9999


def test_int8_is_verified_by_its_own_floor_and_refused_below_it(tmp_path: Path) -> None:
    quantized = {"trace__cpu_engine": "onnxruntime", "trace__cpu_quantize": "int8"}
    report = _trace(tmp_path, "int8", "text-classification", **quantized, trace__quantized_min_cosine="0.9")
    assert "quantize=int8" in report.manifest.compiler_args
    for entry in report.manifest.shapes:
        assert 0.9 <= entry.verification["min_cosine"] < 1.0  # int8 moves the logits a little
    # fp32 ONNX of the same model is a separate artifact (its own cache key), exact again
    fp32 = _trace(tmp_path, "int8", "text-classification", trace__cpu_engine="onnxruntime")
    assert fp32.compiled and fp32.manifest.shapes[0].verification["min_cosine"] > 0.9999
    with pytest.raises(VerificationError, match=r"trace\.quantized_min_cosine"):
        _trace(
            tmp_path,
            "strict",
            "text-classification",
            **quantized,
            trace__quantized_min_cosine="1.0",
        )
    assert not list((tmp_path / "strict").rglob("*.onnx"))  # nothing unverified is left to serve


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"trace__cpu_engine": "torchscript", "trace__cpu_quantize": "int8"},
            "needs trace.cpu_engine=onnxruntime",
        ),
        ({"trace__cpu_auto_cast": "bf16"}, "trace.cpu_auto_cast=none"),
        ({"trace__cpu_engine": "tensorrt"}, "trace.cpu_engine"),
    ],
)
def test_engine_settings_that_do_not_go_together_are_refused(
    tmp_path: Path, values: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_settings(tmp_path, **values)


def test_an_onnx_artifact_without_onnxruntime_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(BackendError, match=r"pip install 'neuronserve\[serve\]'"):
        _load_onnx(tmp_path / "model-b1-s16.onnx", threads=(1,))


class _IgnoresTokenTypes(torch.nn.Module):
    """A model whose graph never reads token_type_ids (a model without token types)."""

    input_names = ("input_ids", "attention_mask", "token_type_ids")
    output_names = ("last_hidden_state",)

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 4)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, _types: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.embed(ids) * mask.unsqueeze(-1),)


@pytest.mark.parametrize("int8", [False, True])
def test_an_input_the_graph_never_reads_is_still_fed_in_order(tmp_path: Path, int8: bool) -> None:
    module = _IgnoresTokenTypes()
    ids = torch.randint(1, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 5:] = 0
    dest = tmp_path / "model-b2-s8.onnx"
    export_onnx(module, (ids, mask, torch.zeros_like(ids)), dest, int8=int8)
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]  # no temporary file left
    model = _load_onnx(dest, threads=(1,))
    longer = torch.randint(1, 50, (3, 16))  # dynamic axes: any batch and length
    got = model.run((longer, torch.ones_like(longer), torch.zeros_like(longer)))[0]
    expected = module(longer, torch.ones_like(longer), torch.zeros_like(longer))[0]
    assert got.shape == (3, 16, 4)
    assert torch.allclose(got, expected, atol=0.05 if int8 else 1e-6)
    # serving runs it on numpy arrays, without a tensor on either side: the same answer
    assert isinstance(model, ArrayModel)
    (arrays,) = model.run_arrays((longer.numpy(), np.ones((3, 16), np.int64), np.zeros((3, 16), np.int64)))
    assert isinstance(arrays, np.ndarray) and np.array_equal(arrays, got.numpy())


def test_int8_is_judged_on_embeddings_pooled_as_the_model_pools() -> None:
    """A traced output whose first token is off but whose mean is right fails a CLS-pooled
    model's check and passes a mean-pooled one's; padding never counts."""
    eager = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, 4:] = 0
    traced = eager.clone()
    traced[:, 0] = -eager[:, 0]  # the CLS token flipped ...
    traced[:, 1] += 2 * eager[:, 0]  # ... and made up for in the mean
    traced[1, 4:] = 100.0  # padding: nobody's answer
    assert served_cosine((traced,), (eager,), mask, "mean") > 0.9999
    assert served_cosine((traced,), (eager,), mask, "cls") < 0


def test_a_failed_int8_export_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuronserve.backends import cpu

    def half_written(_fp32: Path, dest: Path) -> None:
        dest.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cpu, "_quantize", half_written)
    ids = torch.randint(1, 50, (2, 8))
    with pytest.raises(OSError, match="disk full"):
        export_onnx(
            _IgnoresTokenTypes(),
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            tmp_path / "m.onnx",
            int8=True,
        )
    assert not list(tmp_path.iterdir())  # neither the artifact nor the fp32 export


def test_onnx_runtime_errors_surface_as_runtime_errors(tmp_path: Path) -> None:
    """The tracer's fallbacks catch RuntimeError (as torch raises), not every Exception."""
    ids = torch.randint(1, 50, (2, 8))
    dest = tmp_path / "m.onnx"
    export_onnx(_IgnoresTokenTypes(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), dest, int8=False)
    model = _load_onnx(dest, threads=(1,))
    with pytest.raises(RuntimeError, match="ONNX Runtime"):
        model.run((ids.to(torch.float32), torch.ones_like(ids), torch.zeros_like(ids)))  # wrong dtype
    with pytest.raises(RuntimeError, match="ONNX Runtime"):
        model.run((ids, torch.ones_like(ids)))  # an input missing


def test_each_call_runs_on_the_session_of_the_threads_its_copy_was_given(tmp_path: Path) -> None:
    """Sessions of one and of two threads: a copy given two threads runs on the two-thread one
    (and one given three, too: the most it can use), a copy never given any on the one-thread
    one; both answer alike."""
    ids = torch.randint(1, 50, (2, 8))
    inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    dest = tmp_path / "model.onnx"
    export_onnx(_IgnoresTokenTypes(), inputs, dest, int8=False)
    model = _load_onnx(dest, threads=(1, 2))
    seen: dict[int, tuple[int, int, torch.Tensor]] = {}

    def call(threads: int) -> None:
        if threads:
            set_call_threads(threads)
        session = model._sessions[model.session_threads()]
        configured = session.get_session_options().intra_op_num_threads  # type: ignore[attr-defined]
        seen[threads] = (model.session_threads(), configured, model.run(inputs)[0])

    for threads in (0, 1, 2, 3):
        copy = threading.Thread(target=call, args=(threads,))  # a thread of its own, as a copy
        copy.start()
        copy.join()
    assert {t: seen[t][:2] for t in seen} == {0: (1, 1), 1: (1, 1), 2: (2, 2), 3: (2, 2)}
    assert torch.allclose(seen[1][2], seen[2][2], atol=1e-5)


def test_sessions_are_made_for_one_thread_a_copys_share_and_every_cpu() -> None:
    assert onnx_thread_counts(1, 1) == (1,)  # one CPU: one session
    assert onnx_thread_counts(2, 2) == (1, 2)  # the default, a copy per CPU: two
    assert onnx_thread_counts(8, 1) == (1, 8)
    assert onnx_thread_counts(8, 2) == (1, 4, 8)  # fewer copies than CPUs: their share, too


class _Wide(torch.nn.Module):
    """Matrix products large enough for ONNX Runtime to split across its pool's threads."""

    input_names = ("input_ids", "attention_mask", "token_type_ids")
    output_names = ("last_hidden_state",)

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 256)
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(4)))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, _types: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.layers(self.embed(ids)) * mask.unsqueeze(-1),)


def test_a_pool_stops_spinning_when_its_call_returns(tmp_path: Path) -> None:
    """A session of two threads spins between the steps of a call, never after it: the cores it
    ran on are lent on to the next call, often another server's. (ONNX Runtime's pool otherwise
    spins on through the whole gap between calls.)"""
    import time

    ids = torch.randint(1, 50, (8, 64))
    inputs = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    dest = tmp_path / "model.onnx"
    export_onnx(_Wide(), inputs, dest, int8=False)
    session = _load_onnx(dest, threads=(1, 2))._sessions[2]
    feed = {name: tensor.numpy() for name, tensor in zip(_Wide.input_names, inputs, strict=True)}
    session.run(None, feed)  # type: ignore[attr-defined]
    idle = []
    for _ in range(5):
        session.run(None, feed)  # type: ignore[attr-defined]
        started = time.process_time()  # every thread of this process
        time.sleep(0.1)  # the gap measured, not a wait for anything
        idle.append(time.process_time() - started)
    assert sorted(idle)[2] < 0.02, f"CPU seconds used during 0.1 s gaps between calls: {idle}"


def _ops(path: Path) -> list[str]:
    import onnx

    return [node.op_type for node in onnx.load(str(path)).graph.node]


def test_a_fused_graph_that_answers_otherwise_is_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused graph replaces the export only when it answers alike on a padded sample;
    otherwise the export stays as it was, and nothing is left beside it."""
    from neuronserve.backends import cpu

    def differs(*_args: object) -> None:
        raise ValueError("an output differs by up to 1.00e+00")

    monkeypatch.setattr(cpu, "_check_alike", differs)
    report = _trace(tmp_path, "kept")
    (file,) = report.manifest.artifact_files
    assert "Attention" not in _ops(report.directory / file)
    assert sorted(p.name for p in report.directory.glob("*.onnx*")) == [file]


def test_an_optimizer_that_fails_leaves_the_export_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime's optimizer raising (a graph it does not know) is not the trace's failure:
    the export is kept unfused, verified as any artifact, the reason logged, nothing left beside."""
    from onnxruntime.transformers import optimizer

    def fails(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("unsupported graph")

    monkeypatch.setattr(optimizer, "optimize_model", fails)
    with caplog.at_level("INFO", logger="neuronserve.backends.cpu"):
        report = _trace(tmp_path, "unfused")
    (file,) = report.manifest.artifact_files
    assert "Attention" not in _ops(report.directory / file)
    assert sorted(p.name for p in report.directory.glob("*.onnx*")) == [file]
    assert any("unsupported graph" in r.getMessage() for r in caplog.records)
