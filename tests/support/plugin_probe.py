"""A second plugin for tests: after examples/plugin_example.py registered `truncated_pg`, it wraps that loss so
that each call appends the torchrun rank that made it to the file named by TW_PLUGIN_PROBE."""

from __future__ import annotations

import os

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

_loss = POLICY_LOSS_REGISTRY["truncated_pg"]  # a KeyError here: the plugins were not imported in order


def _probed(*args, **kwargs):
    with open(os.environ["TW_PLUGIN_PROBE"], "a") as out:
        out.write(f"{os.environ.get('RANK', '0')} {os.getpid()}\n")
    return _loss(*args, **kwargs)


POLICY_LOSS_REGISTRY["truncated_pg"] = _probed
