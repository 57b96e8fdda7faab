"""Kafka producers behind one tiny protocol, used by the alert sink and the dead-letter path.

A :class:`Producer` queues messages with :meth:`~Producer.produce` and confirms them with
:meth:`~Producer.flush`, which raises :class:`KafkaDeliveryError` if any message produced since the
previous flush was not acknowledged (``acks=all``).  Two implementations: :class:`KafkaPythonProducer`
(kafka-python, the default dependency) and :class:`ConfluentProducer` (confluent-kafka, the ``fast``
extra).  :func:`make_producer` builds either from the config's ``kafka.client`` and ``kafka.security``.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from .kafka_security import client_security_config, kafka_python_bootstrap

Headers = list[tuple[str, bytes]]


class _ClosedTransportIOFilter(logging.Filter):
    """Demote kafka-python's traceback for I/O on a connection it has already closed to DEBUG.

    kafka-python 3.0.12 closes each connection's socket on the thread that calls ``close()`` while its IO thread
    may sit between "socket readable" and ``recv`` (or in the middle of a ``send``); the IO thread then finds the
    socket gone (``None``, or closed) and logs "Error receiving network data" / "Error sending request data" at
    ERROR with a traceback, on a clean shutdown that loses nothing.  Only those records are demoted, and only
    when the transport was already closed and the error is the socket having gone (``AttributeError`` or
    ``OSError``); a failed read or write on an open connection is still an ERROR.
    """

    _MESSAGES = ("Error receiving network data", "Error sending request data")

    def filter(self, record: logging.LogRecord) -> bool:
        transport = record.args[0] if isinstance(record.args, tuple) and record.args else None
        exc = record.exc_info[1] if record.exc_info else None
        if (record.levelno >= logging.ERROR and any(m in str(record.msg) for m in self._MESSAGES)
                and isinstance(exc, AttributeError | OSError) and getattr(transport, "is_closing", lambda: False)()):
            # the logger let it through as an ERROR; handlers do not check the logger's level again
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("kafka.net.transport").addFilter(_ClosedTransportIOFilter())  # once, at import


class _RepeatFilter(logging.Filter):
    """Lets a message through once per ``window_s``, its durations aside (``after 3ms``): librdkafka logs a
    refused connection to each broker every reconnect (about 20 lines a second with the brokers away). Messages
    that differ otherwise (another broker, client or partition) are distinct. The next one let through says how
    many were held back since the last."""

    def __init__(self, window_s: float = 30.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[str, tuple[float, int]] = {}  # message, digits masked -> (time let through, left out)

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = re.sub(r"\b\d+ ?ms\b", "#ms", record.getMessage()), time.monotonic()
        shown, left_out = self._seen.get(key, (-math.inf, 0))
        if now - shown < self.window_s:
            self._seen[key] = (shown, left_out + 1)
            return False
        if len(self._seen) > 1000:  # bounded: messages differ by more than their numbers
            self._seen.clear()
        self._seen[key] = (now, 0)
        if left_out:
            record.msg = f"{record.getMessage()} ({left_out} more like it held back since the last one shown)"
            record.args = ()
        return True


LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
"""confluent-kafka clients log here (``"logger"`` in their config), not to stderr: JSON with --log-format json."""
LIBRDKAFKA_LOG.addFilter(_RepeatFilter())


class KafkaDeliveryError(RuntimeError):
    """Some messages produced since the last flush were refused, or failed for good."""


class KafkaDeliveryPending(KafkaDeliveryError):
    """Some messages were not acknowledged within the flush's timeout, and none failed: the brokers are slow or
    out of reach. The producer keeps them and goes on trying; the next flush waits for them again."""


class Producer(Protocol):
    """What the daemon needs from a Kafka producer."""

    def produce(self, topic: str, value: bytes, key: bytes | None = None, headers: Headers | None = None) -> None: ...

    def flush(self, timeout_s: float) -> None:
        """Wait for every message since the last flush; raise KafkaDeliveryError if any failed, else
        KafkaDeliveryPending if some are not acknowledged yet (kept for the next flush)."""
        ...

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout_s``) and release the client."""
        ...


def _delivery_error(errors: list[str], failed: int, total: int) -> KafkaDeliveryError:
    """``failed`` of ``total`` messages were not delivered; ``errors`` says why (the first three shown)."""
    shown = "; ".join(errors[:3]) + (f"; ... ({len(errors) - 3} more)" if len(errors) > 3 else "")
    return KafkaDeliveryError(f"{failed} of {total} Kafka messages not delivered: {shown}")


