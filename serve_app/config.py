"""The contract of the serve YAML `args:`: one pydantic schema, validated at build time.

Every cross-field rule lives here (fractions that must fit on one GPU, ports that must differ, the
model declared once for both phases), so a bad YAML fails at `serve run` / `serve deploy` with a
message that names the field and the allowed range, before any engine starts.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from serve_app.config_plan import check_app_memory
from serve_app.plan import GPU_PRESETS_MIB

_S3_SOURCE = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
# vLLM engine arguments that the schema owns; setting them per phase would split the contract.
RESERVED_ENGINE_KWARGS = frozenset(
    {"model", "served_model_name", "kv_transfer_config", "tokenizer", "gpu_memory_utilization",
     "kv_cache_memory_bytes"}
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """The one model both engines serve."""

    source: str = "models/tiny-llama"
    """A local directory, a Hugging Face id, or `s3://bucket/prefix`; the same weights are
    loaded by both engines. An s3:// prefix is downloaded with boto3 (standard credential chain)
    once per node into `$PD_SERVE_MODEL_CACHE` before the engines start, then loaded from disk
    (`serve_app/model_source.py`)."""
    served_model_name: str | None = None
    """The name clients send as `model`; defaults to `source`."""
    max_model_len: int | None = Field(default=None, ge=16)
    """Context length (prompt + output tokens); defaults to the model's own."""
    dtype: str = "auto"

    @property
    def name(self) -> str:
        return self.served_model_name or self.source

    @property
    def tokenizer_source(self) -> str | None:
        """Where the router loads the tokenizer from: the model's own folder or hub id (an
        s3:// model is on the engines' disks only; the router then estimates lengths)."""
        return None if self.source.startswith("s3://") else self.source

    @field_validator("source")
    @classmethod
    def _s3_source_names_a_bucket(cls, value: str) -> str:
        if value.startswith("s3://") and not _S3_SOURCE.match(value):
            raise ValueError(
                f"model.source {value!r}: an S3 source is s3://bucket/prefix with a bucket name "
                "of 3-63 lowercase letters, digits, dots and hyphens"
            )
        return value


def _check_engine_kwargs(value: dict[str, Any]) -> dict[str, Any]:
    clash = sorted(RESERVED_ENGINE_KWARGS & {k.replace("-", "_") for k in value})
    if clash:
        raise ValueError(
            f"engine_kwargs may not set {clash}: use `model.*`, `gpu_memory_utilization` or "
            "`kv_cache_memory_bytes` of the phase, or the `kv_transfer` section"
        )
    return value


EngineKwargs = Annotated[dict[str, Any], AfterValidator(_check_engine_kwargs)]
"""vLLM engine arguments a phase (or its `EngineUpdate`) may set: not those the app owns."""


