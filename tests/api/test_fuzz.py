"""Property test of the published schema against the live server on loopback (schemathesis).

Every route of ``/openapi.json`` gets generated requests, valid and invalid per the schema; each
answer must be documented (status, content type, body schema), no answer may be a 5xx, and
schema-invalid requests must be refused with a 4xx. The server runs with a short context so that
accepted generations end quickly; the number of examples is bounded.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def fuzz_server(demo_model_dir, api_server):
    server = api_server(demo_model_dir, "--max-model-len", "64", "--max-num-seqs", "4")
    yield server
    server.stop()


MAX_EXAMPLES = 20
"""Per route and mode (valid / invalid); ~200 requests in all, about a minute on two cores."""


def test_live_api_conforms_to_its_schema(fuzz_server):
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    live = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in live.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def conforms(case):
                response = case.call(timeout=60)
                case.validate_response(response, checks=CHECKS)

            try:
                conforms()
            except Unsatisfiable:  # nothing to make invalid: a GET without parameters
                assert mode == GenerationMode.NEGATIVE
    assert fuzz_server.proc.poll() is None, "the server died"
    assert 'status="500"' not in fuzz_server.log()
