"""A hostile operator against a real `trainwire serve` on a real Postgres: ids and offsets beyond the columns'
ranges, cursors that decode to the wrong type or overflow, NUL and lone surrogates in ids, values, keys and
metadata, and a database that goes away. Every bad input is a 4xx in OpenAI's error format (never a 500), nothing
is stored for it, and the client's keep-alive connection keeps working: the next request on the SAME connection is
answered. A database that is down is a 503 with Retry-After and one WARNING line, and the same request works once
it is back."""

from __future__ import annotations

import base64
import json
import math
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support import dbread
from tests.support.apihelpers import chat, start
from tests.support.pgcluster import PgCluster, _bin
from trainwire.store.migrate import upgrade_head

ADMIN = "hostile-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
J = {"content-type": "application/json", **AUTH}


def cursor(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def connection_of(r: httpx.Response):
    """The client side (address, port) of the TCP connection that carried `r`: equal for two responses only if
    they came over the same connection."""
    return r.extensions["network_stream"].get_extra_info("client_addr")


def assert_refused(r: httpx.Response, status: int | tuple[int, ...] = 400) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert r.status_code in statuses, (r.request.method, r.request.url, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    return err


@pytest.fixture
def hostile(start_proxy, upstream, pg_url, tmp_path):
    p = start(start_proxy, upstream, pg_url, tmp_path, "--admin-key", ADMIN)
    yield p
    p.stop()


@pytest.fixture
def client(hostile):
    with httpx.Client(base_url=hostile.url, headers=AUTH, timeout=30) as c:
        yield c


REWARD_BODIES = [
    # (raw body, the field the 400 names, a fragment of its message)
    (b'{"session_id": "h-1", "reward": 1, "idempotency_key": "a\\u0000b"}', "idempotency_key", "NUL"),
    (b'{"session_id": "h-1", "reward": 1, "idempotency_key": "a\\ud800b"}', "idempotency_key", "surrogate"),
    (b'{"session_id": "h-1", "reward": 1, "idempotency_key": "\\udfff"}', "idempotency_key", "surrogate"),
    (b'{"session_id": "h-1", "reward": 1, "metadata": {"k": "a\\u0000b"}}', "metadata", "metadata.k"),
    (b'{"session_id": "h-1", "reward": 1, "metadata": {"a\\u0000": 1}}', "metadata", "NUL"),
    (b'{"session_id": "h-1", "reward": 1, "metadata": {"k": ["x", "\\ud800"]}}', "metadata", "metadata.k[1]"),
    (b'{"session_id": "h-1", "reward": 1, "metadata": {"\\ud83d": 1}}', "metadata", "surrogate"),
    (b'{"session_id": "h-1", "reward": 1, "metadata": {"k": NaN}}', "metadata", "finite"),
    (b'{"session_id": "h-1", "reward": 1, "metadata": {"k": 123456789012345678901234567890}}', "metadata", "2**63"),
    (b'{"session_id": "h-1", "reward": 1, "metadata": {"k": -9223372036854775809}}', "metadata", "2**63"),
    (b'{"session_id": "h-1", "reward": 1, "metadata": {"k": 1e300}}', "metadata", "2**63"),
    (
        b'{"session_id": "h-1", "reward": 1, "metadata": ' + b'{"a": ' * 100 + b"1" + b"}" * 100 + b"}",
        "metadata",
        "nested deeper",
    ),
    (b'{"session_id": "h-1", "reward": NaN}', "reward", "finite"),
    (b'{"session_id": "h-1", "reward": -Infinity}', "reward", "-Infinity"),
    (b'{"session_id": "h-1", "reward": 1' + b"0" * 400 + b"}", "reward", "finite"),
    (b'{"session_id": "h-1", "reward": 1e300}', "reward", "magnitude"),
    (b'{"session_id": "h-1", "reward": 18446744073709551615}', "reward", "magnitude"),
    (b'{"session_id": "h\\u00001", "reward": 1}', "session_id", "session_id"),
    (b'{"session_id": "h\\ud8001", "reward": 1}', "session_id", "session_id"),
    (b'{"session_id": "h-1", "reward": 1, "call_id": "c\\u0000"}', "call_id", "call_id"),
    (b'{"session_id": "h-1", "reward": 1, "\\ud800": 1}', None, "surrogate"),
    (b'{"session_id": "h-1", "reward": 1, "x\\u0000": 1}', "x\x00", "unknown field"),
    ('{"session_id": "h-1", "reward": 1}'.encode("utf-16"), None, "not valid JSON"),
    (b'{"session_id": "h-1", "reward": 1, "metadata": {"k": "\xff\xfe"}}', None, "not valid JSON"),
    # A surrogate encoded in UTF-8 bytes (CESU-8), not escaped.
    (b'{"session_id": "h-1", "reward": 1, "metadata": {"k": "\xed\xa0\x80"}}', "metadata", "metadata.k"),
    (b"[" * 100_000, None, "not valid JSON"),
]


def test_bad_reward_bodies_are_400s_that_store_nothing_on_one_connection(hostile, client, pg_url):
    first = client.get("/healthz")
    conn = connection_of(first)
    for path in ("/reward", "/sessions/h-1/reward", "/sessions/h-1/finish"):
        for raw, param, needle in REWARD_BODIES:
            if path != "/reward":
                raw = raw.replace(b'"session_id": "h-1", ', b"")
            if path.endswith("/finish"):
                raw = raw.replace(b'"reward": 1, ', b"")
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            err = assert_refused(r)
            if path == "/reward" or param not in ("session_id",):
                assert needle in err["message"], (path, raw[:80], err)
                if param is not None:
                    assert err["param"] == param, (path, raw[:80], err)
            assert connection_of(r) == conn, "an error answer must not cost the client its connection"
            assert client.get("/healthz").status_code == 200
    # Headers no database can take, sent as bytes (latin-1, the only way HTTP carries them).
    r = client.post(
        "/reward",
        content=b'{"session_id": "h-1", "reward": 1}',
        headers={"content-type": "application/json", "Idempotency-Key": "k" * 257},
    )
    assert assert_refused(r)["param"] == "Idempotency-Key"
    assert dbread.rewards(pg_url) == []
    # And the connection still takes a good reward.
    ok = client.post(
        "/reward",
        json={"session_id": "h-1", "reward": 1.0, "metadata": {"k": [1, "é", None]}, "idempotency_key": "fine"},
    )
    assert ok.status_code == 200, ok.text
    assert connection_of(ok) == conn
    assert [(r["session_id"], r["value"], r["metadata"]) for r in dbread.rewards(pg_url)] == [
        ("h-1", 1.0, {"k": [1, "é", None]})
    ]


def test_bad_ids_offsets_and_cursors_are_400s_on_one_connection(hostile, client):
    conn = connection_of(client.get("/healthz"))
    bad = [
        ("DELETE", f"/rewards/{2**63}"),
        ("DELETE", f"/rewards/{2**64 + 1}"),
        ("DELETE", f"/rewards/{-(2**63) - 1}"),
        ("DELETE", "/rewards/0"),
        ("DELETE", "/rewards/-1"),
        ("DELETE", "/rewards/1.5"),
        ("DELETE", "/rewards/x"),
        ("DELETE", "/rewards?source=a%00b"),
        ("DELETE", "/rewards?session_id=a%00b"),
        ("DELETE", "/rewards?source=" + "s" * 65),
        ("DELETE", "/rewards"),
        ("DELETE", "/rewards?source="),
        ("GET", "/calls/call%00x"),
        ("GET", "/sessions?task=a%00b"),
        ("GET", "/sessions?agent=%00"),
        ("GET", "/rewards?source=%00"),
        ("GET", "/stats?x=%00"),
    ]
    for path in ("/train/steps", "/policy/versions"):
        for value in (
            [2**31],
            [-(2**31) - 1],
            [2**63],
            [2**64 + 5],
            [-(2**63) - 1],
            ["x"],
            [1.5],
            [True],
            [None],
            [[1]],
            [{}],
            {},
            [1, 2],
            [],
            "x",
            10**30,
        ):
            bad.append(("GET", f"{path}?cursor={cursor(value)}"))
        for query in (
            "cursor=!!!",
            "cursor=%00",
            "cursor=" + quote("\u00e9\u20ac"),
            "cursor=" + "A" * 5000,
            f"offset={2**63}",
            "offset=-1",
            "offset=1e3",
            "offset=1.0",  # an integer only in decimal digits, as the document says
            "limit=0",
            f"limit={10**30}",
            "limit=x",
        ):
            bad.append(("GET", f"{path}?{query}"))
    for method, path in bad:
        r = client.request(method, path)
        assert_refused(r)
        assert connection_of(r) == conn, (method, path)
    # A cursor the API hands out still works, and the largest id is simply not there.
    assert client.get("/train/steps", params={"cursor": cursor([2**31 - 1])}).status_code == 200
    assert client.get("/policy/versions", params={"cursor": cursor([-(2**31)])}).status_code == 200
    assert_refused(client.delete(f"/rewards/{2**63 - 1}"), 404)


def test_get_on_the_post_only_session_paths_is_405_not_a_session_id(hostile, client):
    for path in ("/sessions/0/finish", "/sessions/0/reward", "/sessions/a/b/finish"):
        r = client.get(path)
        err = assert_refused(r, 405)
        assert r.headers["allow"] == "POST" and err["type"] == "invalid_request_error"
        # Without the key too: the method is wrong whoever asks.
        assert httpx.get(f"{hostile.url}{path}").status_code == 405
    # A session whose id ends in "finish" is still readable.
    chat(hostile, "ends-in-finish")
    assert client.get("/sessions/ends-in-finish").status_code in (200, 404)
    assert client.post("/sessions/0/finish").status_code == 200


def test_metrics_need_the_admin_key_and_name_no_upstream(start_proxy, upstream, pg_url, tmp_path):
    p = start(start_proxy, upstream, pg_url, tmp_path, "--admin-key", ADMIN)
    chat(p, "m-1")
    r = httpx.get(f"{p.url}/metrics")
    assert_refused(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"
    assert_refused(httpx.get(f"{p.url}/metrics", headers={"Authorization": "Bearer nope"}), 401)
    r = httpx.get(f"{p.url}/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'trainwire_policy_version{upstream="0"}' in r.text
    assert upstream.url not in r.text and "127.0.0.1" not in r.text
    p.stop()
    public = start(start_proxy, upstream, pg_url, tmp_path, "--admin-key", ADMIN, "--metrics-public")
    r = httpx.get(f"{public.url}/metrics")
    assert r.status_code == 200 and "trainwire_requests" in r.text and upstream.url not in r.text
    assert_refused(httpx.get(f"{public.url}/stats"), 401)  # only /metrics is public


# --- property: whatever JSON a reward body holds -------------------------------------------------------------

# Text with what JSON parsers let through: NUL, lone surrogates, non-BMP characters, separators.
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(
    ["", "\x00", "a\x00", "\ud800", "x\udfff", "h-1", "sess-ok", "air:truncated:x", "call_x", "a" * 300, "é/ü"]
)
NUMBERS = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, -0.0, 1e12, 1e12 + 1, 2**63, -(2**63) - 1, 10**400, 1e-320])
)
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8
)
FIELDS = ("session_id", "reward", "call_id", "final", "idempotency_key", "metadata")
IDS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,20}\Z")
# Bodies that are nearly right (a valid session and reward, then any value in the optional fields: most of what is
# accepted comes from here), and bodies of anything at all.
NEARLY = st.fixed_dictionaries(
    {"session_id": IDS, "reward": NUMBERS | st.floats(-1e12, 1e12)},
    optional={
        "final": JSON,
        "idempotency_key": TEXT | IDS,
        "metadata": st.dictionaries(TEXT, JSON, max_size=3),
        "call_id": TEXT,
    },
)
BODIES = NEARLY | st.dictionaries(st.sampled_from(FIELDS) | TEXT, JSON, max_size=6) | JSON


