"""``Settings``: typed configuration from a TOML file + ``STREAMLABEL_*`` environment variables.

Environment variables name a key as ``STREAMLABEL_<SECTION>__<KEY>`` (e.g. ``STREAMLABEL_KAFKA__BOOTSTRAP_SERVERS``,
``STREAMLABEL_BATCHING__MAX_BATCH=64``) and win over the file. This is the only module that reads the
environment; everything else receives a ``Settings``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from pipeline.errors import ConfigError

ENV_PREFIX = "STREAMLABEL_"


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"  # host:port[,host:port…] of the brokers
    group_id: str = "streamlabel"  # the consumer group the workers share (and exactly-once transactional ids)
    client_id: str = "streamlabel"  # prefix of every client id (broker logs and quotas)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"  # as the listener speaks
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None  # SASL_*: how to authenticate
    sasl_username: str | None = None  # SASL_*
    sasl_password: str | None = None  # SASL_* (never logged; prefer STREAMLABEL_KAFKA__SASL_PASSWORD)
    ssl_cafile: str | None = None  # SSL, SASL_SSL: CA that signed the brokers' certificates (PEM)
    ssl_certfile: str | None = None  # mutual TLS: this client's certificate (PEM)
    ssl_keyfile: str | None = None  # mutual TLS: its private key (PEM)
    session_timeout_ms: int = 10_000  # a worker silent this long leaves the group (its partitions move)
    max_poll_interval_ms: int = 300_000  # the longest between two polls before the group evicts a worker
    fetch_max_records: int = 1000  # records per poll at most
    fetch_max_wait_ms: int = 100  # broker long-poll when idle (it answers at once when a record arrives)
    fetch_min_bytes: int = 0  # 0: adaptive (see fetch_gather_ms); > 0: the broker answers once this much is there
    # 5 → 20 on 2026-12-05: MiniLM at 700 events/s, worker CPU per event outside the engine 378/399 → 230/274 µs,
    # p99 149/91 → 65/129 ms (two runs each; docs/results/2026-12-05-engine-eos-shadow.md)
    fetch_gather_ms: float = 20.0  # adaptive: under load, a fetch may wait this long for more records (≤ objective_ms / 10)
    linger_ms: int = 0  # aiokafka still batches whatever queues while a request is in flight
    compression: Literal["none", "gzip", "lz4", "zstd"] = "lz4"  # of the outputs the worker produces
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"  # where a group without a committed offset starts


@dataclass(frozen=True)
class TopicSettings:
    input: str = "text-events"  # the text events to label or answer
    output: str = "labels"  # the label (or generated-text) records
    dlq: str = "text-events-dlq"  # dead letters: the original record, the reason in a header
    create: bool = False  # create missing topics at start (else a missing topic is an error naming it)
    partitions: int = 4  # for topics created here
    replication_factor: int = 1  # for topics created here


@dataclass(frozen=True)
class BatchingSettings:
    max_batch: int = 64  # texts per engine call (generators: decode rows)
    max_tokens: int = 8192  # padded tokens per engine call (rows × longest text)
    max_wait_ms: float = 0.0  # 0: dispatch at once when the engine is idle; >0: let small batches grow this long
    engine_concurrency: int | None = None  # concurrent engine calls; default (0 or unset): model.sessions
    engine_timeout_s: float = 30.0  # an engine call longer than this means a hung engine: the worker stops (exit 4)


@dataclass(frozen=True)
class WorkerSettings:
    max_inflight: int = 4096  # records taken from Kafka but not yet committed; pause partitions above it
    max_inflight_bytes: int = 64 * 1024 * 1024  # and the bytes those records hold (values, keys, headers)
    max_bytes: int = 64 * 1024  # a record value larger than this goes to the DLQ (oversized)
    max_chars: int = 10_000  # so does a text longer than this
    dlq_max_bytes: int = 512 * 1024  # DLQ copies keep at most this much of the value (and say so in a header)
    # 100 → 50 ms on 2026-12-05 (MiniLM on 2 cores, same day: took exactly-once's low-load p50 from 85 to 60 ms and
    # its knee at the SLO from 302 to 444 events/s; docs/results/2026-12-05-engine-eos-shadow.md)
    commit_interval_ms: int = 50  # at-least-once: offset commits; exactly-once: a transaction's time open (its latency floor)
    drain_timeout_s: float = 10.0  # SIGTERM / revocation grace for in-flight work
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"  # see docs/delivery.md
    failpoint: str | None = None  # fault tests only: "after_inference:200" kills the process there (see failpoints.py)


@dataclass(frozen=True)
class CacheSettings:
    enabled: bool = True  # false: no cache at all (not even in-process)
    redis_url: str | None = "redis://127.0.0.1:6379/0"  # "none": the in-process cache only
    redis_password: str | None = None  # AUTH for every Redis client (the cache and the alerting state)
    redis_tls: bool = False  # TLS for every Redis client (redis:// becomes rediss://)
    redis_ca_file: str | None = None  # CA that signed the Redis server certificate (TLS)
    redis_generations: bool = False  # also keep generated texts (which can quote the input) in Redis
    ttl_s: int = 86_400  # how long an answer stays in Redis
    local_size: int = 100_000  # entries of the in-process LRU in front of Redis
    timeout_ms: int = 50  # a slow Redis must not hold up labels
    breaker_failures: int = 3  # consecutive errors that open the circuit
    breaker_reset_s: float = 2.0  # then one probe after this long


@dataclass(frozen=True)
class ModelSettings:
    path: str = "models/sentiment-minilm"  # an artifact version directory, or its name directory (the newest version)
    variant: Literal["fp32", "int8", "fp16", "int4"] | None = None  # default: int8 on CPU, fp16 on CUDA (generators: the gate's CPU default)
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"  # auto: CUDA when onnxruntime-gpu sees a GPU
    threads: int | None = None  # ONNX Runtime intra-op threads (default, 0 or unset: every core)
    sessions: int | None = None  # session replicas sharing the threads (default, 0 or unset: 2 on CPU, 1 on GPU)
    io_binding: bool | None = None  # bucketed IOBinding runs, buffers preallocated per batch shape (default: on with CUDA)
    cuda_graph: bool | None = None  # CUDA graphs: a classifier's per batch shape (with io_binding), a generator's decode step per row bucket (default: on with CUDA)
    max_length: int | None = None  # truncate texts to this many tokens (default: the artifact's)
    cascade: tuple[str, ...] = ()  # two classifier artifacts: [first, second]; replaces path (see pipeline/cascade.py)
    cascade_threshold: float = 0.9  # below this top probability the first stage escalates (model calibrate-cascade)
    follow: bool = False  # hot swap: path is a name directory; serve its `current` version (else the newest) as it moves
    follow_interval_s: float = 5.0  # how often each worker looks at the name directory (follow)
    shadow_topic: str | None = None  # follow: a shadow's answers beside the served ones go here too (best effort)
    shadow_idle_min: float = 0.5  # a shadow on CPU labels only while this share of the CPU is idle (0: no such check)


@dataclass(frozen=True)
class GenerateSettings:
    """Generator artifacts only (task text-generation): the prompt and the decoding."""

    template: str = "reply"  # reply | summary | explain-label (pipeline/generation/templates.py)
    system: str | None = None  # override the template's system message ({text} {source} {entity} {label})
    user: str | None = None  # override the template's user message
    max_new_tokens: int = 32  # tokens generated per event at most
    stop: tuple[str, ...] = ()  # stop strings (TOML list; env: a JSON list)
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks: the same work per event for everyone)
    do_sample: bool = False  # greedy by default; sampling is seeded per prompt (reproducible)
    temperature: float = 0.7  # do_sample: softmax temperature
    top_p: float = 0.95  # do_sample: nucleus sampling mass
    seed: int = 0  # do_sample: with each prompt's digest, the seed of its draws
    prefill_tokens: int = 512  # prompt tokens prefilled between two decode steps (bounds the running rows' stall)
    max_prompt_tokens: int | None = None  # default: the model's context minus max_new_tokens; longer → DLQ
    labels: tuple[str, ...] = ()  # serve the generator as a classifier of these labels (label-constrained decoding)
    instruction: str | None = None  # with labels: what to classify, e.g. "Classify the sentiment of the message."
    calibrate: bool = True  # with labels: divide out the model's label distribution on content-free inputs


@dataclass(frozen=True)
class FormatSettings:
    """The records' encoding: JSON (the default wire format), or Avro / Protobuf / JSON Schema in the Confluent wire
    format (magic byte + schema id) against a Schema Registry (docs/schema-registry.md)."""

    input: Literal["json", "avro", "protobuf", "json-schema"] = "json"  # of the input topic's values
    output: Literal["json", "avro", "protobuf", "json-schema"] = "json"  # of the output topic's values (DLQ: the original)
    registry_url: str | None = None  # e.g. http://schema-registry:8081 (Confluent API; Apicurio: …/apis/ccompat/v7)
    registry_username: str | None = None  # HTTP basic auth
    registry_password: str | None = None  # (never logged; prefer STREAMLABEL_FORMAT__REGISTRY_PASSWORD)
    registry_ca_file: str | None = None  # TLS: CA that signed the registry's certificate (PEM)
    registry_certfile: str | None = None  # mutual TLS: this client's certificate (PEM)
    registry_keyfile: str | None = None  # mutual TLS: its private key (PEM)
    registry_timeout_s: float = 5.0  # per registry request; an unreachable registry is retried with backoff
    subject_strategy: Literal["topic", "record", "topic_record"] = "topic"  # output subject: TOPIC-value, RECORD, TOPIC-RECORD
    text_field: str = "text"  # input field holding the text (a dotted path reaches into nested records)
    id_field: str = "id"  # input field holding the event id (default: topic-partition-offset)
    source_field: str = "source"
    entity_field: str = "entity"
    ts_field: str = "ts"  # epoch ms, an Avro timestamp-millis or a protobuf Timestamp (default: the record timestamp)


@dataclass(frozen=True)
class BacklogSettings:
    """Backlog mode (classifiers): throughput-optimal batching while the lag is large (docs/operations.md#backlog)."""

    enabled: bool = False  # true: switch while the lag is large (off by default: it did not drain faster here, see docs)
    lag_records: int = 20_000  # this worker's lag above which it drains in backlog mode (back below a quarter of it)
    max_batch: int = 256  # texts per engine call while draining
    max_tokens: int = 32_768  # padded tokens per engine call while draining
    rate_window_s: float = 10.0  # the service rate behind the drain-time estimate is measured over this long


@dataclass(frozen=True)
class TracingSettings:
    """OpenTelemetry spans (docs/tracing.md). Off unless an endpoint is set: no cost when off."""

    otlp_endpoint: str | None = None  # OTLP/HTTP base URL, e.g. http://otel-collector:4318 (spans go to /v1/traces)
    service_name: str = "streamlabel"  # the resource's service.name
    sample_ratio: float = 1.0  # of traces started here; a message with a traceparent follows its parent's decision
    export_timeout_s: float = 10.0  # per export request
    max_queue_spans: int = 20_000  # spans waiting for export at most (more are dropped, never blocking the worker)


@dataclass(frozen=True)
class SloSettings:
    objective_ms: float = 100.0  # the latency objective: record timestamp to output, per event
    target: float = 0.99  # share of events that must meet it (goodput target; burn rates are against 1 − target)


@dataclass(frozen=True)
class MetricsSettings:
    port: int | None = 9464  # None: no HTTP endpoint
    host: str = "127.0.0.1"  # bind address of /metrics, /healthz, /readyz (0.0.0.0 in containers)
    summary_interval_s: float = 10.0  # one summary log line this often
    liveness_stall_s: float = 10.0  # /healthz fails once the event loop has not run its heartbeat for this long
    max_connections: int = 8  # concurrent HTTP connections to the metrics/health endpoint (more: 503 at once)


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"  # of streamlabel's lines (aiokafka's only at debug)
    format: Literal["auto", "json", "console"] = "auto"  # auto: readable in a terminal, JSON otherwise
    log_text: bool = False  # log each dead-lettered value (its first 500 bytes); off: no raw text in any log line


@dataclass(frozen=True)
class AlertingSettings:
    input: str | None = None  # default: topics.output (the label topic)
    output: str = "alerts"  # the alert records (firing and resolved)
    group_id: str = "streamlabel-alerts"  # the alerting workers' consumer group
    lateness_s: float = 30.0  # events older than the newest seen minus this are dropped (counted)
    state_redis_url: str | None = "redis://127.0.0.1:6379/0"  # window state + offsets; "none": restarts forget
    webhook_url: str | None = None  # also POST each alert (JSON) here
    webhook_timeout_s: float = 5.0  # per webhook attempt
    webhook_retries: int = 3  # attempts after the first, with backoff; then the alert is logged and dropped
    rules: tuple = ()  # of pipeline.alerts.Rule, from [[alerting.rules]]


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    format: FormatSettings = field(default_factory=FormatSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    backlog: BacklogSettings = field(default_factory=BacklogSettings)
    slo: SloSettings = field(default_factory=SloSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    alerting: AlertingSettings = field(default_factory=AlertingSettings)

    def replace(self, **sections: Mapping[str, Any]) -> Settings:
        """A copy with some keys changed: ``s.replace(topics={"input": "x"})``."""
        data = {name: _as_dict(getattr(self, name)) for name in _as_dict(self)}
        for name, changes in sections.items():
            data.setdefault(name, {}).update(changes)
        return _build(data, "override")


def _as_dict(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (optional) then apply ``STREAMLABEL_*`` variables; errors name the key."""
    data: dict[str, dict[str, Any]] = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        where = str(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config file not found", where=str(p), hint="pass an existing TOML file with --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML ({exc})", where=str(p)) from None
    env = os.environ if env is None else env
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        data.setdefault(section, {})[key] = _EnvValue(raw, name)
    return _build(data, where)


class _EnvValue(str):
    def __new__(cls, value: str, var: str):
        obj = super().__new__(cls, value)
        obj.var = var
        return obj


def _build(data: Mapping[str, Any], where: str) -> Settings:
    sections = {}
    hints = typing.get_type_hints(Settings)
    for sname, sval in data.items():
        if sname not in hints:
            raise ConfigError(f"unknown section [{sname}]", where=where, hint=f"sections are: {', '.join(hints)}")
        if not isinstance(sval, Mapping):
            raise ConfigError(f"[{sname}] must be a table", where=where)
        cls = hints[sname]
        fhints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in sval.items():
            if sname == "alerting" and key == "rules":
                from pipeline.alerts import Rule, parse_rules

                kwargs[key] = tuple(value) if value and all(isinstance(r, Rule) for r in value) else parse_rules(value, where)
                continue
            if key not in fhints:
                raise ConfigError(f"unknown key '{sname}.{key}'", where=getattr(value, "var", where),
                                  hint=f"keys of [{sname}] are: {', '.join(fhints)}")
            kwargs[key] = _coerce(value, fhints[key], f"{sname}.{key}", getattr(value, "var", where))
        sections[sname] = cls(**kwargs)
    s = Settings(**sections)
    _check(s, where)
    return s


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, str) and value.lower() in ("", "none", "null") and type(None) in args:
            return None
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{key}' is {value!r}; allowed: {', '.join(map(repr, args))}", where=where)
        return str(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"'{key}' must be true or false, got {value!r}", where=where)
    if tp in (int, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            return tp(value) if tp is float or isinstance(value, int) or str(value).lstrip("-").isdigit() else int(str(value), 10)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}' must be a{'n integer' if tp is int else ' number'}, got {value!r}", where=where) from None
    if origin is tuple:
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value) if value.strip().startswith("[") else [value]
            except ValueError:
                raise ConfigError(f"'{key}' must be a JSON list of strings, got {value!r}", where=where) from None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"'{key}' must be a list of strings, got {value!r}", where=where)
        return tuple(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}", where=where)
        return str(value)
    return value


def _check(s: Settings, where: str) -> None:
    positive = {
        "batching.max_batch": s.batching.max_batch, "batching.max_tokens": s.batching.max_tokens,
        "worker.max_inflight": s.worker.max_inflight, "worker.max_inflight_bytes": s.worker.max_inflight_bytes,
        "worker.max_bytes": s.worker.max_bytes, "worker.max_chars": s.worker.max_chars,
        "slo.objective_ms": s.slo.objective_ms, "cache.ttl_s": s.cache.ttl_s,
        "batching.engine_timeout_s": s.batching.engine_timeout_s, "worker.dlq_max_bytes": s.worker.dlq_max_bytes,
        "worker.drain_timeout_s": s.worker.drain_timeout_s, "worker.commit_interval_ms": s.worker.commit_interval_ms,
        "metrics.liveness_stall_s": s.metrics.liveness_stall_s, "metrics.max_connections": s.metrics.max_connections,
        "topics.partitions": s.topics.partitions, "topics.replication_factor": s.topics.replication_factor,
    }
    positive.update({"backlog.lag_records": s.backlog.lag_records, "backlog.max_batch": s.backlog.max_batch,
                     "backlog.max_tokens": s.backlog.max_tokens, "backlog.rate_window_s": s.backlog.rate_window_s})
    positive.update({"generate.max_new_tokens": s.generate.max_new_tokens, "generate.prefill_tokens": s.generate.prefill_tokens})
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"'{key}' must be positive, got {v}", where=where)
    for key, v in {"batching.engine_concurrency": s.batching.engine_concurrency, "model.sessions": s.model.sessions,
                   "model.threads": s.model.threads}.items():
        if v is not None and v < 0:
            raise ConfigError(f"'{key}' must be 0 (the default) or positive, got {v}", where=where)
    if s.model.follow and s.model.cascade:
        raise ConfigError("'model.follow' follows one classifier's name directory, not a cascade", where=where,
                          hint="unset model.cascade, or model.follow (restart the workers to change a cascade)")
    if s.model.follow and (Path(s.model.path) / "manifest.json").is_file():
        raise ConfigError(f"'model.follow' needs model.path to be a name directory (models/NAME), not the version "
                          f"directory {s.model.path}", where=where, hint="e.g. path = \"models/sentiment-minilm\"")
    if s.model.shadow_topic and s.model.shadow_topic in (s.topics.input, s.topics.output, s.topics.dlq):
        raise ConfigError(f"'model.shadow_topic' must be a topic of its own, not {s.model.shadow_topic!r}", where=where)
    if s.model.follow_interval_s <= 0:
        raise ConfigError(f"'model.follow_interval_s' must be positive, got {s.model.follow_interval_s}", where=where)
    if not 0 < s.slo.target < 1:
        raise ConfigError(f"'slo.target' must be between 0 and 1 (e.g. 0.99), got {s.slo.target}", where=where)
    if s.batching.max_wait_ms < 0:
        raise ConfigError("'batching.max_wait_ms' must be ≥ 0", where=where)
    if s.kafka.security_protocol.startswith("SASL") and not (s.kafka.sasl_mechanism and s.kafka.sasl_username):
        raise ConfigError("SASL needs 'kafka.sasl_mechanism' and 'kafka.sasl_username' (and sasl_password)", where=where)
    f = s.format
    if (f.input != "json" or f.output != "json") and not f.registry_url:
        raise ConfigError(f"format {f.input if f.input != 'json' else f.output!r} needs a Schema Registry: "
                          "'format.registry_url' is not set", where=where,
                          hint="e.g. [format] registry_url = \"http://schema-registry:8081\"")
    if f.registry_url and not f.registry_url.startswith(("http://", "https://")):
        raise ConfigError(f"'format.registry_url' must be an http:// or https:// URL, got {f.registry_url!r}", where=where)
    if f.registry_timeout_s <= 0:
        raise ConfigError(f"'format.registry_timeout_s' must be positive, got {f.registry_timeout_s}", where=where)
    if bool(f.registry_username) != bool(f.registry_password):
        raise ConfigError("registry basic auth needs both 'format.registry_username' and 'format.registry_password'",
                          where=where)
    tr = s.tracing
    if tr.otlp_endpoint and not tr.otlp_endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"'tracing.otlp_endpoint' must be an http:// or https:// URL (OTLP/HTTP), got "
                          f"{tr.otlp_endpoint!r}", where=where, hint="e.g. http://otel-collector:4318")
    if not 0 <= s.model.shadow_idle_min <= 1:
        raise ConfigError(f"'model.shadow_idle_min' must be between 0 and 1 (a share of the CPU), got "
                          f"{s.model.shadow_idle_min}", where=where)
    if not 0 <= tr.sample_ratio <= 1:
        raise ConfigError(f"'tracing.sample_ratio' must be between 0 and 1, got {tr.sample_ratio}", where=where)
    if len({s.topics.input, s.topics.output, s.topics.dlq}) < 3:
        raise ConfigError("'topics.input', 'topics.output' and 'topics.dlq' must be three different topics", where=where)