class PhaseConfig(_Strict):
    """One engine (prefill or decode) and its slice of the GPU."""

    num_gpus: float = Field(default=0.5, ge=0.0, le=1.0)
    """Ray's logical GPU fraction for the replica (placement only; nothing is enforced)."""
    num_cpus: float = Field(default=1.0, ge=0.0)
    sm_percentage: int | None = Field(default=None, ge=1, le=100)
    """CUDA MPS SM cap (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`); None runs without MPS."""
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Share of the whole card's memory this engine may use (weights + activations + KV)."""
    kv_cache_memory_bytes: int | None = Field(default=None, gt=0)
    """A fixed KV pool size; skips memory profiling, so start order stops mattering."""
    pinned_device_mem_limit: str | None = Field(default=None, pattern=r"^\d+[MG]$")
    """MPS per-client memory cap, e.g. `40G` (`CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`)."""
    nixl_side_channel_port: int = Field(default=5600, ge=1024, le=65535)
    cpu_cores: str | None = Field(default=None, pattern=r"^[0-9,\-|]+$")
    """CPU build only: cores of the engine's processes, e.g. `0`: its worker's compute threads
    (`VLLM_CPU_OMP_THREADS_BIND`) and EngineCore, which would otherwise wait on any core."""
    cpu_kv_cache_gib: int | None = Field(default=None, ge=1, le=1024)
    """CPU build only: KV cache size in GiB (`VLLM_CPU_KVCACHE_SPACE`)."""
    cpu_nice: int | None = Field(default=None, ge=0, le=19)
    """CPU build only: niceness added to the engine's processes, so the request path (Router,
    HTTP proxy, replicas) gets the cores first when both want them."""
    cpu_poll_sleep_us: int | None = Field(default=None, ge=1, le=10000)
    """CPU build only: the engine's processes sleep this long between polls while they wait for
    each other (EngineCore and its worker; vLLM spins on `sched_yield`). For an engine whose
    cores the request path shares: a short sleep leaves them to it (README, "Small machines")."""
    cpu_poll_spin_us: int | None = Field(default=None, ge=1, le=100000)
    """CPU build only, with `cpu_poll_sleep_us`: each wait spins (as vLLM does) for this long
    before it sleeps between polls, so a step that follows at once is not late by a sleep."""
    max_ongoing_requests: int = Field(default=1024, ge=1)
    """Serve's limit per replica; above the router's `admission.max_in_flight`, so that the
    router's health probes are never queued behind requests."""
    engine_kwargs: EngineKwargs = Field(default_factory=dict)
    """Any other vLLM engine argument, e.g. `max_num_batched_tokens`, `enforce_eager`."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment for the replica (and so its engine processes)."""



class EngineUpdate(_Strict):
    """A server deployment's `user_config` (the serve config's `deployments:` section): engine
    arguments layered over the phase's `engine_kwargs`. A change restarts only that phase's
    engine, in its running replica (`_EngineServer.reconfigure`): the Router and the other
    phase keep serving, where a change of `args` restarts the whole app (Serve's code version
    covers all of `args`)."""

    engine_kwargs: EngineKwargs = Field(default_factory=dict)
    drain_timeout_s: float = Field(default=60.0, ge=0.0, le=3600.0)
    """How long the old engine may finish its requests (no new ones reach it) before it stops;
    streams still running then continue on the other engine (the router migrates them)."""

    def apply(self, cfg: AppConfig, role: str) -> AppConfig:
        """`cfg` with this update's engine arguments over the `role` phase's own."""
        if not self.engine_kwargs:
            return cfg
        phase = cfg.phase(role)
        kwargs = {**phase.engine_kwargs, **self.engine_kwargs}
        return cfg.model_copy(update={role: phase.model_copy(update={"engine_kwargs": kwargs})})