def _encode(value) -> bytes:
    """As a hostile client sends it: the stdlib encoder writes NaN/Infinity literals, escapes lone surrogates
    (\\ud800) and prints integers of any size."""
    return json.dumps(value, allow_nan=True).encode()


def test_fuzzed_reward_bodies_never_500_and_refusals_store_nothing(hostile, pg_url):
    accepted: set[int] = set()
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=hostile.url, headers=J, timeout=30) as client:
        conn = connection_of(client.get("/healthz"))

        @given(
            body=BODIES, path=st.sampled_from(["/reward", "/reward", "/sessions/h-2/reward", "/sessions/h-3/finish"])
        )
        @settings(
            max_examples=200,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def post_one(body, path):
            r = client.post(path, content=_encode(body))
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, body, r.text)
            assert connection_of(r) == conn
            if r.status_code == 200:
                answer = r.json()
                assert answer["value"] is None or math.isfinite(answer["value"])
                if not answer["duplicate"]:
                    accepted.add(answer["id"])
            else:
                assert_refused(r, (400, 404, 409, 422))

        post_one()
    print("reward fuzz statuses:", statuses)
    assert {r["id"] for r in dbread.rewards(pg_url)} == accepted, statuses
    assert statuses.get(400, 0) > 50 and statuses.get(200, 0) > 10, statuses  # both kinds, many of each


