"""Settings: the properties syntax, typed values, overrides, typo protection, generated docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuronserve.backends import BackendKind
from neuronserve.config import (
    ConfigError,
    Settings,
    build_settings,
    escape_value,
    load_settings,
    parse_properties,
    render_reference,
    render_template,
)
from tests.conftest import REPO, make_settings


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, environ={})
    assert settings.trace.batch_sizes == ()  # by backend, see test_grid_and_copies_default_by_backend
    assert settings.trace.sequence_lengths == ()
    assert settings.serve.models_per_server == 0  # by backend, see test_copies_default_by_backend
    assert settings.trace.backend == "auto"
    assert settings.model.source == "bundled:all-MiniLM-L6-v2"


def test_grid_and_copies_default_by_backend(tmp_path: Path) -> None:
    from neuronserve.deploy.inventory import Inventory
    from neuronserve.deploy.plan import make_plan

    # cpu: one copy per core of the server; Neuron: two per server
    assert [b.copies_per_server(0, 4) for b in BackendKind] == [4, 2, 2]
    defaults = make_settings(tmp_path).trace
    assert BackendKind.CPU.trace_grid(defaults) == ((1, 2, 4, 8, 16, 32), (16, 32, 64, 128))
    assert BackendKind.NEURONX.trace_grid(defaults) == ((1, 4, 8), (32, 64, 128))
    chosen = make_settings(tmp_path, trace__batch_sizes="2", trace__sequence_lengths="64").trace
    assert BackendKind.NEURON.trace_grid(chosen) == ((2,), (64,))
    with pytest.raises(ConfigError, match="needs at least one value"):
        make_settings(tmp_path, bench__concurrency="")  # only the grid has a "pick for me"
    assert BackendKind.NEURONX.copies_per_server(3, 1) == 3 and BackendKind.CPU.copies_per_server(3, 8) == 3
    assert (
        BackendKind.CPU.copies_per_server(0, 96) == 64
    )  # a server of every CPU of a large host: the most allowed
    settings = make_settings(tmp_path)
    cpu = make_plan(settings, Inventory("cpu", (0, 1), {}), BackendKind.CPU)
    neuron = make_plan(settings, Inventory("neuron", (0, 1), {0: 0, 1: 0}, 2), BackendKind.NEURONX)
    # two servers lending each other cores, a copy per CPU of its own
    assert [(len(s.cores), s.copies) for s in cpu.servers] == [(1, 1), (1, 1)]
    assert [s.copies for s in neuron.servers] == [2, 2]


def test_properties_syntax() -> None:
    text = (
        "# comment\n"
        "! also a comment\n"
        "a.one = 1\n"
        "a.two: two words  \n"
        "a.three  3\n"
        "a.long=first,\\\n"
        "       second\n"
        "a.escaped=tab\\there\\u0041\n"
        "a.empty=\n"
    )
    parsed = {k: v for k, (v, _) in parse_properties(text).items()}
    assert parsed == {
        "a.one": "1",
        "a.two": "two words",
        "a.three": "3",
        "a.long": "first,second",
        "a.escaped": "tab\thereA",
        "a.empty": "",
    }


def test_a_comment_after_a_value_is_refused_not_kept_in_it() -> None:
    """Java properties have no trailing comments: "1  # copies" would be the value. A '#' that
    belongs to the value is written \\#, and values starting with '#' stay values."""
    with pytest.raises(ConfigError) as refused:
        parse_properties("model.name=mini   # the small one\nserve.port=8081\n", source="c.properties")
    message = str(refused.value)
    assert message.startswith("c.properties:1: model.name: a '#' after the value would be part of it")
    assert "put the comment on a line of its own" in message
    parsed = {k: v for k, (v, _) in parse_properties("a.x=one \\# two\na.y=#tag\n").items()}
    assert parsed == {"a.x": "one # two", "a.y": "#tag"}