class KVTransferConfig(_Strict):
    """How the prompt's KV blocks travel from prefill to decode (vLLM's NixlConnector)."""

    buffer_device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` follows `device`: `cpu` on the CPU build, `cuda` on a GPU."""
    lease_duration_s: int = Field(default=120, ge=6, le=3600)
    """How long prefill keeps finished blocks for decode (renewed by decode heartbeats)."""
    load_failure_policy: Literal["fail", "recompute"] = "recompute"
    """When decode cannot read the blocks: fail the request, or recompute the prompt."""
    recompute_threshold_tokens: int = Field(default=0, ge=0)
    """Decode recomputes instead of pulling below this many prompt tokens (0: always pull)."""
    num_threads: int = Field(default=1, ge=1, le=64)
    """UCX worker threads per engine."""
    progress_delay_us: int | None = Field(default=None, ge=0, le=1_000_000)
    """Sleep of NIXL's progress thread between polls. None keeps NIXL's busy spin (right on a
    many-core GPU host); small machines need a delay, e.g. 20000, or the spin starves them."""
    ucx_tls: str | None = None
    """UCX transports; `auto` picks same-GPU transports (cuda_ipc, cuda_copy) on a GPU."""
    side_channel_host: str = "127.0.0.1"


class TracingConfig(_Strict):
    """OpenTelemetry traces: one trace per request across Router, prefill, KV handoff, decode.

    Unset fields fall back to the standard variables in the replicas' environment
    (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`,
    `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`,
    `OTEL_TRACES_SAMPLER_ARG`, `OTEL_SERVICE_NAME`); `OTEL_SDK_DISABLED=true` turns it off.
    """

    enabled: bool = False
    """Off: nothing is exported (requests still get a trace id, carried as their request id)."""
    endpoint: str | None = None
    """OTLP collector, e.g. `http://127.0.0.1:4318` (http/protobuf; `/v1/traces` is added to
    a bare host) or `127.0.0.1:4317` (grpc). Default: the OTEL_* variables, else localhost."""
    protocol: Literal["http/protobuf", "grpc"] | None = None
    """Default: the OTEL_* variables, else `http/protobuf`."""
    sampling_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    """Share of new traces kept (parent-based: an incoming `traceparent` decides for its own
    trace). Default: `OTEL_TRACES_SAMPLER_ARG`, else 1.0."""
    engine_spans: bool = False
    """vLLM's own `llm_request` spans join the trace (vLLM's `otlp_traces_endpoint`)."""
    service_name: str = Field(default="pd-serve", min_length=1)
    batch_delay_ms: int = Field(default=5000, ge=1, le=60_000)
    """How long finished spans wait to be exported together (`OTEL_BSP_SCHEDULE_DELAY`)."""

    @model_validator(mode="after")
    def _engine_spans_need_tracing(self) -> TracingConfig:
        if self.engine_spans and not self.enabled:
            raise ValueError("telemetry.tracing.engine_spans needs telemetry.tracing.enabled: true")
        return self


class MetricsConfig(_Strict):
    """Prometheus metrics at the ingress's `GET /metrics` (router's own and both engines')."""

    engine_timeout_s: float = Field(default=5.0, gt=0.0, le=60.0)
    """How long a scrape waits for each engine's metrics before leaving them out."""


class PairsAutoscaling(_Strict):
    """`pairs:` as a range: Serve's autoscaler adds and removes whole pairs between `min` and
    `max`, both server deployments always at the same count (`serve_app/policy/autoscale.py`).
    A pair is added when the requests waiting or running at the busier phase pass
    `target_ongoing_per_pair` per pair, or when the engines' KV caches fill past
    `kv_usage_target`, for `upscale_delay_s`; one is removed only after the load has fit in fewer
    pairs for `downscale_delay_s`, and it finishes its requests first (`drain_timeout_s`)."""

    min: int = Field(default=1, ge=1, le=256)
    """Pairs that always run (and that the app starts with)."""
    max: int = Field(default=2, ge=1, le=256)
    """Most pairs; each needs a one-GPU Ray node of its own (more wait for the cluster to grow)."""
    target_ongoing_per_pair: float = Field(default=8.0, gt=0.0, le=100_000.0)
    """Requests per pair (Serve's running + queued at the busier phase, averaged over
    `look_back_period_s`) the autoscaler aims for: pairs = ceil(requests / this)."""
    kv_usage_target: float = Field(default=0.8, gt=0.0, le=1.0)
    """Mean KV cache usage of a phase's engines at which one more pair is wanted (and below which
    one fewer pair must stay, so a removal does not refill the rest)."""
    upscale_delay_s: float = Field(default=10.0, ge=0.0, le=3600.0)
    """How long more pairs must be wanted before one starts."""
    downscale_delay_s: float = Field(default=300.0, ge=0.0, le=86_400.0)
    """How long fewer pairs must be enough before one is removed."""
    look_back_period_s: float = Field(default=30.0, ge=1.0, le=3600.0)
    """Window over which Serve averages the request counts and KV usage the decision reads."""
    drain_timeout_s: float = Field(default=300.0, ge=0.0, le=3600.0)
    """How long a removed pair's replicas may finish their requests (no new ones reach them)
    before Serve stops them (`graceful_shutdown_timeout_s`)."""

    @model_validator(mode="after")
    def _min_not_above_max(self) -> PairsAutoscaling:
        if self.min > self.max:
            raise ValueError(
                f"pairs.min ({self.min}) must be <= pairs.max ({self.max}); both 1..256"
            )
        return self


def _pairs_kind(value: Any) -> str:
    return "autoscaling" if isinstance(value, (dict, PairsAutoscaling)) else "count"


