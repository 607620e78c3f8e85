"""Generated requests from the app's own OpenAPI schema: none may end in a server error.

schemathesis reads /api/v1/schema/ and calls every operation in-process through the WSGI
application (no server), as an operator with a token and the reprocess permission, with
valid and invalid inputs (negative mode). Bounded and derandomized: the same requests on
every run.
"""

import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.factories import make_batch

MAX_EXAMPLES = 25
# Every operation of the schema; test_the_schema_has_exactly_these_operations fails when an
# endpoint is added without being fuzzed here.
OPERATIONS = [
    ("POST", "/api/v1/usage-events/"),
    ("GET", "/api/v1/batches/"),
    ("GET", "/api/v1/batches/{batch_id}/"),
    ("GET", "/api/v1/batches/{batch_id}/error-summary/"),
    ("POST", "/api/v1/batches/{batch_id}/reprocess/"),
    ("POST", "/api/v1/batches/{batch_id}/error-summary/reprocess/"),
    ("GET", "/api/v1/records/"),
    ("GET", "/api/v1/records/{record_id}/trail/"),
    ("GET", "/api/v1/events/"),
    ("GET", "/api/v1/trace/"),
    ("GET", "/api/v1/activity/"),
    ("POST", "/api/v1/reprocess/all/"),
    ("GET", "/api/v1/reprocess/{run_id}/"),
]


@pytest.fixture
def api_schema(transactional_db, operator_token, published):
    """The schema the app serves, loaded through its WSGI application with a token."""
    # Committed data (transactional_db): each generated request runs as in production, in
    # its own transaction, so a database error in one cannot hide behind another.
    make_batch(complete=2, errors={"1009": 2}, pending=1)
    make_batch(errors={"1016": 1}, in_doubt=1)
    return schemathesis.openapi.from_wsgi(
        "/api/v1/schema/?format=json",
        get_wsgi_application(),
        headers={"Authorization": f"Token {operator_token}"},
    )


def test_the_schema_has_exactly_these_operations(api_schema):
    served = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert served == set(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_generated_request_gets_a_server_error(api_schema, operator_token, method, path, mode):
    operation = api_schema[path][method]
    auth = {"Authorization": f"Token {operator_token}"}

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case):
        response = case.call(headers=auth)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}\n"
            f"query={case.query!r} body={case.body!r}\n{response.text[:2000]}"
        )
        # The operator has a token and the permission: never refused for credentials.
        assert response.status_code not in (401, 403), response.text[:500]

    call()
