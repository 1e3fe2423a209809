"""A schemathesis run over the server's own OpenAPI schema, against a real server.

Every documented operation gets generated requests; every answer must be no 5xx, a documented
status code, the documented content type and a body that matches its schema, and a request the
schema calls valid must be served (positive_data_acceptance): the document describes what this
server's models take, not what some server might.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.integration.servers import RunningServer, start_server

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 120


@pytest.fixture(scope="module")
def fuzzed_server(
    bundled_artifacts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with start_server(bundled_artifacts, tmp, "serve.max_inputs_per_request=8", copies=1) as srv:
        yield srv


def _no_short_deadline(case: Any) -> bool:
    """A deadline shorter than a model call is rightly a 504 (its own test covers it), so the
    fuzzer, which must see no 5xx at all, asks for none under a second."""
    body = case.body if isinstance(case.body, dict) else {}
    parameters = body.get("parameters")
    timeout = parameters.get("timeout_ms") if isinstance(parameters, dict) else None
    return not (isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout < 1000)


def _fuzz(operation: Any, cases: Counter[str]) -> None:
    label = operation.label

    @given(case=operation.as_strategy().filter(_no_short_deadline))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: Any) -> None:
        cases[label] += 1
        case.call_and_validate(timeout=60)  # every check, schema-valid data accepted included

    run()


def test_every_answer_matches_the_schema(fuzzed_server: RunningServer) -> None:
    """Hypothesis drives each operation's generated cases (schemathesis's pytest plugin is not
    used: it does not run on this pytest)."""
    api = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    cases: Counter[str] = Counter()
    failures: list[str] = []
    for result in api.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        try:
            _fuzz(operation, cases)
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {exc}")
    total = sum(cases.values())
    print(f"\nschemathesis: {total} cases over {len(cases)} operations: {dict(cases)}")
    assert not failures, "\n\n".join(failures)
    assert total >= 500, cases
    assert "POST /v2/models/{model}/infer" in cases and "POST /predict" in cases
    assert "Traceback" not in fuzzed_server.log_text()