def _check_pair_count(value: int) -> int:
    if not 1 <= value <= 256:
        raise ValueError(
            f"pairs: {value} is not a pair count: a fixed count is 1..256, or an autoscaling "
            "range {min: 1..256, max: 1..256, ...}"
        )
    return value


Pairs = Annotated[
    Annotated[int, AfterValidator(_check_pair_count), Tag("count")]
    | Annotated[PairsAutoscaling, Tag("autoscaling")],
    Discriminator(_pairs_kind),
]
"""`pairs:` a fixed count (1..256) or an autoscaling range (`PairsAutoscaling`); a mapping is
read as the range, anything else as the count, so an error names only that form's fields."""


class TelemetryConfig(_Strict):
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)


class MpsConfig(_Strict):
    """The MPS control daemon the two GPU engines attach to."""

    pipe_dir: str = "/tmp/pd-serve-mps/pipe"
    log_dir: str = "/tmp/pd-serve-mps/log"
    allow_unpartitioned: bool = False
    """If no MPS daemon answers: False refuses to start; True runs without the SM split (loud)."""
    gemm_check: bool = True
    """A replica with an `sm_percentage` runs a short GEMM check (the model's dtype and layer
    shapes against an FP32 CPU reference) before its engine starts and refuses to start when
    the results are wrong (`serve_app/gpu_gate.py`). False skips it (not advised)."""


class RoutingConfig(_Strict):
    """Conditional disaggregation: which requests go through prefill (`policy/route.py`)."""

    conditional: bool = True
    """False sends every request through prefill (the plain disaggregated app)."""
    short_prompt_tokens: int | None = Field(default=None, ge=0, le=1_000_000)
    """Prompts with fewer tokens run decode-local. None derives it: the prompt decode can
    prefill within `local_prefill_budget_ms`, on a GPU at its SM share of the card's peak, on
    the CPU build at a per-core rate measured on the 2-core machine (the tiny model: 2,369, so
    every prompt it takes; `policy/route.py`). 0 disaggregates every prompt."""
    short_output_tokens: int | None = Field(default=None, ge=0, le=1_000_000)
    """Requests asking for at most this many tokens (`max_tokens`, `max_completion_tokens`)
    run whole on prefill, with no handoff. None derives it: on the CPU build 8 (measured), on a
    GPU 1 (a one-token request gains nothing from decode); 0 turns the rule off."""
    local_prefill_budget_ms: float = Field(default=20.0, gt=0.0, le=10_000.0)
    """How long one local prefill may stall decode's running streams."""
    decode_peak_tflops: float = Field(default=989.0, gt=0.0)
    """GPU only: the card's dense BF16 peak (H100/H200: 989), scaled by decode's SM share."""
    prefill_backlog_ratio: float = Field(default=4.0, ge=1.0)
    """Load rule: prefill's queued prompt tokens this many times what decode's would be with
    the prompt moved there ..."""
    prefill_backlog_min: int = Field(default=4, ge=1)
    """... and at least this many prefill calls queued send prompts up to
    `backlog_local_max_tokens` decode-local."""
    backlog_local_max_tokens: int | None = Field(default=None, ge=0)
    """Longest prompt the load rule keeps local; None: 4 x `short_prompt_tokens`."""


class AdmissionConfig(_Strict):
    """Bounded admission (`policy/admission.py`): past these, 429 with `Retry-After`.

    Limits are per Router replica. `max_in_flight` bounds the requests being served at once;
    up to `max_waiting` more wait for a slot for at most `max_wait_s`; the rest are shed at once.
    """

    enabled: bool = True
    max_in_flight: int = Field(default=256, ge=1)
    max_waiting: int = Field(default=256, ge=0)
    max_wait_s: float = Field(default=1.0, ge=0.0, le=3600.0)
    max_prefill_in_flight: int = Field(default=64, ge=1)
    """Disaggregated requests in prefill at once; past it a request waits for prefill."""
    decode_kv_usage_limit: float = Field(default=0.95, gt=0.0, le=1.0)
    """Decode's KV cache usage at or above which new work waits (and is shed past
    `max_wait_s`) until it drains."""
    retry_after_s: int = Field(default=1, ge=1, le=3600)


