"""What each upstream serves, as the store reports it and the proxy keeps it: polling when the store has no
notifications (SQLite), failures of a refresh logged without ending the watch, routing from UpstreamServing."""

from __future__ import annotations

import asyncio
import logging
import types

from trainwire.proxy.policy import PolicyState
from trainwire.store.policy import UpstreamServing, watch_versions


def fake_engine(dialect: str = "sqlite"):
    return types.SimpleNamespace(dialect=types.SimpleNamespace(name=dialect))


async def test_polling_calls_back_and_survives_failures(caplog):
    calls = []

    async def on_change():
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("database down")

    with caplog.at_level(logging.ERROR, logger="trainwire.store.policy"):
        task = asyncio.create_task(watch_versions(fake_engine(), on_change, 0.01))
        for _ in range(200):
            if len(calls) >= 4:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    assert len(calls) >= 4  # the failing refresh did not stop the watch
    assert "policy refresh failed" in caplog.text and "database down" in caplog.text


def test_upstream_serving_compares_by_value():
    assert UpstreamServing(2, "policy-v2") == UpstreamServing(version=2, served_model="policy-v2")
    assert {"u": UpstreamServing(2, "a")} != {"u": UpstreamServing(3, "a")}


def test_policy_state_routes_from_what_upstreams_serve():
    state = PolicyState(fake_engine(), "base-model", 1.0)
    assert state.resolve("http://a") == ("base-model", 0)
    state.by_upstream = {"http://a": UpstreamServing(3, "policy-v3")}
    assert state.resolve("http://a") == ("policy-v3", 3)
    assert state.resolve("http://b") == ("base-model", 0)
    state.mark_missing("http://a")  # a restarted vLLM forgot the adapter: the base model until a new version
    assert state.resolve("http://a") == ("base-model", 0)
    state.by_upstream = {"http://a": UpstreamServing(4, "policy-v4")}
    assert state.resolve("http://a") == ("policy-v4", 4)
    state.mark_missing("http://nowhere")
    assert "http://nowhere" not in state.missing


def test_a_version_published_again_after_a_restart_is_served_again():
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    state = PolicyState(fake_engine(), "base-model", 1.0)
    state.by_upstream = {"http://a": UpstreamServing(3, "policy-v3", t0)}
    state.mark_missing("http://a")  # vLLM restarted: it answered 404 for policy-v3
    assert state.resolve("http://a") == ("base-model", 0)
    # The trainer loaded v3 into it again (store/serving.set_serving): same version and name, a new entry.
    state.by_upstream = {"http://a": UpstreamServing(3, "policy-v3", t0 + timedelta(seconds=40))}
    assert state.resolve("http://a") == ("policy-v3", 3)


async def test_refresh_sets_the_changed_event_only_on_a_change(monkeypatch):
    from trainwire.proxy import policy as proxy_policy

    served = {"http://a": UpstreamServing(1, "policy-v1")}

    async def fake_versions(engine):
        return dict(served)

    monkeypatch.setattr(proxy_policy, "upstream_versions", fake_versions)
    state = PolicyState(fake_engine(), "base", 1.0)
    first = state.changed
    await state.refresh()
    assert first.is_set() and state.by_upstream == served and not state.changed.is_set()
    second = state.changed
    await state.refresh()
    assert not second.is_set()  # nothing changed
    served["http://a"] = UpstreamServing(2, "policy-v2")
    await state.refresh()
    assert second.is_set() and state.resolve("http://a") == ("policy-v2", 2)
