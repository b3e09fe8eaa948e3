"""Settings: ROOT/dropkiln.toml, then DROPKILN_* environment variables, then CLI flags.

Nested tables map to environment variables with a double underscore:
``[train] steps = 500`` is ``DROPKILN_TRAIN__STEPS=500``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# Re-exported: dropkiln.toml's [bucket], [train] and [generate] tables are these.
from dropkiln.options import BucketSettings as BucketSettings
from dropkiln.options import DeviceClass, Section
from dropkiln.options import GenerateSettings as GenerateSettings
from dropkiln.options import TrainSettings as TrainSettings

# Paths and the ROOT rule live apart so the CLI's read commands need not load the settings.
from dropkiln.paths import CONFIG_NAME as CONFIG_NAME
from dropkiln.paths import DEFAULT_ROOT as DEFAULT_ROOT
from dropkiln.paths import Paths as Paths
from dropkiln.paths import root_from


class LimitsSettings(Section):
    """Operator caps: what one drop may ask of the GPU and the disk. Only dropkiln.toml (or
    the environment) sets them; a dataset.toml or prompt file asking for more is rejected."""

    max_steps: int = Field(100_000, ge=1, description="training steps per dataset")
    max_batch_size: int = Field(16, ge=1)
    max_gradient_accumulation: int = Field(64, ge=1)
    min_checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints, at least")
    max_resolution: int = Field(2048, ge=64, description="training resolution")
    max_rank: int = Field(256, ge=1)
    max_generate_steps: int = Field(150, ge=1, description="denoising steps per image")
    max_images: int = Field(1000, ge=1, description="images per prompt file")


class MemorySettings(Section):
    """How a GPU job picks its first memory rung (``stages/starting_rung.py``)."""

    reprobe_after: int = Field(
        5,
        ge=0,
        description="clean runs at a remembered memory rung before the next job tries one "
        "rung up (0: never)",
    )


class ExecutorSettings(Section):
    """How daemons sharing one store hold their jobs (``store/leases.py``)."""

    lease_seconds: float = Field(
        30.0,
        gt=0,
        description="a running job whose executor has not renewed its lease for this long is "
        "claimed by another executor (a dead or paused daemon, a lost box)",
    )
    heartbeat_seconds: float = Field(
        5.0, gt=0, description="how often a running job's lease is renewed"
    )
    input_wait_seconds: float = Field(
        60.0,
        ge=0,
        description="how long a job waits for a file an earlier job recorded (another box "
        "may have written it, and a shared filesystem can show it late) before it fails",
    )
    device_class: DeviceClass | None = Field(
        None,
        description="this executor's device class, which a dataset.toml or prompt file may pin "
        "its GPU jobs to (default: the device's type, cuda or cpu)",
    )

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> ExecutorSettings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                "heartbeat_seconds must be at most half of lease_seconds, or one slow "
                "heartbeat loses the lease"
            )
        return self


class ApiSettings(Section):
    """`dropkiln serve`: where it listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = Field(8321, ge=1, le=65535)
    max_upload_bytes: int = Field(2 * 2**30, ge=1024, description="a dataset zip, streamed")
    max_prompt_upload_bytes: int = Field(64 * 2**20, ge=1024, description="prompt file + images")
    read_timeout_s: float = Field(30.0, gt=0, description="an upload that sends nothing this long")
    max_streams: int = Field(2000, ge=1, description="concurrent /v1/events clients")
    stream_buffer: int = Field(256, ge=1, description="events held per slow /v1/events client")
    auth_failures: int = Field(5, ge=1, description="failed logins per client per window")
    auth_window_s: float = Field(60.0, gt=0)


class WebhookSettings(Section):
    """A URL the daemon calls when a job succeeds or fails (HMAC-SHA256 signed)."""

    url: str = ""
    secret: str = ""
    timeout_s: float = Field(10.0, gt=0)
    attempts: int = Field(5, ge=1, le=20)
    backoff_s: float = Field(2.0, ge=0, description="first retry delay; doubles each time")

    @model_validator(mode="after")
    def _signed_http(self) -> WebhookSettings:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r} is not an http:// or https:// URL")
        if self.url and not self.secret:
            raise ValueError("a webhook url needs a secret (the receiver checks the signature)")
        return self