class FailoverConfig(_Strict):
    """Health the router keeps of both engines, so a dead one is routed around at once."""

    probe_period_s: float = Field(default=0.5, gt=0.0, le=60.0)
    probe_timeout_s: float = Field(default=2.0, gt=0.0, le=600.0)
    prefill_deadline_s: float = Field(default=30.0, gt=0.0)
    """A prefill call past this is abandoned (blocks released) and decode runs the request."""


class RouterConfig(_Strict):
    num_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=4096, ge=1)
    """Serve's own limit per Router replica: high, so that every request reaches `admission`
    (which answers OpenAI 429s) instead of waiting in Serve's proxy or getting its plain text."""
    num_cpus: float = Field(default=0.5, ge=0.0)
    fallback_to_decode: bool = True
    """When prefill fails (not the client's fault), decode runs the whole request."""
    first_token_from_prefill: bool = True
    """Streamed completions get prefill's first token at once; decode continues after it
    (`serve_app/first_token.py`). False: decode makes every token, the first one included."""
    health_timeout_s: float = Field(default=10.0, gt=0)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    failover: FailoverConfig = Field(default_factory=FailoverConfig)


class LimitsConfig(_Strict):
    """What one HTTP request may carry (`policy/limits.py`). Past a limit the client gets an
    OpenAI error naming it (413 for the body, 400 for the rest) before any engine sees it."""

    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    """The request body, by its Content-Length and by the bytes actually received (8 MiB: a
    128k-token prompt as text or as token ids fits several times)."""
    max_json_depth: int = Field(default=64, ge=4, le=512)
    """Nesting of arrays and objects in the body (Python's parser and pickle recurse)."""
    max_prompts: int = Field(default=64, ge=1, le=4096)
    """Prompts in one completions request (`prompt` as a list of strings or of id lists)."""
    max_prompt_length: int = Field(default=1024 * 1024, ge=1)
    """Characters of one text prompt, or ids of one token-id prompt (completions `prompt`; the
    text of one chat message). The engine's `max_model_len` still applies after it."""
    max_messages: int = Field(default=1024, ge=1)
    """Messages in one chat request."""