@pytest.mark.parametrize(
    "value", ["a # b", "back\\slash", "  leading", "two\nlines", "!bang", "c:\\dir\\#x", "tab\there", ""]
)
def test_escape_value_reads_back_as_written(value: str) -> None:
    assert parse_properties(f"k={escape_value(value)}")["k"][0] == value


def test_a_generated_config_keeps_a_value_with_a_hash(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, serve__api_key="s3cret #1", model__name="mini")
    cfg = tmp_path / "tuned.properties"
    cfg.write_text(render_template(settings))
    assert load_settings(cfg, environ={}).serve.api_key == "s3cret #1"


def test_duplicate_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"a\.b is set twice \(first at f:1\)"):
        parse_properties("a.b=1\na.b=2\n", source="f")


def test_file_values_are_typed(tmp_path: Path) -> None:
    cfg = tmp_path / "c.properties"
    cfg.write_text("trace.batch_sizes=16, 1,4\ntrace.neuron_dynamic_batch=yes\ntrace.min_cosine=0.99\n")
    settings = load_settings(cfg, environ={})
    assert settings.trace.batch_sizes == (1, 4, 16)
    assert settings.trace.neuron_dynamic_batch is True
    assert settings.trace.min_cosine == pytest.approx(0.99)
    assert settings.base_dir == tmp_path


