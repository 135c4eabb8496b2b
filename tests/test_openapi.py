"""The OpenAPI document is the API: a real `trainwire serve` (Postgres, scripted upstream), with and without an
admin key, is fuzzed from its own /openapi.json with schemathesis (its Python API: the document's examples, the
coverage phase's boundary values and undeclared methods, and fuzzing with valid and invalid data), and every check
schemathesis has must pass: no 5xx, only declared statuses, answers that match their schemas and content types,
valid data accepted and invalid data rejected, `Allow` on every 405, auth that is not ignored. The exceptions are
in CONFIG, each with its reason. Checks that need the stateful phase (links between operations) have nothing to
see here: the document declares no links.

Fuzzed: every route the framework serves except the relay of the rest of vLLM's API (its statuses are vLLM's).
The generation routes are documented (the hot path serves them in front of the framework) but not fuzzed: they
need a real model behind them. Bounded in time: about 30 examples per operation, no shrinking, derandomized.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.hypothesis.builder import HypothesisTestConfig, HypothesisTestMode, create_test
from sqlalchemy import text

from tests.support import dbread
from tests.support.apihelpers import chat, post, start
from trainwire.store.db import make_engine

ADMIN = "openapi-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
EXAMPLES = 30
LISTS = ("/sessions", "/rewards", "/train/steps", "/policy/versions")
# The exceptions, each with its reason.
CONFIG = SchemathesisConfig.from_dict(
    {
        "operations": [
            # Either `source` or `session_id` is required (deleting every reward at once is refused with a 400);
            # OpenAPI has no way to say "at least one of these query parameters".
            {
                "include-name": "DELETE /rewards",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401"]}},
            },
            # A reused idempotency key with a different reward is a 422, as the IETF's Idempotency-Key draft
            # (draft-ietf-httpapi-idempotency-key-header) says; schemathesis expects a 409 for a conflict.
            # The fuzzer cannot know which keys were used, so a valid body may reuse one.
            {
                "include-path-regex": "^/(reward|sessions/\\{session_id\\}/(reward|finish))$",
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "404", "409", "422"]}},
            },
        ]
    }
)
GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
PASSTHROUGH = ("/v1/{rest}", "/sessions/{session_id}/v1/{rest}", "/tokenize", "/detokenize")
# The routes the app serves itself; the test fails when one is not fuzzed (a route added without thinking of
# this test, or one the document lost).
EXPECTED = {
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /v1/models",
    "GET /sessions/{session_id}/v1/models",
    "POST /reward",
    "POST /sessions/{session_id}/reward",
    "POST /sessions/{session_id}/finish",
    "GET /sessions",
    "GET /sessions/{session_id}",
    "GET /calls/{call_id}",
    "GET /rewards",
    "GET /stats",
    "DELETE /rewards",
    "DELETE /rewards/{reward_id}",
    "GET /train/steps",
    "GET /policy/versions",
    "POST /v1/traces",
}


def _excluded(path: str) -> bool:
    return path in PASSTHROUGH or any(path == p or path.endswith("}" + p) for p in GENERATION)


def _seed(proxy, url: str, auth: dict[str, str]) -> list[str]:
    """Rows in every table the read routes list, so that pages and their cursors hold real records; the call ids."""
    call_ids = []
    for i in range(3):
        r = chat(proxy, f"seed-{i}", f"question {i}")
        assert r.status_code == 200
        call_ids.append(r.headers["X-Call-Id"])
    dbread.wait_calls(url, 3)
    for i in (0, 1):  # two: a page of one has a next_cursor
        reward = {"session_id": f"seed-{i}", "reward": 1.0, "metadata": {"why": "seed"}}
        assert post(proxy, "/reward", reward, headers=auth).status_code == 200

    async def trainer_rows():
        engine = make_engine(url)
        try:
            async with engine.begin() as conn:
                for step in (1, 2, 3):
                    await conn.execute(
                        text(
                            "INSERT INTO train_steps (step, policy_version, n_sessions, n_samples, metrics, created_at)"
                            " VALUES (:s, :s, 2, 4, CAST(:m AS jsonb), now())"
                        ),
                        {"s": step, "m": '{"loss": 0.5}'},
                    )
                    await conn.execute(
                        text(
                            "INSERT INTO policy_versions (version, kind, served_model, path, train_step, status, "
                            "created_at) VALUES (:s, 'lora', :name, '/ckpt', :s, 'published', now())"
                        ),
                        {"s": step, "name": f"policy-v{step}"},
                    )
        finally:
            await engine.dispose()

    asyncio.run(trainer_rows())
    return call_ids


def test_the_document_declares_what_the_api_answers(start_proxy, upstream, pg_url, tmp_path):
    proxy = start(start_proxy, upstream, pg_url, tmp_path, "--admin-key", ADMIN)
    doc = httpx.get(f"{proxy.url}/openapi.json").json()
    paths = doc["paths"]
    # The hot path's routes are in the document, as documentation only.
    for p in GENERATION:
        for full in (p, "/sessions/{session_id}" + p):
            op = paths[full]["post"]
            assert "requestBody" in op and {"200", "400", "401", "413", "502"} <= set(op["responses"]), full
    # The reward routes declare their body (RewardBody's schema) and every status they answer.
    body = paths["/reward"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["title"] == "RewardBody" and body["required"] == ["session_id", "reward"]
    assert set(body["properties"]) == {"session_id", "reward", "call_id", "final", "idempotency_key", "metadata"}
    assert body["additionalProperties"] is False
    finish = paths["/sessions/{session_id}/finish"]["post"]["requestBody"]
    assert finish["required"] is False
    # The session is the path's: a body's session_id may only repeat it, so the document leaves it out.
    assert set(finish["content"]["application/json"]["schema"]["properties"]) == {"idempotency_key", "metadata"}
    for p in ("/reward", "/sessions/{session_id}/reward", "/sessions/{session_id}/finish"):
        assert set(paths[p]["post"]["responses"]) == {"200", "400", "401", "404", "409", "413", "422", "503"}
    # No operation keeps FastAPI's 422 (its validation errors are answered as 400s in OpenAI's format), and
    # every error answer has the error schema.
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for p, item in paths.items():
        for method, op in item.items():
            for status, answer in op["responses"].items():
                if status.startswith(("4", "5")) and p != "/readyz":
                    assert answer["content"]["application/json"]["schema"] == error_ref, (method, p, status)
            if p.startswith(("/reward", "/sessions", "/calls", "/stats", "/train", "/policy")) and "/v1/" not in p:
                assert {"400", "401", "503"} <= set(op["responses"]), (method, p)
    assert paths["/metrics"]["get"]["responses"].keys() == {"200", "401"}
    ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(ids) == len(set(ids))


def _fuzz(op, schema, cursors, headers: dict[str, str], session: requests.Session, count) -> None:
    """Every phase that sends requests without state (the document's examples, coverage: boundary values and
    undeclared methods, and fuzzing in both generation modes), with every check schemathesis has."""

    # A cursor is opaque (format "cursor"): only one this list handed out is valid, so valid ones are drawn from
    # its real pages.
    schemathesis.openapi.format("cursor", st.sampled_from(cursors.get(op.path, ["unused"])))

    def fuzz(case):
        count()
        case.call_and_validate(session=session, headers=headers, timeout=30)

    config = HypothesisTestConfig(
        project=schema.config,
        modes=[HypothesisTestMode.EXAMPLES, HypothesisTestMode.COVERAGE, HypothesisTestMode.FUZZING],
        settings=settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        ),
    )
    create_test(operation=op, test_func=fuzz, config=config)()


@pytest.mark.parametrize("admin", [True, False], ids=["admin-key", "no-admin-key"])
def test_schemathesis_finds_the_api_as_documented(start_proxy, upstream, pg_url, tmp_path, admin):
    extra = ("--admin-key", ADMIN) if admin else ()
    proxy = start(start_proxy, upstream, pg_url, tmp_path, *extra)
    call_ids = _seed(proxy, pg_url, AUTH if admin else {})
    schema = schemathesis.openapi.from_url(f"{proxy.url}/openapi.json", config=CONFIG)
    operations = [result.ok() for result in schema.get_all_operations()]
    fuzzed = [op for op in operations if not _excluded(op.path)]
    assert {f"{op.method.upper()} {op.path}" for op in fuzzed} == EXPECTED
    cursors = {}
    for path in LISTS:
        page = httpx.get(f"{proxy.url}{path}", params={"limit": 1}, headers=AUTH if admin else {}).json()
        assert page["next_cursor"], path
        cursors[path] = [page["next_cursor"]]
    session = requests.Session()  # one keep-alive connection: an error answer must not break it
    failures: list[str] = []
    counts: dict[str, int] = {}
    t0 = time.monotonic()
    for op in fuzzed:
        label = f"{op.method.upper()} {op.path}"
        try:
            _fuzz(
                op,
                schema,
                cursors,
                AUTH if admin else {},
                session,
                lambda label=label: counts.__setitem__(label, counts.get(label, 0) + 1),
            )
        except (Exception, BaseExceptionGroup) as exc:  # one operation's failure must not hide the others'
            failures.append(f"{label}: {exc}")
    # The fuzzer's ids name nothing: the answers for real ones are checked against their schemas too.
    by_label = {f"{op.method.upper()} {op.path}": op for op in fuzzed}
    real = [
        ("GET /sessions/{session_id}", {"session_id": "seed-0"}),
        ("GET /sessions/{session_id}", {"session_id": "seed-1"}),
        ("GET /calls/{call_id}", {"call_id": call_ids[0]}),
    ]
    for label, path_parameters in real:
        for query in ({}, {"tokens": "true"}):
            case = by_label[label].Case(path_parameters=path_parameters, query=query)
            try:
                response = case.call_and_validate(session=session, headers=AUTH if admin else {}, timeout=30)
                assert response.status_code == 200, (label, path_parameters, response.text[:300])
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{label} {path_parameters} {query}: {exc}")
    elapsed = time.monotonic() - t0
    print(f"schemathesis: {sum(counts.values())} requests over {len(fuzzed)} operations in {elapsed:.0f}s")
    assert not failures, "\n\n".join(failures)
    assert set(counts) == EXPECTED
    # The proxy is still well: the same connection answers, and nothing was logged as a bug.
    assert session.get(f"{proxy.url}/healthz").status_code == 200
    assert "unexpected error" not in proxy.log_path.read_text(errors="replace")
