"""What the proxy does with each top-level field of a translated API's request: one table per API (data), and the
one function that applies it.

Every field is one of:

* `translated`: turned into its chat-completions equivalent by the API's translation module;
* `passed`: sent to vLLM's chat route under the same name (vLLM's sampling extensions agents send in `extra_body`);
* `ignored`: accepted, not sent, because it changes nothing the policy produces here (metadata, cache keys, storage
  hints, telemetry, reasoning settings of a model that has none). The answer names it in `X-Trainwire-Ignored`,
  the call's record keeps the list (`calls.sampling.ignored`), and a debug log line says so;
* `refused`: it would change what the agent gets and cannot be honoured here (server-side state, hosted tools):
  a 400 in the API's error format says why.

A field in no table (a client's new field, a vendor extension) is ignored by default, like a known ignored one:
the APIs gain such fields every few weeks, and refusing them stops every client that starts sending one.
`--unknown-fields refuse` refuses them instead. `tests/unit/test_proxy_api_fields.py` walks the `openai` and
`anthropic` SDKs' request types and fails when one of their fields has no class here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from trainwire.proxy.errors import ApiError

log = logging.getLogger("trainwire.fields")

UNKNOWN_FIELDS = ("ignore", "refuse")
HEADER = "X-Trainwire-Ignored"


class How(StrEnum):
    TRANSLATED = "translated"
    PASSED = "passed"
    IGNORED = "ignored"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Handling:
    how: How
    why: str  # for `refused`, the error message the client gets
    # When given, the class holds only for values it accepts; any other value asks for nothing the policy does not
    # do anyway (`store: false`, `background: false`, `thinking: {"type": "disabled"}`): accepted, not reported.
    applies: Callable[[Any], bool] | None = None

    def holds_for(self, value: Any) -> bool:
        return self.applies is None or self.applies(value)


def translated(why: str) -> Handling:
    return Handling(How.TRANSLATED, why)


def passed(why: str) -> Handling:
    return Handling(How.PASSED, why)


def ignored(why: str, applies: Callable[[Any], bool] | None = None) -> Handling:
    return Handling(How.IGNORED, why, applies)


def refused(why: str, applies: Callable[[Any], bool] | None = None) -> Handling:
    return Handling(How.REFUSED, why, applies)


@dataclass(frozen=True, slots=True)
class FieldTable:
    api: str  # as the error messages name it
    fields: Mapping[str, Handling]
    # Request headers with no effect here that clients send beside the body (Anthropic's `anthropic-beta`):
    # accepted, and named among the ignored when present.
    ignored_headers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, handling in self.fields.items():
            if not isinstance(handling, Handling):
                raise TypeError(f"{self.api} field {name!r} has no Handling")


@dataclass(frozen=True, slots=True)
class Screened:
    body: dict[str, Any]  # the fields the translation reads (translated and passed), nulls dropped
    ignored: tuple[str, ...] = field(default=())  # what was accepted and not acted on, in request order


def screen(
    body: dict[str, Any],
    table: FieldTable,
    *,
    unknown: str = "ignore",
    headers: Mapping[str, str] | None = None,
) -> Screened:
    """Sort a request's fields by `table`. Raises ApiError(400) for a refused field (or, with unknown='refuse', a
    field the table does not know), naming it."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_value")
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in body.items():
        if value is None:
            continue  # an explicit null is how SDKs say "not given"
        handling = table.fields.get(name)
        if handling is None:
            if unknown == "refuse":
                raise ApiError(
                    400,
                    f"Unsupported parameter: '{name}' (not a {table.api} parameter trainwire knows; the proxy "
                    "runs with --unknown-fields refuse)",
                    param=name,
                    code="unsupported_value",
                )
            dropped.append(_shown(name))
            continue
        if not handling.holds_for(value):
            continue  # a value that asks for nothing the policy does not do anyway (`store: false`)
        if handling.how is How.REFUSED:
            raise ApiError(400, handling.why, param=name, code="unsupported_value")
        elif handling.how is How.IGNORED:
            dropped.append(name)
        else:
            kept[name] = value
    if headers is not None:
        dropped.extend(h for h in table.ignored_headers if headers.get(h))
    if dropped:
        log.debug("%s request: ignored %s", table.api, ", ".join(dropped))
    return Screened(kept, tuple(dropped))


def header_value(names: list[str]) -> str:
    """`X-Trainwire-Ignored`: the names, comma-separated, bounded (a client may send thousands)."""
    if len(names) <= _HEADER_NAMES:
        return ",".join(names)
    return ",".join(names[:_HEADER_NAMES]) + f",...({len(names) - _HEADER_NAMES} more)"


_HEADER_NAMES = 32
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _shown(name: str) -> str:
    """A client's field name as a header and a record can carry it: plain names as they are, others escaped
    (a name is the client's text: it may hold commas, control characters, NUL or lone surrogates)."""
    if _PLAIN.fullmatch(name):
        return name
    return "".join(c if "!" <= c <= "~" and c != "," else f"\\u{ord(c):04x}" for c in name[:64])