def test_fuzzed_admin_parameters_never_500(hostile):
    values = TEXT | NUMBERS.map(str) | JSON.map(cursor)
    with httpx.Client(base_url=hostile.url, headers=AUTH, timeout=30) as client:
        conn = connection_of(client.get("/healthz"))

        @given(
            route=st.sampled_from(["/train/steps", "/policy/versions", "/rewards", "/rewards/{id}"]),
            params=st.dictionaries(
                st.sampled_from(["cursor", "limit", "offset", "source", "session_id"]), values, max_size=3
            ),
            rid=values,
        )
        @settings(
            max_examples=200,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def one(route, params, rid):
            method = "DELETE" if route.startswith("/rewards") else "GET"
            # Dots too: httpx would resolve "/rewards/.." as a relative path.
            path = route.replace(
                "{id}", quote(rid.encode("utf-8", "surrogatepass"), safe="").replace(".", "%2E") or "0"
            )
            query = "&".join(f"{k}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in params.items())
            r = client.request(method, f"{path}?{query}" if query else path)
            assert r.status_code < 500, (method, path, params, r.text)
            if r.status_code != 200:
                assert_refused(r, (400, 404))
            assert connection_of(r) == conn

        one()


# --- the database goes away --------------------------------------------------------------------------------------


def test_database_down_is_a_503_with_retry_after_and_the_same_post_works_after(start_proxy, upstream, tmp_path):
    with PgCluster() as own:
        url = own.create_database("downtest")
        upgrade_head(url)
        proxy = start(start_proxy, upstream, url, tmp_path, "--admin-key", ADMIN)
        with httpx.Client(base_url=proxy.url, headers=AUTH, timeout=60) as client:
            conn = connection_of(client.get("/healthz"))
            own._run(_bin("pg_ctl"), "-D", str(own.data), "-m", "fast", "stop")
            body = {"session_id": "down-1", "reward": 0.5, "idempotency_key": "down-once"}
            for method, path, payload in [
                ("POST", "/reward", body),
                ("POST", "/sessions/down-2/reward", {"reward": 1}),
                ("POST", "/sessions/down-3/finish", None),
                ("GET", "/sessions", None),
                ("GET", "/sessions/down-1", None),
                ("GET", "/rewards", None),
                ("GET", "/stats", None),
                ("DELETE", "/rewards/1", None),
                ("DELETE", "/rewards?source=user", None),
                ("GET", "/train/steps", None),
                ("GET", "/policy/versions", None),
                ("POST", "/reward", body),
            ]:
                r = client.request(method, path, json=payload)
                err = assert_refused(r, 503)
                assert err["type"] == "service_unavailable" and int(r.headers["retry-after"]) > 0, (path, err)
                assert connection_of(r) == conn, path
            opts = f"-p {own.port} -k {own.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            own._run(_bin("pg_ctl"), "-D", str(own.data), "-o", opts, "-l", str(own.dir / "log"), "-w", "start")
            r = client.post("/reward", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["duplicate"] is False and connection_of(r) == conn
            assert client.post("/reward", json=body).json()["duplicate"] is True
        proxy.stop()
        log = proxy.log_path.read_text(errors="replace")
        warnings = [line for line in log.splitlines() if "the database is unavailable" in line]
        assert any("WARNING" in line and "POST /reward" in line for line in warnings), log[-3000:]
        assert "unexpected error serving" not in log  # expected, so no traceback: a WARNING line each
        assert [r["idempotency_key"] for r in dbread.rewards(url)] == ["down-once"]
