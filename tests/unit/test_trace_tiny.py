"""The tracer on tiny random models: tasks, caching, stale shapes, verification failures.

The mechanics are pinned on TorchScript artifacts (their file names, their reuse across shapes);
test_onnx_engine.py covers the default engine, ONNX Runtime, through the same tracer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from neuronserve import trace as trace_module
from neuronserve.artifacts import load_manifest
from neuronserve.backends import BackendKind
from neuronserve.backends.base import torchscript_quietly
from neuronserve.backends.cpu import CpuBackend
from neuronserve.models import ModelSourceError
from neuronserve.tasks import TaskKind
from neuronserve.trace import VerificationError, compare_outputs, run_trace
from tests.conftest import make_settings, trace_tiny


def _quiet(_line: str) -> None:
    return None


def test_classification_trace(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    model_dir = tiny_model(tmp_path / "clf", "text-classification")
    settings = make_settings(
        tmp_path,
        model__source=str(model_dir),
        model__task="text-classification",
        trace__backend="cpu",
        trace__cpu_engine="torchscript",
        trace__batch_sizes="1,2",
        trace__sequence_lengths="16",
    )
    report = run_trace(settings, progress=False, emit=_quiet)
    manifest = load_manifest(report.directory, backend=BackendKind.CPU)
    assert report.directory == tmp_path / "trace-models" / "clf" / "cpu"
    assert manifest.task == "text-classification"
    assert manifest.model["id2label"] == {"0": "LABEL_A", "1": "LABEL_B", "2": "LABEL_C"}
    assert manifest.output_names == ("logits",)
    assert [s.output_shapes for s in manifest.shapes] == [{"logits": [1, 3]}, {"logits": [2, 3]}]
    for entry in manifest.shapes:
        assert entry.verification["max_abs_diff"] < 1e-4
        assert entry.verification["min_cosine"] > 0.9999
    # serving needs the tokenizer and config beside the artifacts
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert name in manifest.files


def test_qa_trace_uses_token_type_ids(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    model_dir = tiny_model(tmp_path / "qa", "question-answering")
    settings = make_settings(
        tmp_path,
        model__source=str(model_dir),
        model__task="question-answering",
        trace__backend="cpu",
        trace__cpu_engine="torchscript",
        trace__batch_sizes="2",
        trace__sequence_lengths="32",
    )
    manifest = run_trace(settings, progress=False, emit=_quiet).manifest
    assert manifest.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert manifest.shapes[0].output_shapes == {"start_logits": [2, 32], "end_logits": [2, 32]}
    # the traced graph really uses token_type_ids: changing them changes the answer logits
    with torchscript_quietly():
        module = torch.jit.load(str(manifest.directory / "model-b2-s32.pt"))
    ids = torch.randint(5, 50, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.long)
    zeros = torch.zeros(2, 32, dtype=torch.long)
    assert not torch.allclose(module(ids, mask, zeros)[0], module(ids, mask, torch.ones_like(zeros))[0])


def test_rerun_skips_force_redoes_and_stale_shapes_go(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    model_dir = tiny_model(tmp_path / "fe", "feature-extraction")
    common = {
        "model__source": str(model_dir),
        "trace__backend": "cpu",
        "trace__cpu_engine": "torchscript",
        "trace__sequence_lengths": "16",
    }
    first = run_trace(
        make_settings(tmp_path, **common, trace__batch_sizes="1,2"), progress=False, emit=_quiet
    )
    assert first.compiled == ((1, 16), (2, 16))
    manifest_text = (first.directory / "manifest.json").read_text()

    again = run_trace(
        make_settings(tmp_path, **common, trace__batch_sizes="1,2"), progress=False, emit=_quiet
    )
    assert again.compiled == ()
    assert again.skipped == ((1, 16), (2, 16))
    assert (first.directory / "manifest.json").read_text() == manifest_text  # untouched

    forced = run_trace(
        make_settings(tmp_path, **common, trace__batch_sizes="1,2"), force=True, progress=False, emit=_quiet
    )
    assert forced.compiled == ((1, 16), (2, 16))

    fewer = run_trace(
        make_settings(tmp_path, **common, trace__batch_sizes="2,4"), progress=False, emit=_quiet
    )
    assert fewer.compiled == ((4, 16),)
    assert fewer.skipped == ((2, 16),)
    assert not (first.directory / "model-b1-s16.pt").exists()
    assert [s.batch_size for s in load_manifest(first.directory).shapes] == [2, 4]


def test_modified_artifact_is_recompiled(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    model_dir = tiny_model(tmp_path / "fe", "feature-extraction")
    common = {
        "model__source": str(model_dir),
        "trace__backend": "cpu",
        "trace__cpu_engine": "torchscript",
        "trace__batch_sizes": "1",
        "trace__sequence_lengths": "16",
    }
    first = run_trace(make_settings(tmp_path, **common), progress=False, emit=_quiet)
    artifact = first.directory / "model-b1-s16.pt"
    artifact.write_bytes(artifact.read_bytes()[:-10])
    again = run_trace(make_settings(tmp_path, **common), progress=False, emit=_quiet)
    assert again.compiled == ((1, 16),)
    load_manifest(first.directory)


def test_changed_weights_invalidate_the_cache(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    model_dir = tiny_model(tmp_path / "fe", "feature-extraction")
    common = {
        "model__source": str(model_dir),
        "trace__backend": "cpu",
        "trace__cpu_engine": "torchscript",
        "trace__batch_sizes": "1",
        "trace__sequence_lengths": "16",
    }
    first = run_trace(make_settings(tmp_path, **common), progress=False, emit=_quiet)
    config = json.loads((model_dir / "config.json").read_text())
    config["layer_norm_eps"] = 1e-5
    (model_dir / "config.json").write_text(json.dumps(config))
    again = run_trace(make_settings(tmp_path, **common), progress=False, emit=_quiet)
    assert again.compiled == ((1, 16),)
    assert again.manifest.model["sha256"] != first.manifest.model["sha256"]


class _DriftingBackend(CpuBackend):
    """A compiler that silently changes results, which verification must catch."""

    def compile(self, module: torch.nn.Module, example_inputs: Any, dest: Path) -> Any:
        loaded = super().compile(module, example_inputs, dest)

        class Drift:
            def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
                return tuple(t + 0.5 * torch.randn_like(t) for t in loaded.run(inputs))

        return Drift()


def test_verification_failure_keeps_no_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Callable[..., Path]
) -> None:
    model_dir = tiny_model(tmp_path / "fe", "feature-extraction")
    monkeypatch.setattr(trace_module, "_backend_for", lambda _kind, _trace: _DriftingBackend())
    settings = make_settings(
        tmp_path,
        model__source=str(model_dir),
        trace__backend="cpu",
        trace__cpu_engine="torchscript",
        trace__batch_sizes="1",
        trace__sequence_lengths="16",
    )
    with pytest.raises(
        VerificationError, match=r"b1 s16: traced outputs differ from eager PyTorch \(max abs diff"
    ):
        run_trace(settings, progress=False, emit=_quiet)
    out = tmp_path / "trace-models" / "fe" / "cpu"
    assert not list(out.glob("*.pt")) and not list(out.glob("*.tmp"))


def test_compare_outputs_figures() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    figures = compare_outputs((a,), (b,))
    assert figures["max_abs_diff"] == pytest.approx(2.0)
    assert figures["min_cosine"] == pytest.approx(0.0)
    with pytest.raises(VerificationError, match="shape"):
        compare_outputs((a,), (b[:1],))


def test_too_long_sequence_is_refused(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    model_dir = tiny_model(tmp_path / "fe", "feature-extraction")  # max_position_embeddings=128
    settings = make_settings(
        tmp_path,
        model__source=str(model_dir),
        trace__backend="cpu",
        trace__cpu_engine="torchscript",
        trace__batch_sizes="1",
        trace__sequence_lengths="256",
    )
    with pytest.raises(ModelSourceError, match="exceed the model's max_position_embeddings 128"):
        run_trace(settings, progress=False, emit=_quiet)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("bundled:nope", "no bundled model of that name"),
        ("/does/not/exist", "no such model directory"),
        ("someorg/somemodel", "the hub is offline"),
    ],
)
def test_bad_model_sources(tmp_path: Path, source: str, message: str) -> None:
    settings = make_settings(
        tmp_path, model__source=source, trace__backend="cpu", trace__cpu_engine="torchscript"
    )
    with pytest.raises(ModelSourceError, match=message):
        run_trace(settings, progress=False, emit=_quiet)


def test_bf16_auto_cast_runs_linears_in_bf16_and_is_its_own_cache_entry(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    model_dir = tiny_model(tmp_path / "fe", "feature-extraction")
    common = {
        "model__source": str(model_dir),
        "trace__backend": "cpu",
        "trace__cpu_engine": "torchscript",
        "trace__batch_sizes": "2",
        "trace__sequence_lengths": "16",
    }
    exact = run_trace(make_settings(tmp_path, **common), progress=False, emit=_quiet)
    assert exact.manifest.compiler_args == ""
    fp32_diff = exact.manifest.shapes[0].verification["max_abs_diff"]

    cast = run_trace(
        make_settings(tmp_path, **common, trace__cpu_auto_cast="bf16", trace__max_abs_diff="1"),
        progress=False,
        emit=_quiet,
    )
    assert cast.compiled == ((2, 16),)  # a different precision is a different artifact
    assert cast.manifest.compiler_args == "auto-cast=bf16"
    figures = cast.manifest.shapes[0].verification
    # bf16 rounding shows (fp32 tracing is exact to ~1e-6) yet the outputs keep their direction
    assert figures["max_abs_diff"] > 100 * max(fp32_diff, 1e-7)
    assert figures["min_cosine"] > 0.999
    with torchscript_quietly():
        module = torch.jit.load(str(cast.directory / "model-b2-s16.pt"))
    ids = torch.randint(5, 50, (2, 16))
    (hidden,) = module(ids, torch.ones_like(ids), torch.zeros_like(ids))
    assert hidden.dtype == torch.float32  # callers see fp32 in and out

    # and with a tight tolerance the same trace is refused, naming the way out
    with pytest.raises(VerificationError, match=r"trace\.cpu_auto_cast=none"):
        run_trace(
            make_settings(tmp_path, **common, trace__cpu_auto_cast="bf16", trace__max_abs_diff="1e-6"),
            force=True,
            progress=False,
            emit=_quiet,
        )


def test_cast_linears_to_bf16_copies_and_converts_every_linear() -> None:
    from neuronserve.backends.cpu import cast_linears_to_bf16

    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Sequential(torch.nn.Linear(8, 2))
    )
    converted = cast_linears_to_bf16(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in converted.modules())
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the original is untouched
    x = torch.randn(3, 4)
    with torch.no_grad():
        out, ref = converted(x), model(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=0.05) and not torch.equal(out, ref)


def test_unknown_cpu_auto_cast_is_refused_by_config_and_backend(tmp_path: Path) -> None:
    from neuronserve.config import ConfigError

    with pytest.raises(ConfigError, match=r"trace\.cpu_auto_cast"):
        make_settings(tmp_path, trace__cpu_auto_cast="fp8")
    with pytest.raises(ValueError, match=r"trace\.cpu_auto_cast='fp8': use none or bf16"):
        CpuBackend(auto_cast="fp8")


def test_bf16_on_a_cpu_without_native_bf16_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    example = (torch.randn(2, 4),)
    with caplog.at_level("WARNING", logger="neuronserve.backends.cpu"):
        CpuBackend(auto_cast="bf16").compile(model, example, tmp_path / "m.pt")
    assert "no native bf16" in caplog.text


def test_one_cpu_artifact_serves_every_verified_shape(
    tmp_path: Path, tiny_model: Callable[..., Path]
) -> None:
    model_dir = tiny_model(tmp_path / "fe", "feature-extraction")
    common = {"model__source": str(model_dir), "trace__backend": "cpu", "trace__cpu_engine": "torchscript"}
    report = run_trace(
        make_settings(tmp_path, **common, trace__batch_sizes="1,4", trace__sequence_lengths="16,32"),
        progress=False,
        emit=_quiet,
    )
    manifest = load_manifest(report.directory, backend=BackendKind.CPU)
    # traced once, at the largest shape; every other shape was verified against eager on it
    assert manifest.artifact_files == ("model-b4-s32.pt",)
    assert sorted(p.name for p in report.directory.glob("*.pt")) == ["model-b4-s32.pt"]
    assert all(s.file == "model-b4-s32.pt" for s in manifest.shapes)
    assert all(s.verification["min_cosine"] > 0.9999 for s in manifest.shapes)
    assert all(s.cost_s > 0 for s in manifest.shapes)
    memory = manifest.memory
    assert memory.shapes_share_artifact and memory.copies_share_load
    assert memory.artifact_bytes == {"model-b4-s32.pt": (report.directory / "model-b4-s32.pt").stat().st_size}
    assert 0 < memory.weight_bytes < memory.artifact_bytes["model-b4-s32.pt"] * 1.5

    # a new shape is verified on the existing artifact, not compiled again
    more = run_trace(
        make_settings(tmp_path, **common, trace__batch_sizes="1,2,4", trace__sequence_lengths="16,32"),
        progress=False,
        emit=_quiet,
    )
    assert set(more.compiled) == {(2, 16), (2, 32)}
    assert more.manifest.artifact_files == ("model-b4-s32.pt",)
    assert more.manifest.memory.weight_bytes == memory.weight_bytes


class _ShapeBakingBackend(CpuBackend):
    """A compiler whose artifacts are right only at the shape they were compiled at: elsewhere
    they raise (a graph that cannot take the shape) or drift (one that runs but is wrong)."""

    def __init__(self, fault: str) -> None:
        super().__init__()
        self.fault = fault

    def compile(self, module: torch.nn.Module, example_inputs: Any, dest: Path) -> Any:
        loaded = super().compile(module, example_inputs, dest)
        shape, fault = tuple(example_inputs[0].shape), self.fault

        class Baked:
            def run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
                out = loaded.run(inputs)
                if tuple(inputs[0].shape) == shape:
                    return out
                if fault == "raise":
                    raise RuntimeError(f"compiled for {shape}, given {tuple(inputs[0].shape)}")
                return tuple(t + 1.0 for t in out)

        return Baked()


@pytest.mark.parametrize("fault", ["raise", "drift"])
def test_a_shape_the_artifact_cannot_serve_gets_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    monkeypatch.setattr(trace_module, "_backend_for", lambda _kind, _trace: _ShapeBakingBackend(fault))
    manifest = trace_tiny(tmp_path, trace__cpu_engine="torchscript", trace__batch_sizes="1,2").manifest
    assert [(s.batch_size, s.file) for s in manifest.shapes] == [
        (1, "model-b1-s16.pt"),
        (2, "model-b2-s16.pt"),
    ]
    assert set(manifest.memory.artifact_bytes) == {"model-b1-s16.pt", "model-b2-s16.pt"}
    assert all(s.verification["max_abs_diff"] < 1e-4 for s in manifest.shapes)


def test_artifacts_of_an_older_manifest_format_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "trace-models" / "tiny" / "cpu"  # where trace_tiny's model traces to
    out.mkdir(parents=True)
    # what format 1 left: one artifact per shape and a manifest this tracer refuses to read
    for name in ("model-b1-s16.pt", "model-b2-s16.pt", "model-b8-s128.pt"):
        (out / name).write_bytes(b"old")
    (out / "manifest.json").write_text(json.dumps({"format": 1}))
    (out / "notes.pt").write_bytes(b"not ours")
    report = trace_tiny(tmp_path, trace__cpu_engine="torchscript", trace__batch_sizes="1,2")
    manifest = report.manifest
    assert report.directory == out
    assert sorted(p.name for p in out.glob("*.pt")) == ["model-b2-s16.pt", "notes.pt"]
    assert "model-b1-s16.pt" not in manifest.files and "model-b8-s128.pt" not in manifest.files
    load_manifest(out)


def test_copies_of_a_cpu_server_share_one_loaded_module(tmp_path: Path) -> None:
    from neuronserve.backends.base import CoreSet

    manifest = trace_tiny(tmp_path, trace__cpu_engine="torchscript", trace__batch_sizes="1,2").manifest
    (file,) = manifest.artifact_files
    backend = CpuBackend()
    first = backend.load(manifest.directory / file, CoreSet((0, 1)), 0)
    assert backend.load(manifest.directory / file, CoreSet((0, 1)), 0) is first  # one copy of the weights
    assert CpuBackend().load(manifest.directory / file, CoreSet((0,)), 0) is not first  # per process


class _CountingBackend(CpuBackend):
    """One artifact per shape (as on Neuron), counting compiles; the compile numbered
    ``fail_at`` raises, as a compiler that crashes on one shape does."""

    def __init__(self, fail_at: int = 0) -> None:
        from neuronserve.backends.base import Sharing

        super().__init__()
        self.sharing = Sharing(shapes=False, copies=False)
        self.fail_at = fail_at
        self.compiled: list[tuple[int, ...]] = []

    def compile(self, module: torch.nn.Module, example_inputs: Any, dest: Path) -> Any:
        self.compiled.append(tuple(example_inputs[0].shape))
        if len(self.compiled) == self.fail_at:
            raise RuntimeError("neuronx-cc crashed")
        return super().compile(module, example_inputs, dest)


def test_a_trace_that_fails_leaves_the_served_artifacts_as_they_were_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = trace_tiny(
        tmp_path, trace__cpu_engine="torchscript", trace__batch_sizes="1", trace__sequence_lengths="16"
    )
    served = first.directory
    before = {p.name: p.read_bytes() for p in served.rglob("*") if p.is_file()}

    failing = _CountingBackend(fail_at=3)
    monkeypatch.setattr(trace_module, "_backend_for", lambda _kind, _trace: failing)
    with pytest.raises(RuntimeError, match="neuronx-cc crashed"):
        trace_tiny(
            tmp_path,
            trace__cpu_engine="torchscript",
            trace__batch_sizes="1,2",
            trace__sequence_lengths="16,32",
        )
    assert failing.compiled == [(2, 16), (1, 32), (2, 32)]  # b1 s16 was up to date
    # the served directory is byte for byte what it was
    assert {p.name: p.read_bytes() for p in served.rglob("*") if p.is_file()} == before
    load_manifest(served)

    working = _CountingBackend()
    monkeypatch.setattr(trace_module, "_backend_for", lambda _kind, _trace: working)
    report = trace_tiny(
        tmp_path, trace__cpu_engine="torchscript", trace__batch_sizes="1,2", trace__sequence_lengths="16,32"
    )
    assert working.compiled == [(2, 32)]  # only what the failed run had not finished
    assert set(report.compiled) == {(2, 32)}
    manifest = load_manifest(served)
    assert [(s.batch_size, s.sequence_length) for s in manifest.shapes] == [
        (1, 16),
        (2, 16),
        (1, 32),
        (2, 32),
    ]
    assert not served.with_name(f".{served.name}.staging").exists()
    assert sorted(p.name for p in served.glob("*.pt")) == [
        "model-b1-s16.pt",
        "model-b1-s32.pt",
        "model-b2-s16.pt",
        "model-b2-s32.pt",
    ]


def test_a_trace_interrupted_before_the_swap_is_finished_with_its_own_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import build_tiny_model

    model = tmp_path / "model"
    common = {
        "trace__backend": "cpu",
        "trace__cpu_engine": "torchscript",
        "trace__batch_sizes": "1",
        "trace__sequence_lengths": "16",
    }
    build_tiny_model(model, "feature-extraction", token_types=True)
    first = run_trace(
        make_settings(tmp_path, model__source=str(model), **common), progress=False, emit=_quiet
    )
    assert first.manifest.input_names == ("input_ids", "attention_mask", "token_type_ids")

    # the model changes (a RoBERTa-like tokenizer: no token_type_ids), and the trace dies just
    # before swapping its finished staging directory in
    build_tiny_model(model, "feature-extraction", token_types=False)
    real_swap = trace_module._swap_in
    monkeypatch.setattr(trace_module, "_swap_in", lambda *_a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_trace(make_settings(tmp_path, model__source=str(model), **common), progress=False, emit=_quiet)
    assert load_manifest(first.directory).input_names == first.manifest.input_names  # still served

    monkeypatch.setattr(trace_module, "_swap_in", real_swap)
    again = run_trace(
        make_settings(tmp_path, model__source=str(model), **common), progress=False, emit=_quiet
    )
    assert again.compiled == ()  # the interrupted run had finished every shape
    manifest = load_manifest(first.directory)
    assert manifest.input_names == ("input_ids", "attention_mask")  # the new model's, not the old
    assert manifest.model["sha256"] != first.manifest.model["sha256"]
    assert manifest.memory.weight_bytes > 0


@pytest.mark.parametrize(
    ("step", "failing", "expected", "checked"),
    [
        (1, None, 1, [*range(8, 16), *range(17, 32)]),  # every length from 8, compiled ones aside
        (1, 9, 8, [8, 9, 24]),  # 9 fails: every multiple of 8 still holds (8 passed already)
        (1, 24, 0, [*range(8, 16), *range(17, 25)]),  # a multiple of 8 fails: no trimming, no retry
        (8, 24, 0, [8, 24]),
        (8, None, 8, [8, 24]),
    ],
)
def test_trimmed_lengths_are_verified_from_the_shortest_at_the_engines_step(
    monkeypatch: pytest.MonkeyPatch, step: int, failing: int | None, expected: int, checked: list[int]
) -> None:
    """What _verify_trim checks is every length the batcher may run (trimmed_length, capped at
    the bucket), and a failure at a finer step falls back to every multiple of 8 before it gives
    up trimming."""
    from neuronserve import trace
    from neuronserve.artifacts import trimmed_length

    seen: list[int] = []

    def verify(*, seq: int, **_: object) -> None:
        seen.append(seq)
        if seq == failing:
            raise trace.VerificationError(f"off at {seq}")

    monkeypatch.setattr(trace, "_verify_shape", verify)
    said: list[str] = []
    got = trace._verify_trim(
        {"model.pt": object()},  # type: ignore[dict-item]
        {(1, 16): "model.pt", (1, 32): "model.pt"},
        step,
        eager=object(),  # type: ignore[arg-type]
        task=TaskKind.FEATURE_EXTRACTION,
        tolerance={},
        say=said.append,
    )
    assert (got, seen) == (expected, checked), said
    if expected:
        run = {min(bucket, trimmed_length(n, expected)) for bucket in (16, 32) for n in range(1, bucket + 1)}
        assert run <= {*seen, 16, 32} - {failing}


def test_a_long_grid_is_verified_at_every_remainder_of_the_kernels_blocks_not_at_every_length() -> None:
    """ONNX Runtime artifacts up to 256 tokens: each remainder mod PROBE_BLOCK is checked among
    the short lengths and among the long ones, the longest runnable length, each compiled
    length's neighbours and both sides of every multiple of PROBE_THRESHOLD too, in about a
    quarter of the lengths."""
    from neuronserve.trace import PROBE_BLOCK, PROBE_THRESHOLD, trim_probe_lengths

    compiled = {16, 32, 64, 128, 256}
    lengths = trim_probe_lengths(1, 256, compiled)
    assert len(lengths) < (256 - 8) // 3
    assert {
        n + d for n in range(PROBE_THRESHOLD, 256, PROBE_THRESHOLD) for d in (-1, 0, 1)
    } - compiled <= set(lengths)
    assert not compiled & set(lengths)
    short, long = [n for n in lengths if n <= 48], [n for n in lengths if n >= 200]
    for group in (short, long):
        assert {n % PROBE_BLOCK for n in group} | {n % PROBE_BLOCK for n in compiled if n in range(8, 49)} | {
            256 % PROBE_BLOCK
        } == set(range(PROBE_BLOCK))
    assert {n + d for n in compiled for d in (-1, 1)} & set(range(8, 257)) <= set(lengths)
    # a coarse step (TorchScript's 8) and a short grid still check every length they claim
    assert trim_probe_lengths(8, 256, compiled) == [n for n in range(8, 257, 8) if n not in compiled]
    assert trim_probe_lengths(1, 32, {16, 32}) == [*range(8, 16), *range(17, 32)]