def _raise_failed(errors: list[str], pending: int, total: int, timeout_s: float) -> None:
    """KafkaDeliveryError for ``errors`` (messages refused or failed for good), else KafkaDeliveryPending for
    ``pending`` messages not acknowledged within ``timeout_s``; nothing when neither."""
    if errors:
        more = [f"{pending} more not acknowledged within {timeout_s:g}s"] if pending else []
        raise _delivery_error(errors + more, len(errors), total)
    if pending:
        raise KafkaDeliveryPending(f"{pending} of {total} Kafka messages not acknowledged within {timeout_s:g}s "
                                   "(brokers slow or out of reach; the producer keeps them and retries)")


_NEVER_GIVE_UP = {  # client options of a producer that keeps trying while the brokers are away
    # kafka-python: a send that finds no metadata for its topic is kept for the next flush after 1 s, not 10 s:
    # the loop's thread sends (kafka-python's send waits up to max_block_ms for that metadata)
    "kafka-python": {"delivery_timeout_ms": 2**31 - 1, "max_block_ms": 1000},  # delivery: about 24 days
    "confluent": {"message.timeout.ms": 0},  # librdkafka: no limit
}


# Messages a never-give-up kafka-python producer keeps because their topic has no metadata. Past this many, the
# topic is taken to be missing (kafka-python reports an unknown topic only as a metadata timeout): brokers out
# of reach bring no new records to dead-letter, while a consumer that keeps bringing them reads from live ones.
# The flush then fails for good (the daemon stops uncommitted) instead of holding the offsets, and memory, for ever.
MAX_UNSENT = 10_000

RECONNECT_BACKOFF_MAX_MS = 5000  # kafka-python's default, 30 s, kept a client away for up to 30 s after a broker
# came back (its readiness and deliveries with it; librdkafka's is 10 s)


def _wait_done(futures: list[Any], deadline: float) -> None:
    """Wait until every kafka-python future is done or ``deadline`` (``time.monotonic``) has passed. kafka-python's
    own flush waits up to its timeout for each batch in turn, so a flush over batches acknowledged one after
    another (one request in flight, a slow broker) could hold the loop for a multiple of its timeout."""
    for fut in futures:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if not fut.is_done:
            try:
                fut.get(timeout=left)
            except Exception:  # noqa: BLE001 - failed (the caller counts it) or not done by the deadline
                pass