class AuthConfig(_Strict):
    """Optional bearer API keys for the HTTP API (`policy/auth.py`); off while neither source is
    set. The YAML names only where the keys are, never a key. `/health` stays open; callers of
    the deployment handles are inside the cluster and are not checked."""

    api_keys_file: str | None = None
    """A file of keys, one per line (blank lines and `#` comments skipped), read at Router start."""
    api_keys_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The name of an environment variable of the Router's process: one key, or several
    separated by commas."""

    @property
    def is_enabled(self) -> bool:
        return self.api_keys_file is not None or self.api_keys_env is not None


class AppConfig(_Strict):
    """The builder's `args:` in the serve YAML."""

    device: Literal["cpu", "cuda"] = "cpu"
    mode: Literal["disaggregated", "unified"] = "disaggregated"
    """`unified` is the baseline: one engine (the `decode` phase's settings, chunked prefill, no
    KV connector) runs whole requests behind the same Router and HTTP API."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    prefill: PhaseConfig = Field(
        default_factory=lambda: PhaseConfig(num_gpus=0.8, nixl_side_channel_port=5600)
    )
    decode: PhaseConfig = Field(
        default_factory=lambda: PhaseConfig(num_gpus=0.2, nixl_side_channel_port=5610)
    )
    kv_transfer: KVTransferConfig = Field(default_factory=KVTransferConfig)
    mps: MpsConfig = Field(default_factory=MpsConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    memory_headroom: float = Field(default=0.05, ge=0.0, lt=0.5)
    """Share of the card left to CUDA contexts, NCCL/UCX buffers and fragmentation."""
    gpu: str | None = None
    """The card, for the build-time memory plan (`serve_app/config_plan.py`): one of
    `plan.GPU_PRESETS_MIB` (`h100-80gb`, `h200-141gb`, `a100-80gb`). Or `gpu_memory_gib`. With
    neither, a `device: cuda` config is built without the plan (a WARNING says so)."""
    gpu_memory_gib: float | None = Field(default=None, gt=0)
    """The card's memory in GiB, for a card without a preset."""
    engine_overhead_gib: float = Field(default=2.0, ge=0.0)
    """The plan's per-engine reserve outside weights and KV (activations, CUDA graphs, CUDA
    context, NIXL buffers); calibrate against vLLM's "Available KV cache memory" log line."""
    pairs: Pairs = 1
    """Prefill/decode pairs, one per GPU: each phase's deployment runs this many replicas, at most
    one per Ray node, so a cluster of one-GPU Ray nodes holds one pair per node
    (`serve_app/pairs.py`). In unified mode, the number of engines. A number (1..256) is fixed;
    a `PairsAutoscaling` range lets Serve's autoscaler add and remove whole pairs."""
    start_order: Literal["prefill_first", "parallel"] = "prefill_first"
    """`prefill_first`: decode starts its engine (and memory profiling) only once prefill's is
    up, on every (re)start. `parallel` is allowed on a GPU only when both KV pools are fixed."""

    @model_validator(mode="before")
    @classmethod
    def _default_port_per_role(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("decode"), dict):
            data = {**data, "decode": {"nixl_side_channel_port": 5610, **data["decode"]}}
        return data

    @property
    def engine_phases(self) -> tuple[str, ...]:
        """The phases that run an engine: unified mode runs only `decode`'s."""
        return ("decode",) if self.is_unified else ("prefill", "decode")

    @model_validator(mode="after")
    def _fits_on_one_gpu(self) -> AppConfig:
        if self.is_unified:
            return self
        total_gpus = self.prefill.num_gpus + self.decode.num_gpus
        if total_gpus > 1.0 + 1e-9:
            raise ValueError(
                f"prefill.num_gpus + decode.num_gpus = {total_gpus:g} must be <= 1 "
                "(both phases share one GPU)"
            )
        shares = [p.gpu_memory_utilization for p in (self.prefill, self.decode)]
        if all(s is not None for s in shares):
            total = sum(s for s in shares if s is not None)
            limit = 1.0 - self.memory_headroom
            if total > limit + 1e-9:
                raise ValueError(
                    f"prefill.gpu_memory_utilization + decode.gpu_memory_utilization = "
                    f"{total:g} must be <= {limit:g} (1 - memory_headroom)"
                )
        return self

    @property
    def is_unified(self) -> bool:
        return self.mode == "unified"

    @model_validator(mode="after")
    def _ports_differ(self) -> AppConfig:
        if not self.is_unified and self.prefill.nixl_side_channel_port == self.decode.nixl_side_channel_port:
            raise ValueError(
                "prefill.nixl_side_channel_port and decode.nixl_side_channel_port must differ "
                f"(both are {self.decode.nixl_side_channel_port})"
            )
        return self

    @model_validator(mode="after")
    def _pair_ports_differ(self) -> AppConfig:
        """A phase's engines use `nixl_side_channel_port + 0..max_pairs-1`, one each on a host
        (`kv_transfer.claim_side_channel`): the two ranges must not overlap."""
        num = self.max_pairs
        if self.is_unified or num == 1:
            return self
        low, high = sorted((self.prefill.nixl_side_channel_port, self.decode.nixl_side_channel_port))
        if high - low < num or high + num - 1 > 65535:
            field = "pairs" if self.pairs_autoscaling is None else "pairs.max"
            raise ValueError(
                f"{field}: {num} pairs use NIXL side-channel ports "
                f"prefill.nixl_side_channel_port + 0..{num - 1} and "
                f"decode.nixl_side_channel_port + 0..{num - 1}: the two ports must be at "
                f"least {num} apart (they are {high - low}) and the ranges within 65535"
            )
        return self

    @property
    def pairs_autoscaling(self) -> PairsAutoscaling | None:
        """The autoscaling range of `pairs`; None where the count is fixed."""
        return self.pairs if isinstance(self.pairs, PairsAutoscaling) else None

    @property
    def min_pairs(self) -> int:
        """The fewest pairs the app runs: the fixed count, or the range's `min`."""
        scaling = self.pairs_autoscaling
        return self.pairs if scaling is None else scaling.min

    @property
    def max_pairs(self) -> int:
        """The most pairs the app runs: the fixed count, or the range's `max` (a phase's NIXL
        ports go up to `nixl_side_channel_port + max_pairs - 1`)."""
        scaling = self.pairs_autoscaling
        return self.pairs if scaling is None else scaling.max

    @model_validator(mode="after")
    def _settings_match_the_device(self) -> AppConfig:
        gpu_only = ("sm_percentage", "pinned_device_mem_limit", "gpu_memory_utilization")
        cpu_only = ("cpu_cores", "cpu_kv_cache_gib", "cpu_nice", "cpu_poll_sleep_us",
                    "cpu_poll_spin_us")
        wrong = cpu_only if self.device == "cuda" else gpu_only
        for phase in self.engine_phases:
            cfg: PhaseConfig = getattr(self, phase)
            for name in wrong:
                if getattr(cfg, name) is not None:
                    other = "cpu" if self.device == "cuda" else "cuda"
                    raise ValueError(f"{phase}.{name} applies to device: {other} only")
            if cfg.cpu_poll_spin_us is not None and cfg.cpu_poll_sleep_us is None:
                raise ValueError(f"{phase}.cpu_poll_spin_us needs {phase}.cpu_poll_sleep_us "
                                 "(without it the engine spins all the time)")
            if cfg.gpu_memory_utilization is not None and cfg.kv_cache_memory_bytes is not None:
                raise ValueError(
                    f"{phase}.gpu_memory_utilization and {phase}.kv_cache_memory_bytes are "
                    "exclusive: set one (a fixed KV pool, or a share of the card)"
                )
            if cfg.pinned_device_mem_limit is not None and cfg.sm_percentage is None:
                raise ValueError(
                    f"{phase}.pinned_device_mem_limit is an MPS limit: it needs "
                    f"{phase}.sm_percentage (1..100) too"
                )
        return self

    @model_validator(mode="after")
    def _parallel_start_needs_fixed_pools(self) -> AppConfig:
        if self.device == "cuda" and self.start_order == "parallel":
            unpinned = [
                phase
                for phase in self.engine_phases
                if getattr(self, phase).kv_cache_memory_bytes is None
            ]
            if unpinned:
                raise ValueError(
                    "start_order: parallel lets two engines profile GPU memory at once, which "
                    "sizes their KV caches wrongly (vllm issue 55827); set "
                    f"{', '.join(p + '.kv_cache_memory_bytes' for p in unpinned)} or use "
                    "start_order: prefill_first"
                )
        return self

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value: str | None) -> str | None:
        if value is not None and value not in GPU_PRESETS_MIB:
            raise ValueError(
                f"unknown gpu {value!r}; allowed: {', '.join(sorted(GPU_PRESETS_MIB))} "
                "(or set gpu_memory_gib instead)"
            )
        return value

    @model_validator(mode="after")
    def _memory_plan_fits(self) -> AppConfig:
        """The planner's arithmetic at build time (last: the simpler rules speak first)."""
        if self.gpu is not None and self.gpu_memory_gib is not None:
            raise ValueError("gpu and gpu_memory_gib are exclusive: set one")
        check_app_memory(self)
        return self

    @property
    def kv_buffer_device(self) -> str:
        if self.kv_transfer.buffer_device != "auto":
            return self.kv_transfer.buffer_device
        return self.device

    def for_replica(self, role: str, slot: int) -> AppConfig:
        """This config as the `role` engine with pair port `slot` (0..max_pairs-1) runs it."""
        if slot == 0:
            return self
        phase = self.phase(role)
        port = phase.nixl_side_channel_port + slot
        return self.model_copy(
            update={role: phase.model_copy(update={"nixl_side_channel_port": port})}
        )

    def phase(self, role: str) -> PhaseConfig:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be 'prefill' or 'decode', got {role!r}")
        return self.prefill if role == "prefill" else self.decode