class Settings(BaseSettings):
    """Everything the daemon and the CLI read from dropkiln.toml and the environment."""

    model_config = SettingsConfigDict(
        env_prefix="DROPKILN_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    root: Path = DEFAULT_ROOT
    model: str = "tiny-shapes"
    vae: str = Field("", description="a standalone VAE .safetensors; empty: the model's own")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    store_url: str = Field(
        "",
        description="the event store: empty for state/dropkiln.db (SQLite), or "
        "postgresql://user@host/db for one store shared by daemons on several boxes",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU threads of the device thread's torch pool; 0: on a CPU device the "
        "physical cores less one (OMP_NUM_THREADS wins), on a GPU torch's default",
    )
    settle_seconds: float = Field(2.0, ge=0)
    waiting_report_s: float = Field(
        60.0, gt=0, description="a drop held back this long is reported (DropWaiting)"
    )
    poll_interval: float = Field(0.05, gt=0, description="how often the dashboard reads the store")
    cpu_workers: int = Field(2, ge=1, description="concurrent CPU-lane jobs")
    stop_timeout_s: float = Field(
        300.0, gt=0, description="longest a shutdown waits for running jobs to checkpoint"
    )
    stall_after_s: float = Field(
        900.0, gt=0, description="a running stage silent this long is hung (watchdog, shutdown)"
    )
    preempt_after_s: float = Field(
        10.0,
        ge=0,
        description="least time a GPU job runs before a higher-priority one may preempt it",
    )
    ram_budget_gb: float = Field(8.0, gt=0, description="warm pipelines kept in memory")
    device_budget_gb: float | None = Field(
        None, gt=0, description="warm pipelines kept on the GPU (unset: 75% of its memory)"
    )
    telemetry_every_s: float = Field(1.0, gt=0)
    telemetry_retention_s: float = Field(3600.0, gt=0)
    faults: str = Field("", description="fault injection, e.g. oom@train.step:5,kill@cache.shard:2")
    log_level: str = "INFO"
    bucket: BucketSettings = Field(default_factory=BucketSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    generate: GenerateSettings = Field(default_factory=GenerateSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)

    @field_validator("root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _config_file_for(init_settings, env_settings)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None and toml_file.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @classmethod
    def load(cls, root: Path | str | None = None, **overrides: Any) -> Settings:
        """Settings for ROOT (flag, else DROPKILN_ROOT, else ./dropkiln-home)."""
        if root is not None:
            overrides["root"] = Path(root)
        return cls(**overrides)

    @property
    def paths(self) -> Paths:
        return Paths(self.root)


def _config_file_for(
    init_settings: PydanticBaseSettingsSource, env_settings: PydanticBaseSettingsSource
) -> Path | None:
    init = init_settings()
    return root_from(init.get("root")) / CONFIG_NAME


DEFAULT_CONFIG_TEXT = """\
# dropkiln settings. Every key can also be set as DROPKILN_<KEY> (nested: DROPKILN_TRAIN__STEPS).
model = "tiny-shapes"        # tiny-shapes, tiny-sdxl, tiny-sd15, a diffusers folder, a .safetensors
vae = ""                     # a standalone VAE .safetensors in place of the model's own ("": none)
device = "auto"              # auto, cpu, cuda, cuda:1
settle_seconds = 2.0         # a drop is taken once nothing in it changed for this long
cpu_workers = 2              # concurrent CPU-lane jobs (bucketing, video encode)
preempt_after_s = 10         # least time training keeps the GPU before generation preempts it
stop_timeout_s = 300         # a stop waits at most this long for a running job to checkpoint
stall_after_s = 900          # a stage silent this long is hung (the systemd watchdog restarts us)
ram_budget_gb = 8            # warm pipelines kept in memory between jobs

[bucket]
resolution = 1024
bucket_step = 64
min_side = 256
max_side = 2048

[train]
steps = 2000
checkpoint_every = 250
rank = 16
learning_rate = 1e-4
seed = 1

[generate]
steps = 20
guidance = 5.0
width = 1024
height = 1024
scheduler = "euler"
seed = 1

[limits]                     # caps a dataset.toml or prompt file cannot raise
max_steps = 100000
max_batch_size = 16
max_gradient_accumulation = 64
min_checkpoint_every = 50
max_resolution = 2048
max_rank = 256
max_generate_steps = 150
max_images = 1000

[memory]                     # the first memory rung of a GPU job (README: memory ladder)
reprobe_after = 5            # clean runs at a remembered rung before a job tries one rung up

[executor]                   # several daemons on one store (README: several GPUs and boxes)
lease_seconds = 30           # a job whose daemon stopped renewing its lease this long is taken over
heartbeat_seconds = 5        # how often a running job's lease is renewed
input_wait_seconds = 60      # a file an earlier job recorded, not visible yet: wait, then fail

[api]                        # dropkiln serve (the HTTP API); the token is in state/api-token
host = "127.0.0.1"
port = 8321

# [webhooks]                 # called on job succeeded/failed, body signed with HMAC-SHA256
# url = "https://example.org/dropkiln"
# secret = "a long random string"
"""
