"""The one settings object. Every field is a CLI flag (`--kebab-name`) and a `TRAINWIRE_*` env variable.

Precedence: CLI flag > environment > `.env` file > default. List fields are repeatable flags
(`--upstream A --upstream B`) or, in the environment, comma-separated or JSON lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SQLITE_URL = "sqlite+aiosqlite:///./trainwire.db"


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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINWIRE_", env_file=".env", extra="ignore")

    # --- shared -------------------------------------------------------------------------------
    database_url: str | None = Field(None, description="SQLAlchemy URL; postgresql:// or sqlite. Default: ./trainwire.db (SQLite)")
    upstream: StrList = Field(default_factory=lambda: ["http://127.0.0.1:8000"], description="vLLM base URL (repeatable)")
    upstream_api_key: str | None = Field(None, description="Bearer key the upstream vLLM expects; never echoed")
    policy_model: str = Field("policy", description="Model name clients send for the trained policy")
    log_level: str = Field("info", description="Python log level")

    # --- proxy --------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address the proxy listens on")
    port: int = Field(8100, description="Port the proxy listens on")
    workers: int = Field(1, description="uvicorn worker processes")
    upstream_model: str | None = Field(None, description="Base model name vLLM serves (default: discovered from /v1/models)")
    model_route: StrList = Field(default_factory=list, description="NAME=litellm-model-string for non-policy models (repeatable)")
    routes_file: Path | None = Field(None, description="YAML file of model routes: {NAME: litellm-model-string or litellm params}")
    api_key: str | None = Field(None, description="Key agents must send as 'Authorization: Bearer'")
    admin_key: str | None = Field(None, description="Key for reward, read, admin and export endpoints")
    upstream_timeout_s: float = Field(600.0, description="Total timeout of one upstream call")
    write_batch_size: int = Field(256, description="Calls written per database batch")
    write_interval_ms: int = Field(50, description="Longest a recorded call waits before its batch is written")
    write_queue_size: int = Field(10000, description="Calls held in memory before requests wait (backpressure)")
    spool_dir: Path = Field(Path("./trainwire-spool"), description="Where calls go if the database stays down at shutdown")
    policy_poll_s: float = Field(1.0, description="Policy-version poll interval where LISTEN/NOTIFY is unavailable (SQLite)")

    # automatic intermediate rewards: a value, or 'off'
    air_invalid_tool_call: str = Field("-0.5", description="Reward for a tool call with bad JSON arguments or an unknown tool, or 'off'")
    air_tool_error: str = Field("-0.2", description="Reward for a call whose tool answer reports an error, or 'off'")
    air_truncated: str = Field("-0.2", description="Reward for a response cut off by max_tokens, or 'off'")
    air_tool_error_pattern: StrList = Field(default_factory=lambda: [r"^\s*Error", r'^\s*\{\s*"error"\s*:'],
                                            description="Regexes marking a tool message as an error (repeatable)")

    # --- trainer ------------------------------------------------------------------------------
    model: str | None = Field(None, description="Base model path or id (the one vLLM serves)")
    lora_rank: int = Field(8, description="LoRA rank; 0 = full fine-tuning")
    lora_alpha: int = Field(16, description="LoRA alpha")
    batch_size: int = Field(8, description="Sessions per training step")
    lr: float = Field(1e-4, description="Learning rate")
    checkpoint_dir: Path = Field(Path("./checkpoints"), description="Where checkpoints and published weights go (shared with vLLM)")
    publish_dir: Path | None = Field(None, description="Path of checkpoint_dir as vLLM sees it, if different (containers)")
    train_agent: StrList = Field(default_factory=list, description="Agent names to train (repeatable; default all)")
    group_by_task: bool = Field(True, description="Group sessions by X-Task-Id for GRPO-style advantages")
    group_size: int = Field(0, description="Wait for this many finished sessions per task (0 = no waiting)")
    group_timeout_s: float = Field(60.0, description="Train an incomplete group after this long")
    mode: Literal["transition", "trajectory"] = Field("transition", description="One sample per call, or merge calls that extend each other")
    gamma: float = Field(1.0, description="Discount over later calls' rewards")
    default_reward: float = Field(0.0, description="Final reward of a session finished without one")
    adv_estimator: str = Field("grpo", description="verl advantage estimator (grpo, rloo, reinforce_plus_plus, ...)")
    policy_loss: str = Field("vanilla", description="verl policy loss (vanilla, gspo, cispo, ...)")
    loss_agg_mode: str = Field("token-mean", description="verl loss aggregation mode")
    clip_ratio: float = Field(0.2, description="PPO clip ratio")
    kl_coef: float = Field(0.0, description="KL-to-reference loss coefficient (0 = off)")
    temperature: float = Field(1.0, description="Sampling temperature the agents use (for exact log-probs)")
    max_staleness: int = Field(4, description="Skip sessions served more than this many versions ago")
    settle_s: float = Field(2.0, description="Only claim sessions whose final reward is at least this old")
    claim_timeout_s: float = Field(600.0, description="Release claims older than this (crashed trainer)")
    poll_s: float = Field(1.0, description="Trainer poll interval when no batch is ready")
    max_steps: int = Field(0, description="Stop after this many steps (0 = run forever)")
    lora_grace_s: float = Field(120.0, description="Unload old LoRA adapters this long after a newer one is published")
    tensorboard_dir: Path | None = Field(None, description="TensorBoard log dir (default: CHECKPOINT_DIR/tensorboard)")
    wandb_project: str | None = Field(None, description="Weights & Biases project (optional)")
    seed: int = Field(0, description="Random seed")

    @field_validator("upstream", "model_route", "train_agent", "air_tool_error_pattern", mode="before")
    @classmethod
    def _lists(cls, value):
        return _split_list(value)

    @field_validator("upstream")
    @classmethod
    def _strip_slash(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one --upstream is required")
        return [u.rstrip("/") for u in value]

    @property
    def resolved_database_url(self) -> str:
        return normalize_database_url(self.database_url or DEFAULT_SQLITE_URL)

    def air_value(self, rule: str) -> float | None:
        raw = str(getattr(self, f"air_{rule}")).strip().lower()
        return None if raw in {"off", "none", "false", ""} else float(raw)


def normalize_database_url(url: str) -> str:
    """Accept the URLs people paste (postgres://, postgresql://, sqlite:///) and pick the async drivers."""
    for prefix in ("postgres://", "postgresql://", "postgresql+psycopg2://", "postgresql+psycopg://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix):]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///"):]
    return url