class KafkaPythonProducer:
    """:class:`Producer` on kafka-python's ``KafkaProducer`` (acks=all); flush checks every send's future."""

    def __init__(self, bootstrap_servers: str, keep_unsent: bool = False, **client_config: Any):
        from kafka import KafkaProducer

        # Idempotence off: kafka-python 3.0.x turns any non-retriable batch error (e.g. a message too large
        # for the topic) of a non-transactional idempotent producer into a permanent fatal state that fails
        # every later send.  One request in flight keeps per-partition order; retries may duplicate, which
        # at-least-once delivery with stable alert ids tolerates.
        config: dict[str, Any] = {
            "acks": "all", "linger_ms": 5, "max_block_ms": 10_000,
            "enable_idempotence": False, "max_in_flight_requests_per_connection": 1,
            "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS,
        }  # fmt: skip
        config.update(client_config)
        self._producer = KafkaProducer(bootstrap_servers=bootstrap_servers, **config)
        self._futures: list[Any] = []
        self._errors: list[str] = []  # send() failures raised synchronously
        self._unsent: deque[tuple[str, bytes, bytes | None, list]] = deque()  # no topic metadata yet: sent later
        self._keep_unsent = keep_unsent  # else a send without metadata fails (a sink that re-sends keeps its own)
        self._no_metadata: set[str] = set()  # topics a send found no metadata for, since the last flush

    def produce(self, topic: str, value: bytes, key: bytes | None = None, headers: Headers | None = None) -> None:
        """Queue one message; a failure is reported by the next :meth:`flush`. Behind messages that found no topic
        metadata (brokers out of reach) it waits with them for the next flush, so each costs no wait of its own."""
        waiting = bool(self._unsent)
        # a header without a value (its consumer gives None) goes as an empty one: kafka-python's send refuses None
        self._unsent.append((topic, value, key, [(k, b"" if v is None else v) for k, v in headers or ()]))
        if not waiting:
            self._send_unsent()

    def _send_unsent(self) -> None:
        """Hand the messages waiting to be sent to the client, in order. ``send`` waits up to max_block_ms for the
        topic's metadata and raises KafkaTimeoutError when the brokers are out of reach: with ``keep_unsent`` that
        message and those after it wait for the next call (pending, not failed); otherwise it fails, and so do the
        later messages for that topic until the next flush, without a wait each (an alert burst waited 10 s per
        alert, on the scoring thread)."""
        from kafka.errors import KafkaTimeoutError

        while self._unsent:
            topic, value, key, headers = self._unsent[0]
            if topic in self._no_metadata:  # a send waited for it since the last flush
                self._errors.append(f"{topic}: KafkaTimeoutError: no metadata for the topic (brokers out of reach?)")
                self._unsent.popleft()
                continue
            try:
                self._futures.append(self._producer.send(topic, value=value, key=key, headers=headers))
            except Exception as exc:  # noqa: BLE001 - refused for good, e.g. MessageSizeTooLargeError
                if isinstance(exc, KafkaTimeoutError):
                    if self._keep_unsent:
                        return
                    self._no_metadata.add(topic)
                self._errors.append(f"{topic}: {type(exc).__name__}: {exc}")
            self._unsent.popleft()

    def flush(self, timeout_s: float) -> None:
        self._send_unsent()
        self._no_metadata.clear()  # the next send tries again
        futures, errors = self._futures, self._errors
        self._futures, self._errors = [], []
        total = len(futures) + len(errors) + len(self._unsent)
        _wait_done(futures, time.monotonic() + timeout_s)  # not kafka-python's flush: it waited timeout_s per batch
        pending = [fut for fut in futures if not fut.is_done]
        self._futures = pending  # still sent and retried by the client: the next flush waits for them
        errors += [f"{type(f.exception).__name__}: {f.exception}" for f in futures if f.is_done and f.failed()]
        if len(self._unsent) > MAX_UNSENT:  # kept, but the daemon stops (no commit; the next run re-sends them)
            topics = sorted({m[0] for m in self._unsent})
            errors.append(f"{len(self._unsent)} messages found no metadata for {topics}: does the topic exist "
                          "(auto.create.topics.enable off, or deleted)?")
        _raise_failed(errors, len(pending) + len(self._unsent), total, timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Give the messages still queued ``timeout_s`` to go out (their failure is the flushes' to report)."""
        try:
            self._producer.close(timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - KafkaTimeoutError: kafka-python's close flushes, and raises
            logging.getLogger("anomalyd").warning("Kafka producer closed with messages undelivered: %s", exc)


class ConfluentProducer:
    """:class:`Producer` on confluent-kafka (acks=all); delivery callbacks record failures for flush."""

    def __init__(self, bootstrap_servers: str, **client_config: Any):
        from confluent_kafka import Producer as _Producer

        config: dict[str, Any] = {"bootstrap.servers": bootstrap_servers, "acks": "all", "linger.ms": 5,
                                  "logger": LIBRDKAFKA_LOG}
        config.update(client_config)
        self._producer = _Producer(config)
        self._errors: list[str] = []
        self._count = 0
        self.queue_full_timeout_s = 10.0

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def produce(self, topic: str, value: bytes, key: bytes | None = None, headers: Headers | None = None) -> None:
        """Queue one message (waiting up to ``queue_full_timeout_s`` for space); failures go to flush."""
        from confluent_kafka import KafkaException

        self._count += 1
        deadline = time.monotonic() + self.queue_full_timeout_s
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=list(headers or []), on_delivery=self._on_delivery
                )
                break
            except BufferError:
                if time.monotonic() >= deadline:
                    self._errors.append(f"{topic}: local queue full for {self.queue_full_timeout_s:g}s")
                    return
                self._producer.poll(0.05)
            except KafkaException as exc:
                self._errors.append(f"{topic}: {exc}")
                return
        self._producer.poll(0)

    def flush(self, timeout_s: float) -> None:
        left = self._producer.flush(timeout_s)
        errors, total = self._errors, self._count
        self._errors, self._count = [], left  # still queued and retried by librdkafka: counted in the next flush
        _raise_failed(errors, left, total, timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        if self._producer.flush(timeout_s):
            self._producer.purge()
        self._producer.flush(0)
        close = getattr(self._producer, "close", None)  # confluent-kafka 2.x: the handle stops reconnecting now,
        if close is not None:  # not when it is garbage-collected (nothing is queued: flushed or purged above)
            close()


def make_producer(
    client: str, bootstrap_servers: str, security: Mapping[str, Any] | None = None, *, never_give_up: bool = False,
    **client_config: Any,
) -> Producer:
    """A producer for ``client`` ("kafka-python" | "confluent") with the mapped security options.

    ``never_give_up`` (dead letters, which nothing else keeps): messages are retried for as long as the brokers
    are away, and a flush meanwhile raises KafkaDeliveryPending; otherwise the clients' delivery timeouts apply
    (a sink that re-sends its alerts must not pile copies up in the producer)."""
    options = client_security_config(client, security) | (_NEVER_GIVE_UP[client] if never_give_up else {})
    options |= client_config
    if client == "kafka-python":
        with kafka_python_bootstrap(bootstrap_servers, security):
            return KafkaPythonProducer(bootstrap_servers, keep_unsent=never_give_up, **options)
    return ConfluentProducer(bootstrap_servers, **options)
