"""The settings, in groups: `SharedSettings` (every command), `UpstreamSettings` (the proxy and the trainer),
`ProxySettings` (`trainwire serve`), `TrainerSettings` (`trainwire train`), and the maintenance commands'
`CompactSettings` and `PruneSettings`; `Settings` has the proxy's and the trainer's. Every field
is a CLI flag (`--kebab-name`) of the commands whose group has it, and a `TRAINWIRE_*` env variable.

Precedence: CLI flag > environment > `.env` file > default. List fields are repeatable flags
(`--upstream A --upstream B`) or, in the environment, comma-separated or JSON lists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///./trainwire.db"
AIR_ENV_PREFIX = "TRAINWIRE_AIR_"


def _split_list(value):
    """Environment lists: JSON (`["a","b"]`) or comma-separated (`a,b`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


StrList = Annotated[list[str], NoDecode]


class _AirEnv(PydanticBaseSettingsSource):
    """`TRAINWIRE_AIR_<RULE>=VALUE|off` (environment or .env) into `air`. The rules register themselves in the
    proxy (proxy/air_rules.py), below which the settings sit, so they cannot be declared here as fields; the proxy
    refuses a rule name it does not know."""

    def __init__(self, settings_cls, env_file) -> None:
        super().__init__(settings_cls)
        self.env_file = env_file

    def get_field_value(self, field, field_name):  # one value for the whole model, see __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        declared = {f"TRAINWIRE_{name.upper()}" for name in self.settings_cls.model_fields}
        found: dict[str, str] = {}
        dotenv = dotenv_values(self.env_file) if self.env_file and Path(self.env_file).is_file() else {}
        for source in (dotenv, os.environ):
            for key, value in source.items():
                key = key.upper()
                if key.startswith(AIR_ENV_PREFIX) and key not in declared and value is not None:
                    found[key[len(AIR_ENV_PREFIX) :].lower()] = value
        return {"air": found} if found else {}


class SharedSettings(BaseSettings):
    """What every command needs: where the store is."""

    model_config = SettingsConfigDict(env_prefix="TRAINWIRE_", env_file=".env", extra="ignore")

    database_url: str | None = Field(
        None, description="SQLAlchemy URL; postgresql:// or sqlite. Default: ./trainwire.db (SQLite)"
    )
    log_level: str = Field("info", description="Python log level")

    @property
    def resolved_database_url(self) -> str:
        return normalize_database_url(self.database_url or DEFAULT_SQLITE_URL)


class UpstreamSettings(SharedSettings):
    """The proxy and the trainer: which vLLM servers serve the policy, and under what name."""

    upstream: StrList = Field(
        default_factory=lambda: ["http://127.0.0.1:8000"], description="vLLM base URL (repeatable)"
    )
    upstream_api_key: str | None = Field(None, description="Bearer key the upstream vLLM expects; never echoed")
    policy_model: str = Field("policy", description="Model name clients send for the trained policy")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature of trainable calls; the trainer computes log-probs at it"
    )

    @field_validator("upstream", mode="before")
    @classmethod
    def _upstream_list(cls, value):
        return _split_list(value)

    @field_validator("upstream")
    @classmethod
    def _strip_slash(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one --upstream is required")
        return [u.rstrip("/") for u in value]


class PluginSettings(SharedSettings):
    """`trainwire serve` and `trainwire train`: user modules imported before the registries are read
    (trainwire/plugins.py)."""

    plugin: StrList = Field(
        default_factory=list,
        description="Python module (or .py file) imported first, on every rank and worker, so that it can register "
        "a policy loss, an advantage estimator or an automatic-reward rule (repeatable)",
    )

    @field_validator("plugin", mode="before")
    @classmethod
    def _plugin_list(cls, value):
        return _split_list(value)


class JournalSettings(SharedSettings):
    """The proxy's local journal, also read by `trainwire replay-rejected`."""

    journal_dir: Path = Field(
        Path("./trainwire-journal"),
        description="Local journal of recorded calls, kept until they are in the database (replayed at start)",
    )


class MaintenanceSettings(SharedSettings):
    """The store's maintenance commands, which work through the sessions a batch (one transaction) at a time."""

    batch_sessions: int = Field(
        50, gt=0, description="Sessions per transaction; an interrupted run keeps the batches it committed"
    )


class CompactSettings(MaintenanceSettings):
    """`trainwire compact-calls`."""

    max_sessions: int = Field(
        0, ge=0, description="Stop after this many sessions (0 = all); the next run goes on where this one stopped"
    )


class PruneSettings(MaintenanceSettings):
    """`trainwire prune`."""

    # ge=1: store/retention.MIN_OLDER_THAN_DAYS (the writer's delta bases expire after an hour).
    older_than_days: float | None = Field(
        None,
        ge=1,
        description="Prune trained and skipped sessions whose last "
        "call is older than this many days (required; at least 1)",
    )
    archive_dir: Path | None = Field(
        None,
        description="Write the calls of each batch of sessions to a Parquet "
        "file here (the export's columns, plus request and response), fsynced before "
        "their bodies are dropped",
    )


class ProxySettings(UpstreamSettings, JournalSettings, PluginSettings):
    """`trainwire serve`."""

    host: str = Field("0.0.0.0", description="Address the proxy listens on")
    port: int = Field(8100, description="Port the proxy listens on")
    workers: int = Field(1, description="uvicorn worker processes")
    upstream_model: str | None = Field(
        None, description="Base model name vLLM serves (default: discovered from /v1/models)"
    )
    model_route: StrList = Field(
        default_factory=list, description="NAME=litellm-model-string for non-policy models (repeatable)"
    )
    routes_file: Path | None = Field(
        None, description="YAML file of model routes: {NAME: litellm-model-string or litellm params}"
    )
    api_key: str | None = Field(None, description="Key agents must send as 'Authorization: Bearer'")
    admin_key: str | None = Field(None, description="Key for reward, read, admin and export endpoints")
    metrics_public: bool = Field(
        False,
        description="Serve /metrics without a key even when --admin-key (or --api-key) is set, for Prometheus scrapers that cannot send one; its labels hold no upstream address or key",
    )
    upstream_timeout_s: float = Field(600.0, description="Total timeout of one upstream call")
    max_backlog: int = Field(
        0,
        ge=0,
        description="Admission control: while this many sessions are rewarded but not yet taken by a trainer, "
        "the first call of a new session gets a 429 with Retry-After (calls of started sessions are always "
        "served); 0 = off",
    )
    max_request_bytes: int = Field(
        16 * 1024 * 1024,
        gt=0,
        description="Largest request body accepted (bytes); a larger one gets a 413 and is not forwarded",
    )
    write_batch_size: int = Field(256, description="Calls written per database batch")
    write_interval_ms: int = Field(50, description="Longest a recorded call waits before its batch is written")
    write_queue_size: int = Field(10000, description="Calls held in memory before requests wait (backpressure)")
    call_deltas: bool = Field(
        True,
        description="Store a call as what it adds to an earlier call of its session (its new prompt tokens and messages); readers always see full calls",
    )
    journal_fsync: Literal["none", "interval", "always"] = Field(
        "none",
        description="fsync the journal: none (survives a proxy crash), interval (a host crash loses one write interval), always",
    )
    policy_poll_s: float = Field(
        1.0, description="Policy-version poll interval where LISTEN/NOTIFY is unavailable (SQLite)"
    )
    air_tool_error_pattern: StrList = Field(
        default_factory=lambda: [r"^\s*Error", r'^\s*\{\s*"error"\s*:'],
        description="Regexes marking a tool message as an error (repeatable)",
    )
    sampling_policy: Literal["enforce", "reject", "record"] = Field(
        "enforce",
        description="Trainable calls asking for other sampling settings: enforce the training ones, "
        "reject them (400), or record them untrainable",
    )
    # OpenTelemetry export (proxy/otel_export.py). Unset, the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
    # OTEL_EXPORTER_OTLP_ENDPOINT turns it on just as well: teams already set those for their agents.
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector to export every recorded call to as a GenAI span (a base URL like "
        "OTEL_EXPORTER_OTLP_ENDPOINT: /v1/traces is appended; a URL ending in /v1/traces is used as it is)",
    )
    otlp_content: bool = Field(
        False, description="Export message content (gen_ai.input.messages / gen_ai.output.messages) with the spans"
    )
    otlp_queue_size: int = Field(
        4096, gt=0, description="Spans held for export; beyond that (a collector down or slow) they are dropped"
    )
    unknown_fields: Literal["ignore", "refuse"] = Field(
        "ignore",
        description="A Responses or Messages request field trainwire does not know: ignore it (named in the "
        "X-Trainwire-Ignored answer header and recorded with the call) or refuse the request (400)",
    )
    # Automatic intermediate rewards: rule name -> reward or 'off'. Filled from the flags the CLI makes from the
    # rule registry (--air-<rule>) and from TRAINWIRE_AIR_<RULE>; a rule left out keeps its registered default.
    air: dict[str, str] = Field(default_factory=dict, description="Automatic reward per rule: RULE -> value or 'off'")

    @field_validator("model_route", "air_tool_error_pattern", mode="before")
    @classmethod
    def _proxy_lists(cls, value):
        return _split_list(value)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        air_env = _AirEnv(settings_cls, settings_cls.model_config.get("env_file"))
        return init_settings, env_settings, air_env, dotenv_settings, file_secret_settings


class TrainerSettings(UpstreamSettings, PluginSettings):
    """`trainwire train`."""

    model: str | None = Field(None, description="Base model path or id (the one vLLM serves)")
    objective: Literal["rl", "sft"] = Field(
        "rl",
        description="What a step optimises: rl (policy gradient on rewarded sessions) or sft (supervised "
        "fine-tuning on the completions of the selected calls, verl's SFT loss); both resume the "
        "same --checkpoint-dir, so RL can continue from an SFT run",
    )
    sft_from: StrList = Field(
        default_factory=list,
        description="With --objective sft: also train on the calls of "
        "this frozen route (the model name its agent requested; repeatable): distillation from "
        "a teacher agent that ran through the proxy, rendered with the policy's chat template",
    )
    min_reward: float | None = Field(
        None,
        description="With --objective sft: only sessions whose final reward is at "
        "least this (rejection-sampling fine-tuning); default all",
    )
    epochs: int = Field(1, ge=1, description="Passes over each step's batch")
    mini_batch_size: int = Field(
        0, ge=0, description="Samples per optimizer update within a step (0 = the whole batch: one update per step)"
    )
    lora_rank: int = Field(8, description="LoRA rank; 0 = full fine-tuning")
    lora_alpha: int = Field(16, description="LoRA alpha")
    freeze_embeddings: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Full fine-tuning: keep the input embeddings frozen. auto = on when they are tied to the "
        "output layer (vLLM's CPU build multiplies a tied output layer through a copy packed when the model loads, "
        "which an in-place weight reload does not repack, so trained embeddings would be served only half)",
    )
    batch_size: int = Field(8, description="Sessions per training step")
    lr: float = Field(1e-4, description="Learning rate")
    checkpoint_dir: Path = Field(
        Path("./checkpoints"),
        description="Where checkpoints and published weights go (shared with vLLM); "
        "its trainwire_run.json says whose run it holds (store, base model, LoRA), checked at every start",
    )
    fresh: bool = Field(
        False,
        description="Start over at step 0: move what --checkpoint-dir holds into "
        "CHECKPOINT_DIR/previous-runs/<UTC time>/ (nothing is deleted)",
    )
    publish_dir: Path | None = Field(
        None, description="Path of checkpoint_dir as vLLM sees it, if different (containers)"
    )
    train_agent: StrList = Field(default_factory=list, description="Agent names to train (repeatable; default all)")
    group_by_task: bool = Field(True, description="Group sessions by X-Task-Id for GRPO-style advantages")
    group_size: int = Field(0, description="Wait for this many finished sessions per task (0 = no waiting)")
    group_timeout_s: float = Field(60.0, description="Train an incomplete group after this long")
    mode: Literal["transition", "trajectory"] = Field(
        "transition", description="One sample per call, or merge calls that extend each other"
    )
    gamma: float = Field(1.0, description="Discount over later calls' rewards")
    default_reward: float = Field(0.0, description="Final reward of a session finished without one")
    adv_estimator: str = Field("grpo", description="verl advantage estimator (grpo, rloo, reinforce_plus_plus, ...)")
    policy_loss: str = Field("vanilla", description="verl policy loss (vanilla, gspo, cispo, ...)")
    loss_agg_mode: str = Field("token-mean", description="verl loss aggregation mode")
    clip_ratio: float = Field(0.2, description="PPO clip ratio")
    kl_coef: float = Field(0.0, description="KL-to-reference loss coefficient (0 = off)")
    max_staleness: int = Field(
        4, description="Skip sessions served more than this many versions ago (the hard bound in every --off-policy)"
    )
    off_policy: Literal["drop", "tis", "decoupled"] = Field(
        "decoupled",
        description="How sessions sampled by older versions are trained: drop (skip those older than "
        "--max-staleness, no correction), tis (PPO ratio against the recorded behaviour log-probs, each token "
        "weighted by min(pi_proximal/pi_behaviour, --is-cap)) or decoupled (decoupled PPO: ratio clipped against "
        "the weights before this update, the same truncated weight)",
    )
    claim_order: Literal["oldest", "newest"] = Field(
        "newest",
        description="Which finished sessions a step claims first (those beyond --max-staleness are retired "
        "before): newest (the freshest data while the trainer is behind; the oldest age out) or oldest (first in, "
        "first trained: with serve --max-backlog, the most sessions trained)",
    )
    is_cap: float = Field(2.0, gt=0, description="Truncation of the importance weights of --off-policy tis|decoupled")
    settle_s: float = Field(2.0, description="Only claim sessions whose final reward is at least this old")
    claim_timeout_s: float = Field(600.0, description="Release claims older than this (crashed trainer)")
    poll_s: float = Field(1.0, description="Trainer poll interval when no batch is ready")
    max_steps: int = Field(0, description="Stop after this many steps (0 = run forever)")
    lora_grace_s: float = Field(120.0, description="Unload old LoRA adapters this long after a newer one is published")
    serving_check_s: float = Field(
        5.0,
        ge=0,
        description="Check this often (also while idle) that every upstream serves the current version, and publish "
        "it again to one that lost it (a restarted vLLM); 0 = never",
    )
    tensorboard_dir: Path | None = Field(None, description="TensorBoard log dir (default: CHECKPOINT_DIR/tensorboard)")
    wandb_project: str | None = Field(None, description="Weights & Biases project (optional)")
    seed: int = Field(0, description="Random seed")
    agreement_warn: float = Field(
        0.05,
        ge=0,
        description="Warn when the trainer's log-probs of tokens served by the newest version differ "
        "from vLLM's by more than this (mean |delta log p|); it usually means weights "
        "published but not served, a wrong --temperature, or vLLM without --logprobs-mode "
        "processed_logprobs",
    )
    agreement_max: float = Field(
        0.5,
        ge=0,
        description="Refuse a step and stop when the trainer's log-probs of tokens served by the newest "
        "version differ from vLLM's by more than this (mean |delta log p|, nats): the two are not the same "
        "model (tied embeddings, a config field read differently, a wrong --temperature, vLLM without "
        "processed logprobs). 0 never refuses",
    )

    @field_validator("train_agent", "sft_from", mode="before")
    @classmethod
    def _trainer_lists(cls, value):
        return _split_list(value)


class Settings(ProxySettings, TrainerSettings):
    """Every setting of every command, for code that runs several parts (the demo, tests)."""


def normalize_database_url(url: str) -> str:
    """Accept the URLs people paste (postgres://, postgresql://, sqlite:///) and pick the async drivers."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg2://", "postgresql+psycopg://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    return url
