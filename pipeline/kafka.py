"""The one place that builds Kafka clients from ``Settings`` (connection, SASL, TLS), and the start-up checks.

Every command and worker gets its aiokafka consumer, producer, transactional producer and admin client
here, so a SASL_SSL cluster works for ``run``, ``replay``, ``produce``, ``alerts`` and the demo alike.
``check_topics`` is what each command runs before it reads or writes: a missing topic is one error that
names it (created only when asked), an unreachable broker is one error that says which and why.

The rest of ``pipeline/`` stays Kafka-free; ``consumers/`` and ``producers/`` import aiokafka's types
(``TopicPartition``, errors) but build clients only through this module. It is also the one place that
works around aiokafka, each workaround named and explained where it is: the strict committed-offset read
(``_strict_fetch``), fetch parameters changed while running (``set_fetch_params``), and finding the record
batch a fetch failed to parse (``locate_unparsable``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
import aiokafka.errors as Errors
from aiokafka import TopicPartition
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import (
    AuthenticationFailedError,
    BrokerResponseError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)

from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.commit import OffsetFetchRequest_v3
from aiokafka.protocol.types import Boolean, CompactArray, CompactString, Int16, Int32, Int64, Schema, TaggedFields
from aiokafka.structs import OffsetAndMetadata

from pipeline.config import KafkaSettings, Settings

from pipeline.errors import ConfigError, KafkaUnreachable, MissingTopic, OffsetReadTimeout

__all__ = ["KafkaError", "MAX_REQUEST_BYTES", "OffsetReadTimeout", "START_TIMEOUT_S", "TopicInfo", "admin",
           "check_topics", "client_kwargs", "committed", "connection_error", "consumer", "ensure_topics", "fetch_params",
           "locate_unparsable", "producer", "set_fetch_params", "transactional_producer"]

# The producer refuses records above this (aiokafka's default); DLQ copies are capped below it.
MAX_REQUEST_BYTES = 1_048_576
START_TIMEOUT_S = 20.0


def _k(s: Settings | KafkaSettings | str) -> KafkaSettings:
    if isinstance(s, Settings):
        return s.kafka
    if isinstance(s, str):
        return KafkaSettings(bootstrap_servers=s)
    return s


def client_kwargs(s: Settings | KafkaSettings | str) -> dict[str, Any]:
    """aiokafka keyword arguments for connection and security, shared by every client."""
    k = _k(s)
    kw: dict[str, Any] = {"bootstrap_servers": k.bootstrap_servers, "security_protocol": k.security_protocol}
    if k.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        try:
            kw["ssl_context"] = create_ssl_context(cafile=k.ssl_cafile, certfile=k.ssl_certfile, keyfile=k.ssl_keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS files: {exc}", where="kafka.ssl_cafile/ssl_certfile/ssl_keyfile",
                              hint="point them at readable PEM files") from None
    if k.security_protocol.startswith("SASL"):
        kw.update(sasl_mechanism=k.sasl_mechanism, sasl_plain_username=k.sasl_username,
                  sasl_plain_password=k.sasl_password)
    return kw


def _compression(k: KafkaSettings) -> str | None:
    return None if k.compression == "none" else k.compression


def consumer(s: Settings | KafkaSettings | str, *topics: str, group_id: str | None, **overrides) -> AIOKafkaConsumer:
    """A consumer; ``group_id=None`` reads without a group (tails, read-backs)."""
    k = _k(s)
    kw: dict[str, Any] = dict(client_kwargs(k), group_id=group_id, enable_auto_commit=False,
                              auto_offset_reset=k.auto_offset_reset, isolation_level="read_committed",
                              client_id=k.client_id)
    kw.update(overrides)
    return AIOKafkaConsumer(*topics, **kw)


def producer(s: Settings | KafkaSettings | str, **overrides) -> AIOKafkaProducer:
    """An idempotent, acks=all producer (the worker's outputs and DLQ records)."""
    k = _k(s)
    kw: dict[str, Any] = dict(client_kwargs(k), acks="all", enable_idempotence=True, linger_ms=k.linger_ms,
                              compression_type=_compression(k), max_request_size=MAX_REQUEST_BYTES,
                              client_id=k.client_id)
    kw.update(overrides)
    return AIOKafkaProducer(**kw)


def transactional_producer(s: Settings | KafkaSettings, transactional_id: str, **overrides) -> AIOKafkaProducer:
    """A transactional producer; ``start()`` runs InitProducerId, which fences older owners of the id."""
    return producer(s, transactional_id=transactional_id, **overrides)


def admin(s: Settings | KafkaSettings | str, **overrides) -> AIOKafkaAdminClient:
    kw = dict(client_kwargs(s), request_timeout_ms=int(START_TIMEOUT_S * 1000))
    kw.update(overrides)
    return AIOKafkaAdminClient(**kw)


class _LastConnectError(logging.Handler):
    """aiokafka reports why a bootstrap connection failed (refused credentials, TLS) only in a log line and then
    raises a bare "Unable to bootstrap"; this keeps that reason so the user's error can name it."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.err: BaseException | None = None
        self.at = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("Unable connect to") and record.args:
            err = record.args[-1]
            if isinstance(err, BaseException):
                self.err, self.at = err, time.monotonic()


_last_connect = _LastConnectError()
_client_log = logging.getLogger("aiokafka")  # aiokafka's client logs under this name
_client_log.addHandler(_last_connect)
# Its errors are kept for connection_error, and printed only at debug level (pipeline.logs.configure turns
# propagation on there): self-healing events (coordinator moves, retries) are logged by aiokafka as errors.
_client_log.setLevel(logging.ERROR)
_client_log.propagate = False


def connection_error(s: Settings | KafkaSettings | str, exc: BaseException) -> ConfigError:
    """One line for a failed connection: unreachable, refused credentials or TLS, with what to check."""
    k = _k(s)
    if isinstance(exc, KafkaConnectionError) and _last_connect.err is not None and time.monotonic() - _last_connect.at < 60:
        cause = _last_connect.err
        if not isinstance(cause, (KafkaConnectionError, OSError, asyncio.TimeoutError)) or isinstance(cause, ssl.SSLError):
            exc = cause  # the reason behind "Unable to bootstrap": credentials, TLS, …
    where = f"Kafka at {k.bootstrap_servers}"
    if isinstance(exc, (SaslAuthenticationFailed, AuthenticationFailedError, UnsupportedSaslMechanismError)):
        return ConfigError(f"{where} refused the SASL credentials: {_short(exc)}",
                           hint="check kafka.sasl_mechanism, sasl_username and sasl_password")
    if isinstance(exc, ssl.SSLError) or "SSL" in type(exc).__name__ or "certificate" in str(exc).lower():
        return ConfigError(f"{where}: TLS handshake failed: {_short(exc)}",
                           hint="check kafka.security_protocol and kafka.ssl_cafile")
    if isinstance(exc, TopicAuthorizationFailedError):
        return ConfigError(f"{where}: not authorised for a topic: {_short(exc)}",
                           hint="grant this user Read/Write on the topics and the group")
    if isinstance(exc, (KafkaConnectionError, OSError, asyncio.TimeoutError)):
        hint = "is the broker running? check kafka.bootstrap_servers"
        if k.security_protocol != "PLAINTEXT":
            hint += f" and that the listener speaks {k.security_protocol}"
        why = ("no broker answered" if isinstance(exc, KafkaConnectionError)
               else "timed out" if isinstance(exc, asyncio.TimeoutError) else _short(exc))
        return KafkaUnreachable(f"cannot reach {where}: {why}", hint=hint)
    return ConfigError(f"{where}: {type(exc).__name__}: {_short(exc)}", hint="check the [kafka] settings")


def _short(exc: BaseException, n: int = 160) -> str:
    s = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return s if len(s) <= n else s[: n - 1] + "…"


@dataclass(frozen=True)
class TopicInfo:
    name: str
    partitions: int
    max_message_bytes: int | None  # the topic's max.message.bytes (None when it could not be read)


async def check_topics(s: Settings | KafkaSettings | str, topics: Mapping[str, str], *, create: bool = False,
                       partitions: int = 4, replication_factor: int = 1,
                       configs: Mapping[str, Mapping[str, str]] | None = None,
                       timeout_s: float = START_TIMEOUT_S) -> dict[str, TopicInfo]:
    """Check that each topic exists (``{role: name}``, e.g. ``{"input": "text-events"}``).

    A missing topic raises one ``ConfigError`` naming its role and name, unless ``create`` is set (then it
    is created with ``partitions`` and ``replication_factor``, and ``configs[name]`` if given). Returns what
    the broker says of each topic, including ``max.message.bytes`` (the DLQ caps its copies below it).
    """
    client = admin(s)
    try:
        try:
            await asyncio.wait_for(client.start(), timeout_s)
            existing = set(await asyncio.wait_for(client.list_topics(), timeout_s))
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            raise connection_error(s, exc) from None
        missing = {role: name for role, name in topics.items() if name not in existing}
        if missing and not create:
            role, name = next(iter(missing.items()))
            others = [f"'{n}'" for r, n in missing.items() if n != name]
            also = f" (also missing: {', '.join(others)})" if others else ""
            raise MissingTopic(f"the {role} topic '{name}' does not exist on {_k(s).bootstrap_servers}{also}",
                               topic=name, role=role,
                               where=f"topics.{role}" if role in ("input", "output", "dlq") else None,
                               hint="create it with kafka-topics.sh --create, fix the name, or pass --create-topics")
        if missing:
            new = [NewTopic(n, num_partitions=partitions, replication_factor=replication_factor,
                            topic_configs=dict((configs or {}).get(n, {}))) for n in set(missing.values())]
            try:
                resp = await asyncio.wait_for(client.create_topics(new), timeout_s)
            except TopicAlreadyExistsError:
                resp = None
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                raise ConfigError(f"cannot create topics {sorted(missing.values())}: {_short(exc)}",
                                  hint="create them yourself, or check the broker's permissions and replication") from None
            for err in _create_errors(resp):
                raise ConfigError(f"cannot create topic '{err[0]}': {err[1]}",
                                  hint="create it yourself, or lower topics.partitions / replication_factor")
            # CreateTopics answers once the controller has them; a broker's metadata may show them a moment
            # later. Return only when they are listed, so the caller's next client sees them.
            deadline = time.monotonic() + timeout_s
            while not set(missing.values()) <= set(await asyncio.wait_for(client.list_topics(), timeout_s)):
                if time.monotonic() > deadline:
                    raise ConfigError(f"topics {sorted(missing.values())} were created but are not listed after "
                                      f"{timeout_s:g} s", hint="check the broker's logs")
                await asyncio.sleep(0.05)  # polling the broker's metadata
        info: dict[str, TopicInfo] = {}
        names = sorted(set(topics.values()))
        try:
            described = await asyncio.wait_for(client.describe_topics(names), timeout_s)
            sizes = await asyncio.wait_for(_max_message_bytes(client, names), timeout_s)
        except (KafkaError, OSError, asyncio.TimeoutError):
            described, sizes = [], {}
        parts = {d["topic"]: len(d.get("partitions") or ()) for d in described}
        for role, name in topics.items():
            info[role] = TopicInfo(name, parts.get(name, 0), sizes.get(name))
        return info
    finally:
        try:
            await asyncio.wait_for(client.close(), 5)
        except (KafkaError, OSError, asyncio.TimeoutError):
            pass


def _create_errors(resp) -> list[tuple[str, str]]:
    out = []
    for item in getattr(resp, "topic_errors", None) or ():
        name, code = item[0], item[1]
        msg = item[2] if len(item) > 2 else None
        if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS (a race with another worker): fine
            out.append((name, msg or f"error code {code}"))
    return out


async def _max_message_bytes(client: AIOKafkaAdminClient, names: Iterable[str]) -> dict[str, int]:
    res = ConfigResourceType.TOPIC
    responses = await client.describe_configs([ConfigResource(res, n, {"max.message.bytes": None}) for n in names])
    out: dict[str, int] = {}
    for resp in responses:
        for r in getattr(resp, "resources", ()):
            # (error_code, error_message, resource_type, resource_name, config_entries)
            name, entries = r[3], r[4]
            for e in entries:
                if e[0] == "max.message.bytes" and e[1] is not None:
                    # What the broker says is untrusted too: only a positive int32 is a size; else the default holds.
                    v = e[1].strip() if isinstance(e[1], str) else ""
                    if v.isdigit() and 0 < int(v) < 2**31:
                        out[name] = int(v)
    return out


async def ensure_topics(s: Settings | KafkaSettings | str, names: Iterable[str], partitions: int = 4,
                        configs: Mapping[str, str] | None = None) -> None:
    """Create whichever of ``names`` do not exist yet (demo, bench and tests)."""
    names = list(names)
    await check_topics(s, {n: n for n in names}, create=True, partitions=partitions,
                       configs={n: configs for n in names} if configs else None)


# ---------------------------------------------------------------------------------------------- committed offsets
# aiokafka (0.14) reads committed offsets with OffsetFetch v3 and ignores the response's group-level error code.
# A broker that has just restarted answers COORDINATOR_LOAD_IN_PROGRESS (or NOT_COORDINATOR) there, with no
# partitions, and aiokafka turns that into "never committed": the consumer then starts from its reset policy
# (``earliest``: a whole partition labelled again; ``latest``: records skipped), and ``committed()`` returns None.
# It also cannot ask for stable offsets (KIP-447 ``require_stable``, OffsetFetch v7), so right after a transaction
# ends it may answer the offset from before it. ``_strict_fetch`` replaces the coordinator's one OffsetFetch
# call: v7 with ``require_stable`` where the broker has it (Kafka 2.5+), v3 otherwise; every error, the
# group-level one included, is raised, and aiokafka's callers retry the retriable ones (the consumer's own
# position refresh and ``committed()`` alike). "Never committed" is returned only when the broker says so.

UNSTABLE_OFFSET_COMMIT = 88  # KIP-447: a transaction holding offsets for the partition is still open


class UnstableOffsetCommitError(BrokerResponseError):
    errno = UNSTABLE_OFFSET_COMMIT
    message = "UNSTABLE_OFFSET_COMMIT"
    description = "A transaction with offsets for this partition is still pending; retry."
    retriable = True


class _OffsetFetchResponse_v7(Response):
    API_KEY = 9
    API_VERSION = 7
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("topics", CompactArray(
            ("topic", CompactString("utf-8")),
            ("partitions", CompactArray(("partition", Int32), ("offset", Int64), ("leader_epoch", Int32),
                                        ("metadata", CompactString("utf-8")), ("error_code", Int16),
                                        ("tags", TaggedFields))),
            ("tags", TaggedFields))),
        ("error_code", Int16),
        ("tags", TaggedFields),
    )


class _OffsetFetchRequest_v7(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 9
    API_VERSION = 7
    RESPONSE_TYPE = _OffsetFetchResponse_v7
    SCHEMA = Schema(
        ("consumer_group", CompactString("utf-8")),
        ("topics", CompactArray(("topic", CompactString("utf-8")), ("partitions", CompactArray(Int32)),
                                ("tags", TaggedFields))),
        ("require_stable", Boolean),
        ("tags", TaggedFields),
    )


class StableOffsetFetch(Request[OffsetFetchRequest_v3 | _OffsetFetchRequest_v7]):
    """OffsetFetch for one group: v7 with ``require_stable`` when the broker has it, else v3."""

    API_KEY = 9

    def __init__(self, group_id: str, partitions: list[tuple[str, list[int]]]) -> None:
        self.group_id = group_id
        self.partitions = partitions

    def build(self, cls):
        if cls.API_VERSION >= 7:
            return cls(self.group_id, [(t, ps, {}) for t, ps in self.partitions], True, {})
        return cls(self.group_id, self.partitions)


def offsets_from_response(response) -> dict[TopicPartition, OffsetAndMetadata]:
    """The committed offsets an OffsetFetch response (v3 or v7) carries; raises its first error, group-level
    error included. A partition without a committed offset is absent from the result."""
    top = getattr(response, "error_code", 0)
    if top:
        raise _fetch_error(top)
    v7 = response.API_VERSION >= 7
    offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    for t in response.topics:
        topic, parts = t[0], t[1]
        for p in parts:
            partition, offset = p[0], p[1]
            metadata, code = (p[3], p[4]) if v7 else (p[2], p[3])
            if code:
                if Errors.for_code(code) is Errors.UnknownTopicOrPartitionError:
                    continue  # aiokafka's behaviour: no committed offset known for it
                raise _fetch_error(code)
            if offset != -1:
                offsets[TopicPartition(topic, partition)] = OffsetAndMetadata(offset, metadata or "")
    return offsets


def _fetch_error(code: int) -> BaseException:
    if code == UNSTABLE_OFFSET_COMMIT:
        return UnstableOffsetCommitError()
    err = Errors.for_code(code)
    return err() if err is not Errors.UnknownError else Errors.KafkaError(f"OffsetFetch error code {code}")


async def _strict_fetch(self, partitions):
    """``GroupCoordinator._do_fetch_commit_offsets`` with every error raised (see above)."""
    by_topic: dict[str, list[int]] = {}
    for tp in partitions:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    response = await self._send_req(StableOffsetFetch(self.group_id, list(by_topic.items())))
    try:
        return offsets_from_response(response)
    except (Errors.NotCoordinatorForGroupError, Errors.GroupCoordinatorNotAvailableError):
        self.coordinator_dead()  # find the coordinator again before the retry
        raise
    except Errors.GroupAuthorizationFailedError:
        raise Errors.GroupAuthorizationFailedError(self.group_id) from None


if not hasattr(GroupCoordinator, "_do_fetch_commit_offsets"):  # pragma: no cover — the pin says it is there
    raise ImportError("aiokafka's GroupCoordinator has no _do_fetch_commit_offsets: pipeline/kafka.py's "
                      "strict offset fetch needs updating for this aiokafka version")
AIOKAFKA_FETCH = GroupCoordinator._do_fetch_commit_offsets  # kept for the test that shows what it did
GroupCoordinator._do_fetch_commit_offsets = _strict_fetch


async def committed(consumer: AIOKafkaConsumer, tp: TopicPartition, timeout_s: float) -> int | None:
    """The committed offset of ``tp`` for the consumer's group (None: the broker says none was committed).

    Strict (see ``_strict_fetch``) and bounded: ``OffsetReadTimeout`` after ``timeout_s``.
    """
    try:
        return await asyncio.wait_for(consumer.committed(tp), timeout_s)
    except asyncio.TimeoutError:
        raise OffsetReadTimeout(f"no committed offset for {tp.topic}[{tp.partition}] within {timeout_s:g} s "
                                f"(the group coordinator is loading or moving)") from None


# ---------------------------------------------------------------------------------------------- fetching
def fetch_params(rate: float, record_bytes: float, gather_ms: float, idle_wait_ms: int) -> tuple[int, int]:
    """(fetch_min_bytes, fetch_max_wait_ms) for the observed arrival rate (records/s) and record size.

    Every fetch is a request, a response to parse and a wake-up of the loop. Idle or light load (fewer than
    two records per ``gather_ms``): the broker answers as soon as one byte is there and long-polls
    ``idle_wait_ms`` otherwise, so a lone record is not held back. Busier: ask the broker to gather what
    arrives in ``gather_ms`` (min bytes = rate × record size × gather time, at most 1 MiB; max wait =
    ``gather_ms``), so one fetch carries a handful of records and no record waits more than ``gather_ms``.
    """
    gather = gather_ms / 1000
    if rate * gather >= 2 and record_bytes > 0:
        return max(1, min(1 << 20, int(rate * gather * record_bytes))), max(1, int(gather_ms))
    return 1, idle_wait_ms


GATHER_MAX_MS = 50.0  # adaptive fetching: the longest a fetch gathers records under load


def gather_ms(floor_ms: float, call_s: float, objective_ms: float) -> float:
    """How long a fetch may gather under load: ``floor_ms`` (``kafka.fetch_gather_ms``), or half an engine call when
    that is longer (at most ``GATHER_MAX_MS``): while the engine is busy, records fetched one by one only wait in the
    scheduler for its next call. Never more than a tenth of the latency objective: every record pays it."""
    return min(max(floor_ms, min(GATHER_MAX_MS, 500 * call_s)), objective_ms / 10)


def set_fetch_params(consumer: AIOKafkaConsumer, min_bytes: int, max_wait_ms: int) -> bool:
    """Change a running consumer's fetch_min_bytes / fetch_max_wait_ms (aiokafka has no API for it; its fetcher
    reads both fields for every fetch request). False when this aiokafka's fetcher does not have them."""
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "_fetch_min_bytes") or not hasattr(fetcher, "_fetch_max_wait_ms"):
        return False
    fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = min_bytes, max_wait_ms
    return True


def locate_unparsable(exc: BaseException) -> tuple[TopicPartition, int, int] | None:
    """(partition, batch base offset, batch next offset) of the record batch aiokafka failed to parse.

    aiokafka raises a bare exception from its record iterator (``PartitionRecords._unpack_records``); the
    partition and the batch are only in that frame's locals, read here from the traceback. None if the
    traceback does not show them (another aiokafka version): the caller then steps every partition instead.
    """
    tb = exc.__traceback__
    found = None
    while tb is not None:
        f = tb.tb_frame
        if f.f_code.co_name == "_unpack_records" and "tp" in f.f_locals:
            tp = f.f_locals["tp"]
            nb = f.f_locals.get("next_batch")
            try:
                found = (tp, int(nb.base_offset), int(nb.next_offset)) if nb is not None else (tp, -1, -1)
            except (AttributeError, TypeError, ValueError):
                found = (tp, -1, -1)
        tb = tb.tb_next
    if found is not None and found[1] < 0:
        return (found[0], 0, 0)
    return found
