"""Dead letters: what anomalyd writes to ``kafka.dead_letter_topic`` for a message it cannot decode or validate.

The original value, key and headers (cut to what a producer accepts), then anomalyd's headers: the reason (one
of :data:`pipelines.decode.REASONS`), a detail, the source topic, partition and offset, where the whole message
stays, and the source record's timestamp (the dead letter itself gets its producer's time).
"""

from __future__ import annotations

__all__ = ["HEADER_DETAIL", "HEADER_HEADERS_UNREADABLE", "HEADER_OFFSET", "HEADER_PARTITION", "HEADER_REASON",
           "HEADER_TIMESTAMP", "HEADER_TOPIC", "dead_letter_copy", "dead_letter_headers"]

HEADER_REASON = "anomalyd-error-reason"
HEADER_DETAIL = "anomalyd-error-detail"
HEADER_TOPIC = "anomalyd-source-topic"
HEADER_PARTITION = "anomalyd-source-partition"
HEADER_OFFSET = "anomalyd-source-offset"
HEADER_TIMESTAMP = "anomalyd-source-timestamp"  # epoch ms; only where the source record has one (not -1)
HEADER_VALUE_BYTES = "anomalyd-original-value-bytes"  # only on a dead letter whose value was cut
HEADER_KEY_BYTES = "anomalyd-original-key-bytes"  # only on a dead letter whose key was cut
HEADER_HEADERS_BYTES = "anomalyd-original-headers-bytes"  # only on a dead letter whose original headers were left
# out: their size on the wire, at most (the lengths' varints counted at 5 bytes each)
HEADER_HEADERS_UNREADABLE = "anomalyd-original-headers-unreadable"  # in place of original headers the client could
# not read (a header name that is not UTF-8): why
MAX_DETAIL_CHARS = 500
DEAD_LETTER_MAX_VALUE_BYTES = 900_000  # under the producers' and brokers' default 1 MB message limits
DEAD_LETTER_MAX_KEY_BYTES = 16_384
DEAD_LETTER_MAX_HEADER_BYTES = 16_384  # the original headers, names and values together, with their framing
_HEADER_FRAMING_BYTES = 10  # a header's two length varints, at most 5 bytes each


def dead_letter_headers(reason: str, detail: str, topic: str, partition: int, offset: int,
                        timestamp_ms: int = -1) -> list[tuple[str, bytes]]:
    """Headers of a dead-lettered message: the reason, the detail (at most 500 characters), the source and, where
    the source record has one (``timestamp_ms`` >= 0), its timestamp in epoch milliseconds."""
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[: MAX_DETAIL_CHARS - 1] + "\u2026"
    headers = [
        (HEADER_REASON, reason.encode("utf-8")),
        (HEADER_DETAIL, detail.encode("utf-8", "backslashreplace")),
        (HEADER_TOPIC, topic.encode("utf-8")),
        (HEADER_PARTITION, str(int(partition)).encode("ascii")),
        (HEADER_OFFSET, str(int(offset)).encode("ascii")),
    ]
    if timestamp_ms >= 0:
        headers.append((HEADER_TIMESTAMP, str(int(timestamp_ms)).encode("ascii")))
    return headers


def dead_letter_copy(value: bytes, key: bytes | None, original_headers: list[tuple[str, bytes]],
                     headers: list[tuple[str, bytes]]) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    """The dead letter's value, key and headers: the original bytes, key and headers, then ``headers`` (anomalyd's).
    The value is cut to DEAD_LETTER_MAX_VALUE_BYTES, the key to DEAD_LETTER_MAX_KEY_BYTES, and original headers over
    DEAD_LETTER_MAX_HEADER_BYTES are left out, each with the original size in a header, so that a message too large
    for the producer (an ``oversized`` one, say) is dead-lettered instead of stopping the daemon on every restart.
    The whole message stays in the source topic at the offset the headers name."""
    size = sum(len(name.encode("utf-8", "surrogateescape")) + len(v or b"") + _HEADER_FRAMING_BYTES
               for name, v in original_headers)  # on the wire, at most: names' UTF-8, values, two lengths each
    if size > DEAD_LETTER_MAX_HEADER_BYTES:
        out = [*headers, (HEADER_HEADERS_BYTES, str(size).encode("ascii"))]
    else:
        out = [*original_headers, *headers]
    if len(value) > DEAD_LETTER_MAX_VALUE_BYTES:
        out.append((HEADER_VALUE_BYTES, str(len(value)).encode("ascii")))
        value = bytes(value[:DEAD_LETTER_MAX_VALUE_BYTES])
    if key is not None and len(key) > DEAD_LETTER_MAX_KEY_BYTES:
        out.append((HEADER_KEY_BYTES, str(len(key)).encode("ascii")))
        key = bytes(key[:DEAD_LETTER_MAX_KEY_BYTES])
    return value, key, out
