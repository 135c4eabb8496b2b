"""The dashboard, rendered by a real headless Chromium against a real `trainwire serve` on Postgres: sessions
recorded with the OpenAI SDK, rewards posted over HTTP, train steps and policy versions written the way the
trainer writes them. Also the JSON endpoints the page reads (/train/steps, /policy/versions)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from html.parser import HTMLParser
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import insert, update

from tests.support import dbread
from tests.support.apihelpers import TOOLS, assert_openai_error, chat, get, post, start, wait_for
from tests.support.proxyproc import ProxyProcess
from tests.support.scripted_upstream import ScriptedUpstream
from trainwire.store.db import make_engine
from trainwire.store.migrate import upgrade_head
from trainwire.store.models import Session, TrainStep
from trainwire.store.policy import record_publish

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
ADMIN = "dash-admin-key-123"

STEPS = [  # step, policy version, metrics (what rl/worker.py writes, abridged)
    (1, 1, {"loss": 0.8123, "grad_norm": 1.5, "reward/mean": 0.5, "reward/std": 0.5, "time/train_s": 2.25}),
    (
        2,
        2,
        {
            "loss": 0.6042,
            "grad_norm": 1.25,
            "reward/mean": 0.25,
            "reward/std": 0.1,
            "time/train_s": 2.5,
            "agreement/mean_abs_dlogp": 2e-6,
            "agreement/max_abs_dlogp": 4e-6,
            "agreement/tokens": 120.0,
            "sessions/trained": 8.0,
            "sessions/dropped_stale": 0.0,
            "staleness/sessions_0": 8.0,
        },
    ),
    (
        3,
        3,
        {
            "loss": 0.4417,
            "grad_norm": 0.75,
            "reward/mean": 0.75,
            "reward/std": 0.2,
            "time/train_s": 2.75,
            "agreement/mean_abs_dlogp": 3e-6,
            "agreement/max_abs_dlogp": 4.5e-6,
            "agreement/tokens": 96.0,
            "batch/skipped_sampling": 2.0,
            "batch/skipped_untrainable": 1.0,
            "sessions/trained": 6.0,
            "sessions/dropped_stale": 2.0,
            "staleness/sessions_0": 4.0,
            "staleness/sessions_2": 2.0,
            "offpolicy/is_mean": 0.95,
            "offpolicy/is_max": 2.0,
            "offpolicy/truncated_share": 0.0125,
        },
    ),
]
SESSIONS_NEWEST_FIRST = ["batch-7/ui-eps", "ui-delta", "ui-gamma", "ui-beta", "ui-alpha"]


# --- the DOM as Chromium serialized it ---------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: "Node | None") -> None:
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list["Node"]:
        def match(n: Node) -> bool:
            if tag and n.tag != tag:
                return False
            for k, v in attrs.items():
                k = k.rstrip("_").replace("_", "-")
                if k == "class":
                    if v not in (n.attrs.get("class") or "").split():
                        return False
                elif n.attrs.get(k) != v:
                    return False
            return True

        return [n for n in self.iter() if match(n)]

    def by_id(self, id_: str) -> "Node":
        found = self.find_all(id=id_)
        assert found, f"no element #{id_}"
        return found[0]

    @property
    def hidden(self) -> bool:
        return "hidden" in self.attrs


class Dom(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {}, None)
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, dict(attrs), self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def chromium(url: str, tmp_path: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-{uuid.uuid4().hex[:8]}"
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def render(url: str, tmp_path: Path) -> Node:
    out = chromium(url, tmp_path, "--dump-dom")
    assert out.returncode == 0 and "<html" in out.stdout, (out.returncode, out.stderr[-2000:])
    return Dom(out.stdout).root


# --- a proxy with some history -----------------------------------------------------------------------------


def _wait_version(proxy: ProxyProcess, upstream: ScriptedUpstream, version: int) -> None:
    # The upstream label is its index in --upstream order (older proxies: its URL).
    lines = [f'trainwire_policy_version{{upstream="{label}"}} {float(version)}' for label in ("0", upstream.url)]
    wait_for(
        lambda: any(line in httpx.get(f"{proxy.url}/metrics", timeout=5).text for line in lines),
        15,
        what=f"proxy serving v{version}",
    )


def _client(proxy: ProxyProcess, session: str, agent: str, task: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=proxy.v1,
        api_key="unused",
        max_retries=0,
        default_headers={"X-Session-Id": session, "X-Agent-Name": agent, "X-Task-Id": task},
    )


def _ask(proxy, session: str, agent: str, task: str, content: str):
    raw = _client(proxy, session, agent, task).chat.completions.with_raw_response.create(
        model="policy", messages=[{"role": "user", "content": content}]
    )
    return raw


def _reward(proxy, body: dict, key: str | None = None) -> dict:
    r = post(proxy, "/reward", body, headers={"Authorization": f"Bearer {key}"} if key else None)
    assert r.status_code == 200, r.text
    return r.json()


def populate(proxy: ProxyProcess, upstream: ScriptedUpstream, db_url: str) -> dict:
    """Five sessions over policy versions 0, 1 and 2 (v3 published to no upstream), six calls, rewards
    (one intermediate, one orphaned), three train steps; ui-alpha trained by step 1."""
    upstream.adapters += ["policy-v1", "policy-v2"]

    async def publish(version: int, reached: bool) -> None:  # what the trainer does after a step
        engine = make_engine(db_url)
        await record_publish(
            engine,
            version=version,
            kind="lora",
            served_model=f"policy-v{version}",
            path=f"/ckpt/v{version}",
            train_step=version,
            reached=[upstream.url] if reached else [],
            failed=[] if reached else [upstream.url],
        )
        await engine.dispose()

    # v0: a tool-using episode of two calls, and a one-call episode
    upstream.script(tool_calls=[{"name": "calculator", "arguments": '{"expr": "2+2"}'}])
    upstream.script(text="The answer is 4.")
    c = _client(proxy, "ui-alpha", "planner", "t-math")
    first = c.chat.completions.with_raw_response.create(
        model="policy", tools=TOOLS, messages=[{"role": "user", "content": "What is 2+2?"}]
    )
    tc = first.parse().choices[0].message.tool_calls[0]
    c.chat.completions.create(
        model="policy",
        tools=TOOLS,
        messages=[
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
            {"role": "tool", "tool_call_id": tc.id, "content": "4"},
        ],
    )
    upstream.script(text="Roses are red.")
    _ask(proxy, "ui-beta", "critic", "t-poem", "Write a poem")
    _reward(proxy, {"session_id": "ui-alpha", "call_id": first.headers["x-call-id"], "reward": 0.2})
    _reward(proxy, {"session_id": "ui-alpha", "reward": 1.0})
    _reward(proxy, {"session_id": "ui-beta", "reward": 0.0})

    asyncio.run(publish(1, True))
    _wait_version(proxy, upstream, 1)
    upstream.script(text="Six.")
    assert _ask(proxy, "ui-gamma", "planner", "t-math", "What is 3+3?").headers["x-policy-version"] == "1"
    _reward(proxy, {"session_id": "ui-gamma", "reward": 0.25})

    asyncio.run(publish(2, True))
    _wait_version(proxy, upstream, 2)
    upstream.script(text="Violets are blue.")
    _ask(proxy, "ui-delta", "critic", "t-poem", "Another poem")
    _reward(proxy, {"session_id": "ui-delta", "reward": 0.75})
    upstream.script(text="Still thinking.")
    _ask(proxy, "batch-7/ui-eps", "planner", "t-math", "What is 9*9?")
    assert _reward(proxy, {"session_id": "ui-ghost", "reward": 1.0})["orphaned"] is True
    asyncio.run(publish(3, False))  # a publish that reached no upstream: recorded as partial

    async def trainer_rows() -> None:
        engine = make_engine(db_url)
        async with engine.begin() as conn:
            for step, version, metrics in STEPS:
                await conn.execute(
                    insert(TrainStep.__table__).values(
                        step=step, policy_version=version, n_sessions=2, n_samples=3 * step, metrics=metrics
                    )
                )
            await conn.execute(
                update(Session.__table__).where(Session.id == "ui-alpha").values(status="trained", train_step=1)
            )
        await engine.dispose()

    asyncio.run(trainer_rows())
    assert len(dbread.wait_calls(db_url, 6)) == 6
    return {"alpha_first_call": first.headers["x-call-id"]}


@pytest.fixture(scope="module")
def dash(pg, tmp_path_factory):
    """One populated proxy shared by the read-only tests below (each test only reads)."""
    tmp = tmp_path_factory.mktemp("dash")
    url = pg.create_database("t_" + uuid.uuid4().hex[:12])
    upgrade_head(url)
    upstream = ScriptedUpstream().start()
    proxy = ProxyProcess(
        ["--upstream", upstream.url, "--database-url", url, "--journal-dir", str(tmp / "journal")],
        log_path=tmp / "proxy.log",
    ).start()
    try:
        info = populate(proxy, upstream, url)
        yield proxy, info
    finally:
        proxy.stop()
        upstream.stop()


# --- tests -------------------------------------------------------------------------------------------------


@needs_chromium
def test_dashboard_renders_counts_charts_steps_and_sessions(dash, tmp_path):
    proxy, _ = dash
    stats = get(proxy, "/stats").json()
    dom = render(f"{proxy.url}/ui", tmp_path)

    assert not dom.by_id("main").hidden and dom.by_id("auth").hidden and dom.by_id("error").hidden
    counts = {n.attrs["id"]: n.text() for n in dom.by_id("counts").find_all("dd")}
    expected = {
        "n-sessions-total": 5,
        "n-sessions-open": 1,
        "n-sessions-finished": 3,
        "n-sessions-trained": 1,
        "n-sessions-claimed": 0,
        "n-sessions-skipped": 0,
        "n-calls-total": 6,
        "n-calls-failed": 0,
        "n-calls-untrainable": 0,
        "n-api-chat": 6,
        "n-rewards-total": 6,
        "n-rewards-final": 5,
        "n-rewards-intermediate": 1,
        "n-orphaned": 1,
        "n-orphaned-sessions": 1,
        "n-queue-calls": 0,
        "n-queue-rewards": 0,
    }
    assert {k: counts[k] for k in expected} == {k: str(v) for k, v in expected.items()}
    assert stats["sessions"]["total"] == 5 and stats["calls"]["total"] == 6 and stats["orphaned_rewards"] == 1

    # one point per policy version, at the mean /stats reports
    by_version = stats["reward_by_policy_version"]
    assert [(v["policy_version"], v["mean"]) for v in by_version] == [(0, 0.5), (1, 0.25), (2, 0.75)]
    points = dom.by_id("chart-versions").find_all("circle", class_="pt")
    assert [(p.attrs["data-version"], float(p.attrs["data-mean"])) for p in points] == [
        ("0", 0.5),
        ("1", 0.25),
        ("2", 0.75),
    ]
    assert [p.find_all("title")[0].text() for p in points][1] == "v1: mean 0.25 over 1 rewarded of 1 sessions"
    assert dom.by_id("chart-versions").find_all("polyline")
    for chart in ("chart-reward", "chart-loss"):
        svg = dom.by_id(chart).find_all("svg")
        assert svg and [p.attrs["data-step"] for p in svg[0].find_all("circle", class_="pt")] == ["1", "2", "3"]
        assert svg[0].find_all("polyline")
    assert dom.by_id("chart-reward").find_all("polygon", class_="band")  # the ± std band

    steps = dom.by_id("steps-table").find_all("tbody")[0].find_all("tr")
    assert [r.attrs["data-step"] for r in steps] == ["3", "2", "1"]  # newest first
    assert [td.text() for td in steps[0].find_all("td")][:12] == [
        "3",
        "3",
        "2",
        "9",
        "0.4417",
        "0.75",
        "0.75",
        "0.2",
        "3.00e-6",
        "4.50e-6",
        "2 / 1",
        "2.75",
    ]
    assert [td.text() for td in steps[2].find_all("td")][8:11] == ["—", "—", "0 / 0"]  # step 1 did not measure
    # train-inference agreement: only the steps that measured it, one series for the mean and one for the max
    agreement = dom.by_id("chart-agreement").find_all("circle", class_="pt")
    assert sorted((p.attrs["data-metric"], p.attrs["data-step"]) for p in agreement) == [
        ("max_abs_dlogp", "2"),
        ("max_abs_dlogp", "3"),
        ("mean_abs_dlogp", "2"),
        ("mean_abs_dlogp", "3"),
    ]
    # every y tick label fits left of the axis (they read ".00e-6" when the margin was fixed): 12px text is at
    # most ~7px per character, and the label ends 6px left of the axis
    ticks = [t for t in dom.by_id("chart-agreement").find_all("text", class_="tick") if "e-" in t.text()]
    assert ticks and all(float(t.attrs["x"]) >= 7 * len(t.text()) for t in ticks), [
        (t.text(), t.attrs["x"]) for t in ticks
    ]
    # off-policy training: sessions trained and dropped per step, the staleness histogram, the IS weights
    assert [td.text() for td in steps[0].find_all("td")][12:15] == ["6 / 2", "0:4 2:2", "0.95 / 2 / 1.25%"]
    assert [td.text() for td in steps[1].find_all("td")][12:15] == ["8 / 0", "0:8", "—"]
    assert [td.text() for td in steps[2].find_all("td")][12:15] == ["—", "—", "—"]
    sessions = dom.by_id("chart-sessions").find_all("circle", class_="pt")
    assert sorted((p.attrs["data-metric"], p.attrs["data-step"]) for p in sessions) == [
        ("dropped", "2"),
        ("dropped", "3"),
        ("trained", "2"),
        ("trained", "3"),
    ]
    weights = dom.by_id("chart-is").find_all("circle", class_="pt")
    assert sorted((p.attrs["data-metric"], p.attrs["data-step"]) for p in weights) == [("max", "3"), ("mean", "3")]
    # the write path: database answering, nothing refused
    assert counts["n-db-state"] == "answering" and counts["n-rejected"] == "0"
    # the training backlog (rewarded, not yet claimed: beta, gamma, delta), admission control off
    assert (counts["n-backlog"], counts["n-max-backlog"], counts["n-refused"]) == ("3", "off", "0")
    assert not dom.find_all(id="rejected-note")
    versions = [[td.text() for td in tr.find_all("td")] for tr in dom.by_id("versions-table").find_all("tr")[1:]]
    assert [v[:5] for v in versions] == [
        ["3", "lora", "policy-v3", "3", "partial"],
        ["2", "lora", "policy-v2", "2", "published"],
        ["1", "lora", "policy-v1", "1", "published"],
    ]
    assert versions[1][5] == proxy_upstream(proxy) and versions[0][5] == "—"

    rows = dom.by_id("sessions-table").find_all("tbody")[0].find_all("tr")
    assert [r.attrs["data-session"] for r in rows] == SESSIONS_NEWEST_FIRST
    cells = {r.attrs["data-session"]: [td.text() for td in r.find_all("td")] for r in rows}
    # session, status, task, agents, calls, failed calls, untrainable calls, final reward
    assert cells["ui-alpha"][:8] == ["ui-alpha", "trained", "t-math", "planner", "2", "0", "0", "1"]
    assert cells["ui-gamma"][:8] == ["ui-gamma", "finished", "t-math", "planner", "1", "0", "0", "0.25"]
    assert cells["batch-7/ui-eps"][:8] == ["batch-7/ui-eps", "open", "t-math", "planner", "1", "0", "0", "—"]
    assert rows[0].find_all("a")[0].attrs["href"] == "#session=batch-7%2Fui-eps"
    assert dom.by_id("page-info").text() == "page 1 · 5 sessions"
    assert "disabled" in dom.by_id("page-older").attrs and "disabled" in dom.by_id("page-newer").attrs
    assert dom.by_id("detail").hidden

    # and it paints: a full-page screenshot (kept in tmp_path for a look when this test fails)
    out = chromium(
        f"{proxy.url}/ui",
        tmp_path,
        "--window-size=1280,1600",
        "--hide-scrollbars",
        f"--screenshot={tmp_path / 'dashboard.png'}",
    )
    png = (tmp_path / "dashboard.png").read_bytes() if (tmp_path / "dashboard.png").exists() else b""
    assert png.startswith(b"\x89PNG") and len(png) > 20_000, (out.returncode, out.stderr[-2000:])


def proxy_upstream(proxy: ProxyProcess) -> str:
    return proxy.args[proxy.args.index("--upstream") + 1]


@needs_chromium
def test_session_detail_shows_its_calls_in_order(dash, tmp_path):
    proxy, info = dash
    api = get(proxy, "/sessions/ui-alpha").json()
    dom = render(f"{proxy.url}/ui#session=ui-alpha", tmp_path)

    detail = dom.by_id("detail")
    assert not detail.hidden and dom.by_id("detail-id").text() == "ui-alpha"
    calls = detail.find_all("li", class_="call")
    assert [c.attrs["data-call"] for c in calls] == [c["id"] for c in api["calls"]]
    assert calls[0].attrs["data-call"] == info["alpha_first_call"]
    first, second = calls[0].text(), calls[1].text()
    for needle in (
        "#0",
        "planner",
        "v0",
        "finish: tool_calls",
        "HTTP 200",
        "input · user",
        "What is 2+2?",
        "0.2 · user",
        "chat",
        "tools offered: calculator, search",
        "whole input · 1 message",
    ):
        assert needle in first, (needle, first)
    tokens = calls[0].find_all("span", class_="tokens")[0].text()
    assert tokens == f"{api['calls'][0]['prompt_tokens']} → {api['calls'][0]['completion_tokens']} tokens"
    assert not calls[0].find_all(class_="untrained") and not calls[0].find_all(class_="untrained-why")
    # the whole input of the second call, folded: the question, the tool call, the tool's result
    whole = calls[1].find_all("details", class_="input-all")[0]
    assert "open" not in whole.attrs and whole.find_all("summary")[0].text() == "whole input · 3 messages"
    msgs = [m.find_all("div", class_="label")[0].text() for m in whole.find_all("li", class_="msg")]
    assert msgs[0] == "user" and msgs[1] == "assistant" and msgs[2].startswith("tool (")
    assert whole.find_all("li", class_="tool-call")[0].text().startswith('calculator {"expr": "2+2"}')
    tool = calls[0].find_all("li", class_="tool-call")
    assert [t.text() for t in tool] == ['calculator {"expr": "2+2"}']
    for needle in ("#1", "finish: stop", "input · tool", "The answer is 4.", "4"):
        assert needle in second, (needle, second)
    # the earlier turn shows only in the second call's folded whole input
    assert "The answer is 4." not in first and "What is 2+2?" not in second.replace(whole.text(), "")
    head = detail.text()
    assert "trained" in head and "final reward 1" in head and "train step 1" in head and "final 1 · user" in head
    # the selected session is highlighted in the list below
    assert dom.find_all("tr", data_session="ui-alpha")[0].attrs.get("class") == "sel"

    # an id with a slash, and an id nothing was recorded for
    dom = render(f"{proxy.url}/ui#session=batch-7%2Fui-eps", tmp_path)
    assert dom.by_id("detail-id").text() == "batch-7/ui-eps" and "Still thinking." in dom.by_id("detail").text()
    assert "v2" in dom.by_id("detail").text()


@needs_chromium
def test_sessions_filters_and_page_size_come_from_the_url(dash, tmp_path):
    proxy, _ = dash
    dom = render(f"{proxy.url}/ui#status=finished&agent=critic&size=1", tmp_path)
    rows = dom.by_id("sessions-table").find_all("tbody")[0].find_all("tr")
    assert [r.attrs["data-session"] for r in rows] == ["ui-delta"]  # of ui-delta and ui-beta, the newest
    assert dom.by_id("page-info").text() == "page 1 · 1 session"
    assert "disabled" not in dom.by_id("page-older").attrs and "disabled" in dom.by_id("page-newer").attrs
    # links to a session keep the filters
    assert rows[0].find_all("a")[0].attrs["href"] == "#status=finished&agent=critic&size=1&session=ui-delta"
    assert dom.by_id("n-sessions-total").text() == "5"  # the counts are not filtered


@needs_chromium
def test_admin_key_prompt_401_and_key_from_fragment(start_proxy, upstream, pg_url, tmp_path):
    proxy = start(start_proxy, upstream, pg_url, tmp_path, "--admin-key", ADMIN)
    assert chat(proxy, "secret-session", "private text").status_code == 200
    dbread.wait_calls(pg_url, 1)
    assert_openai_error(get(proxy, "/train/steps"), 401, "admin key")
    assert_openai_error(get(proxy, "/policy/versions"), 401, "admin key")

    dom = render(f"{proxy.url}/ui", tmp_path)
    assert not dom.by_id("auth").hidden and dom.by_id("main").hidden
    message = dom.by_id("auth-message").text()
    assert "401 Unauthorized" in message and "requires an admin key" in message, message
    assert dom.by_id("auth-key").attrs["type"] == "password"
    html = "".join(n.text() for n in dom.find_all("main"))
    assert "secret-session" not in html and not dom.by_id("counts").find_all("dd")

    dom = render(f"{proxy.url}/ui#key=wrong-key", tmp_path)
    assert not dom.by_id("auth").hidden and "the key was refused" in dom.by_id("auth-message").text()
    assert not dom.find_all("tr", data_session="secret-session")

    dom = render(f"{proxy.url}/ui#key={ADMIN}", tmp_path)
    assert dom.by_id("auth").hidden and not dom.by_id("main").hidden
    assert [r.attrs["data-session"] for r in dom.find_all("tr", data_session="secret-session")] == ["secret-session"]
    assert dom.by_id("n-calls-total").text() == "1" and not dom.by_id("forget-key").hidden


def test_static_files_redirects_and_packaging(dash):
    proxy, _ = dash
    r = httpx.get(f"{proxy.url}/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "ui"
    r = httpx.get(f"{proxy.url}/", follow_redirects=True)
    assert r.status_code == 200 and str(r.url) == f"{proxy.url}/ui" and "<title>trainwire</title>" in r.text
    assert httpx.get(f"{proxy.url}/ui/", follow_redirects=True).url == f"{proxy.url}/ui"
    for name, ctype in (("app.js", "text/javascript"), ("app.css", "text/css")):
        r = httpx.get(f"{proxy.url}/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype) and len(r.content) > 1000
    assert_openai_error(httpx.get(f"{proxy.url}/ui/nope.js"), 404, "nope.js")
    page = httpx.get(f"{proxy.url}/ui").text
    assert "http://" not in page and "https://" not in page  # works offline: nothing from elsewhere
    js = httpx.get(f"{proxy.url}/ui/app.js").text
    assert "innerHTML" not in js and "https://" not in js

    import tomllib

    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert "ui/*" in pyproject["tool"]["setuptools"]["package-data"]["trainwire.proxy"]
    assert sorted(p.name for p in (root / "proxy" / "ui").iterdir()) == ["app.css", "app.js", "index.html"]


def test_train_steps_and_policy_versions_json(dash):
    proxy, _ = dash
    body = get(proxy, "/train/steps").json()
    assert body["object"] == "list" and body["has_more"] is False and body["next_cursor"] is None
    assert [(s["step"], s["policy_version"], s["n_sessions"], s["n_samples"]) for s in body["data"]] == [
        (3, 3, 2, 9),
        (2, 2, 2, 6),
        (1, 1, 2, 3),
    ]
    assert body["data"][0]["metrics"] == STEPS[2][2] and body["data"][0]["object"] == "train_step"
    assert body["data"][0]["created_at"].endswith("Z")

    pages, cursor = [], None
    while True:
        page = get(proxy, "/train/steps", limit=2, cursor=cursor).json()
        pages.append([s["step"] for s in page["data"]])
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert pages == [[3, 2], [1]]
    assert [s["step"] for s in get(proxy, "/train/steps", limit=1, offset=1).json()["data"]] == [2]
    assert_openai_error(get(proxy, "/train/steps", cursor="garbage"), 400, "cursor")
    assert_openai_error(get(proxy, "/train/steps", limit=0), 400, "limit")

    body = get(proxy, "/policy/versions").json()
    assert [
        (v["version"], v["status"], v["train_step"], v["served_model"], v["serving_upstreams"]) for v in body["data"]
    ] == [
        (3, "partial", 3, "policy-v3", []),
        (2, "published", 2, "policy-v2", [proxy_upstream(proxy)]),
        (1, "published", 1, "policy-v1", []),
    ]
    assert body["data"][0]["kind"] == "lora" and body["data"][0]["path"] == "/ckpt/v3"
    page = get(proxy, "/policy/versions", limit=2).json()
    assert [v["version"] for v in page["data"]] == [3, 2] and page["has_more"]
    page = get(proxy, "/policy/versions", limit=2, cursor=page["next_cursor"]).json()
    assert [v["version"] for v in page["data"]] == [1] and not page["has_more"]


# --- every API, and the calls that will not be trained ---------------------------------------------------------

HOSTILE_TEXT = '<img src=x onerror="document.title=1"><script>document.title=2</script>'


def _apis_rows() -> list[dict]:
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)

    def row(i: int, session: str, **kw) -> dict:
        base = {
            "id": f"ui-call-{i}",
            "session_id": session,
            "seq": i,
            "kind": "chat",
            "path": "/v1/chat/completions",
            "status_code": 200,
            "started_at": t0 + timedelta(seconds=i),
            "finished_at": t0 + timedelta(seconds=i),
            "model_requested": "policy",
            "agent_name": "solver",
            "request": {"messages": [{"role": "user", "content": "hi"}]},
            "response": {"choices": [{"message": {"role": "assistant", "content": "ok"}}]},
            "prompt_token_ids": [1, 2, 3],
            "completion_token_ids": [4, 5],
            "logprobs": [-0.5, -0.25],
        }
        return {**base, **kw}

    return [
        row(
            0,
            "ui-apis",
            stream=True,
            request={
                "messages": [
                    {"role": "system", "content": "You are a solver."},
                    {"role": "user", "content": HOSTILE_TEXT},
                ],
                "tools": TOOLS,
            },
        ),
        row(
            1,
            "ui-apis",
            kind="responses",
            path="/v1/responses",
            request={
                "instructions": "You are terse.",
                "tools": [{"type": "function", "name": "get_weather"}],
                "input": [
                    {"role": "user", "content": "Weather?"},
                    {"type": "function_call", "call_id": "fc_1", "name": "get_weather", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "fc_1", "output": "sunny"},
                ],
            },
            response={
                "object": "response",
                "output": [
                    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]}
                ],
            },
        ),
        row(
            2,
            "ui-apis",
            kind="messages",
            path="/v1/messages",
            request={
                "system": "You are a calculator.",
                "tools": [{"name": "calc", "input_schema": {"type": "object"}}],
                "messages": [{"role": "user", "content": "2+2?"}],
            },
            response={"type": "message", "content": [{"type": "text", "text": "4"}]},
        ),
        row(
            3,
            "ui-apis",
            status_code=502,
            error="upstream down",
            response=None,
            prompt_token_ids=None,
            completion_token_ids=None,
            logprobs=None,
        ),
        row(
            4,
            "ui-apis",
            sampling={"requested": {"temperature": 0.7}, "effective": {"temperature": 0.7}},
            untrainable_reason="sampling: temperature 0.7 differs from the training value 1.0",
        ),
        row(5, "ui-clean"),
    ]


@needs_chromium
def test_each_call_shows_its_api_tokens_tools_whole_input_and_why_it_is_not_trained(
    start_proxy, upstream, pg_url, tmp_path
):
    proxy = start(start_proxy, upstream, pg_url, tmp_path)
    dbread.insert_calls(pg_url, _apis_rows())
    api = get(proxy, "/sessions/ui-apis").json()
    assert [c["train"]["trainable"] for c in api["calls"]] == [True, True, True, False, False]

    dom = render(f"{proxy.url}/ui#session=ui-apis", tmp_path)
    calls = dom.by_id("detail").find_all("li", class_="call")
    assert [c.attrs["data-call"] for c in calls] == [f"ui-call-{i}" for i in range(5)]
    head = lambda c: [m.text() for m in c.find_all("div", class_="call-head")[0].find_all("span", class_="meta")]  # noqa: E731
    chat_, responses_, messages_, failed, sampled = calls
    assert "chat" in head(chat_) and "stream" in head(chat_) and "3 → 2 tokens" in head(chat_)
    assert "responses" in head(responses_) and "stream" not in head(responses_)
    assert "messages" in head(messages_) and "no tokens" in head(failed)
    assert chat_.find_all("div", class_="offered")[0].text() == "tools offered: calculator, search"
    assert responses_.find_all("div", class_="offered")[0].text() == "tools offered: get_weather"
    assert messages_.find_all("div", class_="offered")[0].text() == "tools offered: calc"

    # the whole input, system prompt first, in a collapsed <details>; store text stays text
    def whole(c):
        box = c.find_all("details", class_="input-all")[0]
        assert "open" not in box.attrs
        return [(m.find_all("div", class_="label")[0].text(), m.text()) for m in box.find_all("li", class_="msg")]

    assert whole(chat_)[0] == ("system", "systemYou are a solver.") and whole(chat_)[1][1] == "user" + HOSTILE_TEXT
    assert not dom.find_all("img") and dom.find_all("title")[0].text() == "trainwire"
    assert [label for label, _ in whole(responses_)] == ["system", "user", "assistant", "tool (fc_1)"]
    assert whole(responses_)[0][1] == "systemYou are terse." and "sunny" in whole(responses_)[3][1]
    assert whole(messages_) == [("system", "systemYou are a calculator."), ("user", "user2+2?")]
    assert "Sunny." in responses_.text() and "4" in messages_.text()

    # not trained: marked, and why
    for c in (chat_, responses_, messages_):
        assert not c.find_all(class_="untrained") and not c.find_all(class_="untrained-why")
    assert failed.find_all("span", class_="untrained")[0].text() == "not trained"
    assert failed.find_all("div", class_="untrained-why")[0].text() == "not trained: failed upstream call (status 502)"
    assert (
        sampled.find_all("div", class_="untrained-why")[0].text()
        == "not trained: sampling: temperature 0.7 differs from the training value 1.0"
    )
    assert "1 failed · 2 untrainable" in dom.by_id("detail").find_all("p")[0].text()
    assert "null" not in dom.by_id("detail").text()  # a session without rewards shows no stray "null"

    # the list: failed and untrainable counts per session, and filters for them kept in the URL fragment
    rows = {
        r.attrs["data-session"]: [td.text() for td in r.find_all("td")]
        for r in dom.by_id("sessions-table").find_all("tbody")[0].find_all("tr")
    }
    assert rows["ui-apis"][4:7] == ["5", "1", "2"] and rows["ui-clean"][4:7] == ["1", "0", "0"]
    assert dom.by_id("n-calls-untrainable").text() == "2" and dom.by_id("n-calls-failed").text() == "1"
    assert {k: dom.by_id(f"n-api-{k}").text() for k in ("chat", "responses", "messages")} == {
        "chat": "4",
        "responses": "1",
        "messages": "1",
    }
    assert "checked" not in dom.by_id("f-failed").attrs and "checked" not in dom.by_id("f-untrainable").attrs

    dom = render(f"{proxy.url}/ui#has=untrainable", tmp_path)
    rows = dom.by_id("sessions-table").find_all("tbody")[0].find_all("tr")
    assert [r.attrs["data-session"] for r in rows] == ["ui-apis"]
    assert "checked" in dom.by_id("f-untrainable").attrs and "checked" not in dom.by_id("f-failed").attrs
    assert rows[0].find_all("a")[0].attrs["href"] == "#has=untrainable&session=ui-apis"
    dom = render(f"{proxy.url}/ui#has=failed,untrainable,bogus", tmp_path)
    assert [r.attrs["data-session"] for r in dom.by_id("sessions-table").find_all("tbody")[0].find_all("tr")] == [
        "ui-apis"
    ]
    assert "checked" in dom.by_id("f-failed").attrs and dom.by_id("error").hidden
