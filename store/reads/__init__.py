"""The read queries behind the JSON read API, the dashboard and the automatic rewards, one module per domain:
`sessions`, `calls`, `rewards`, `stats`, `trainer` (train steps, published versions). Every one returns typed
records (trainwire.store.read_models), never rows or dicts, so no caller needs to know the tables or the dialect.

What they share has a module of its own: `cursors` (keyset cursors, `BadQuery`), `trainability` (will a call be
trained on: in Python and in SQL), `derived` (a session's status, orphaned rewards). How a call's JSON reads is
not here: it is its kind's shape (trainwire.call_shapes). Lists are newest first and paginated by an opaque keyset
cursor (stable under concurrent inserts) or by `offset`."""