def test_env_overrides_file_and_set_overrides_env(tmp_path: Path) -> None:
    cfg = tmp_path / "c.properties"
    cfg.write_text("trace.backend=cpu\ntrace.batch_sizes=2\n")
    env = {"NEURONSERVE_TRACE__BACKEND": "neuronx", "NEURONSERVE_TRACE__BATCH_SIZES": "4"}
    settings = load_settings(cfg, environ=env, overrides=["trace.batch_sizes=8"])
    assert settings.trace.backend == "neuronx"
    assert settings.trace.batch_sizes == (8,)


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("trace.batch_size=4", "unknown key trace.batch_size; did you mean trace.batch_sizes?"),
        ("trace.backend=neuronz", "must be one of auto, cpu, neuronx, neuron (did you mean neuron?)"),
        ("trace.batch_sizes=one", "must be a whole number; got 'one'"),
        ("trace.batch_sizes=0", "must be at least 1; got 0"),
        ("trace.batch_sizes=1,1", "lists a value twice"),
        ("bench.concurrency=", "needs at least one value"),
        ("trace.min_cosine=2", "must be at most 1; got 2"),
        ("trace.neuron_dynamic_batch=maybe", "must be true or false"),
        ("model.task=summarization", "must be one of feature-extraction"),
        ("serving.port=1", "did you mean serve.port?"),
        ("foo.bar=1", "keys start with one of: model., trace., serve."),
    ],
)
def test_bad_values_say_how_to_fix(assignment: str, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(None, environ={}, overrides=[assignment])
    assert message in str(excinfo.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(None, environ={}, overrides=["trace.batch_size=4", "trace.min_cosine=x"])
    assert "trace.batch_sizes" in str(excinfo.value)
    assert "trace.min_cosine must be a number" in str(excinfo.value)


def test_env_typo_is_caught() -> None:
    with pytest.raises(ConfigError, match=r"did you mean trace\.sequence_lengths"):
        load_settings(None, environ={"NEURONSERVE_TRACE__SEQUENCE_LENGTH": "64"})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; pass --config PATH"):
        load_settings(tmp_path / "nope.properties", environ={})


def test_set_needs_an_equals_sign() -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_settings(None, environ={}, overrides=["trace.backend"])


def test_template_round_trips_to_the_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "c.properties"
    cfg.write_text(render_template())
    assert load_settings(cfg, environ={}) == Settings(base_dir=tmp_path)


def test_committed_config_is_the_generated_template() -> None:
    committed = (REPO / "config.properties").read_text()
    assert committed == render_template(), "regenerate: neuronserve config --template > config.properties"


def test_the_configuration_reference_is_in_sync() -> None:
    reference = (REPO / "docs" / "configuration.md").read_text()
    assert render_reference() in reference, (
        "update docs/configuration.md from: neuronserve config --reference"
    )


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    settings = build_settings({"trace.output_dir": ("out", "t")}, base_dir=tmp_path)
    assert settings.path(settings.trace.output_dir) == tmp_path / "out"


MULTI = """
model.source=bundled:all-MiniLM-L6-v2
trace.batch_sizes=1,8
serve.default_prompt_name=none
models.reranker.source=/models/ce
models.reranker.task=text-classification
models.reranker.sequence_lengths=64,256
models.reranker.copies=2
models.second.source=/models/other
"""


def test_further_models_each_get_single_model_settings(tmp_path: Path) -> None:
    (tmp_path / "c.properties").write_text(MULTI)
    settings = load_settings(tmp_path / "c.properties", environ={})
    models = settings.per_model()
    assert list(models) == ["all-MiniLM-L6-v2", "reranker", "second"]  # model.* first, then file order
    first, reranker, second = models.values()
    assert first.model == settings.model and first.extra_models == ()
    assert reranker.model.source == "/models/ce" and reranker.model.task == "text-classification"
    assert reranker.model_name == "reranker"
    assert reranker.trace.sequence_lengths == (64, 256)
    assert reranker.trace.batch_sizes == (1, 8)  # left out: trace.batch_sizes
    assert reranker.serve.models_per_server == 2
    assert second.serve.models_per_server == 0 and second.model.task == "feature-extraction"
    # a prompt belongs to one model: serve.default_prompt_name stays with model.*
    assert first.serve.default_prompt_name == "none" and reranker.serve.default_prompt_name == ""
    assert settings.as_dict()["models"]["reranker"]["sequence_lengths"] == [64, 256]


def test_further_models_from_the_environment_and_round_trip_through_the_template(tmp_path: Path) -> None:
    (tmp_path / "c.properties").write_text(MULTI)
    env = {"NEURONSERVE_MODELS__RERANKER__COPIES": "3", "NEURONSERVE_MODELS__THIRD__SOURCE": "/m3"}
    settings = load_settings(tmp_path / "c.properties", environ=env)
    assert settings.per_model()["reranker"].serve.models_per_server == 3
    assert settings.per_model()["third"].model.source == "/m3"
    (tmp_path / "again.properties").write_text(render_template(settings))
    again = load_settings(tmp_path / "again.properties", environ={})
    assert again.extra_models == settings.extra_models


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"models.rr.task": "text-classification"}, "models.rr.source is missing"),
        ({"models.rr.source": "/x", "models.rr.sorce": "/y"}, "did you mean models.rr.source?"),
        ({"models.Big.source": "/x"}, "lower-case letters"),
        ({"models.a__b.source": "/x"}, "single '_' inside"),  # NEURONSERVE_MODELS__A__B__SOURCE is ambiguous
        ({"models.rr_.source": "/x"}, "single '_' inside"),
        ({"models.rr.source": "/x", "models.rr.copies": "-1"}, "models.rr.copies must be at least 0"),
        ({"models.rr.source": "/x", "models.rr.task": "rerank"}, "must be one of"),
        (
            {"models.all-minilm-l6-v2.source": "/x", "model.name": "all-minilm-l6-v2"},
            "has the name of model.*",
        ),
    ],
)
def test_further_model_mistakes_say_how_to_fix_them(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("*", r"\*")):
        build_settings({k: (v, "test") for k, v in values.items()})


def test_the_api_key_can_come_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("from-the-secret\n")
    settings = build_settings(
        {"serve.api_key": ("inline", "test"), "serve.api_key_file": ("api-key", "test")}, base_dir=tmp_path
    )
    assert settings.api_key() == "from-the-secret"  # the file wins, stripped
    assert build_settings({"serve.api_key": ("inline", "test")}).api_key() == "inline"
    key_file.write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        settings.api_key()
    key_file.unlink()
    with pytest.raises(ConfigError, match="api_key_file"):
        settings.api_key()
