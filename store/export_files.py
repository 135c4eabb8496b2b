"""The files `trainwire export` and `trainwire prune --archive-dir` write: their columns, JSONL and Parquet sinks,
and reading a JSONL export back. store/export.py says what each column holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

COLUMNS = [
    "call_id",
    "session_id",
    "seq",
    "task_id",
    "agent_name",
    "policy_version",
    "model_requested",
    "model_served",
    "route",
    "trainable",
    "kind",
    "stream",
    "started_at",
    "finish_reason",
    "aborted",
    "messages",
    "tools",
    "prompt",
    "response_text",
    "reasoning_content",
    "response_tool_calls",
    "prompt_token_ids",
    "completion_token_ids",
    "logprobs",
    "final_reward",
    "session_finished",
    "intermediate_reward",
    "reward",
    "rewards",
]
JSON_TEXT_IN_PARQUET = ("messages", "tools", "response_tool_calls", "request", "response")
# An archive (`trainwire prune --archive-dir`, store/retention.py): every column of the export, and the request
# and response as recorded (JSON text), so a pruned call of any API can be read back whole.
ARCHIVE_COLUMNS = [*COLUMNS, "request", "response"]


class ExportError(Exception):
    pass


class JsonlSink:
    def __init__(self, path: Path) -> None:
        self.f = path.open("wb")

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.f.write(b"".join(orjson.dumps(r, option=orjson.OPT_UTC_Z) + b"\n" for r in rows))

    def close(self) -> None:
        self.f.close()


def parquet_schema(columns: list[str] = COLUMNS):
    import pyarrow as pa

    reward = pa.struct([("id", pa.int64()), ("source", pa.string()), ("value", pa.float64()), ("final", pa.bool_())])
    types = {
        "seq": pa.int32(),
        "policy_version": pa.int32(),
        "trainable": pa.bool_(),
        "stream": pa.bool_(),
        "aborted": pa.bool_(),
        "started_at": pa.timestamp("us", tz="UTC"),
        "prompt_token_ids": pa.list_(pa.int32()),
        "completion_token_ids": pa.list_(pa.int32()),
        "logprobs": pa.list_(pa.float64()),
        "final_reward": pa.float64(),
        "session_finished": pa.bool_(),
        "intermediate_reward": pa.float64(),
        "reward": pa.float64(),
        "rewards": pa.list_(reward),
    }
    return pa.schema([(name, types.get(name, pa.string())) for name in columns])


class ParquetSink:
    def __init__(self, path: Path, columns: list[str] = COLUMNS) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ExportError("--format parquet needs pyarrow: pip install 'trainwire[export]'") from None
        self.columns = columns
        self.schema = parquet_schema(columns)
        self.writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        cols = {}
        for name in self.columns:
            values = [r[name] for r in rows]
            if name in JSON_TEXT_IN_PARQUET:
                values = [None if v is None else orjson.dumps(v).decode() for v in values]
            cols[name] = values
        self.writer.write_table(pa.Table.from_pydict(cols, schema=self.schema))

    def close(self) -> None:
        self.writer.close()


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Read an export back (for tests and scripts)."""
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)
