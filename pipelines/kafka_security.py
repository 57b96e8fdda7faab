"""Kafka clients' security settings, and the errors of a refused login or an unreachable cluster.

:func:`client_security_config` maps the config's ``kafka.security`` to each client's option names (passwords
read from their files); :func:`kafka_python_bootstrap` and :func:`confluent_refusal` turn what each client
reports of a failed login or TLS handshake into one clear error (:class:`KafkaAuthenticationError`, a
configuration problem) and of an unreachable cluster into :class:`KafkaBootstrapError`.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["CLIENTS", "PASSWORD_KEYS", "KafkaAuthenticationError", "KafkaBootstrapError", "client_security_config",
           "confluent_refusal", "describe_credentials", "host_port", "kafka_python_bootstrap", "read_password_file",
           "security_error", "wait_for_a_broker"]

CLIENTS = ("kafka-python", "confluent")

# config key in kafka.security -> (kafka-python option, confluent-kafka option)
_SECURITY_KEYS = {
    "protocol": ("security_protocol", "security.protocol"),
    "sasl_mechanism": ("sasl_mechanism", "sasl.mechanism"),
    "sasl_username": ("sasl_plain_username", "sasl.username"),
    "sasl_password": ("sasl_plain_password", "sasl.password"),
    "ssl_cafile": ("ssl_cafile", "ssl.ca.location"),
    "ssl_certfile": ("ssl_certfile", "ssl.certificate.location"),  # mutual TLS: the client's certificate ...
    "ssl_keyfile": ("ssl_keyfile", "ssl.key.location"),  # ... its key ...
    "ssl_key_password": ("ssl_password", "ssl.key.password"),  # ... and the key's password, if encrypted
}
PASSWORD_KEYS = ("sasl_password", "ssl_key_password")
"""The secret ``kafka.security`` keys: each may come from a file named by ``<key>_file``, and is masked in logs."""


class KafkaAuthenticationError(ValueError):
    """The brokers refused the credentials in ``kafka.security``, or the TLS handshake failed (an untrusted
    certificate): a configuration problem that retrying will not fix (a ValueError: the CLI reports it on one line
    and exits 2). Build one with :func:`security_error`."""


class KafkaBootstrapError(RuntimeError):
    """No broker in ``kafka.bootstrap_servers`` could be reached, or none answered, within the client's timeout."""


# kafka-python's errors for a failed SASL handshake (wrong password or user, a mechanism the broker does not enable)
_AUTH_ERRORS = ("SaslAuthenticationFailedError", "UnsupportedSaslMechanismError", "IllegalSaslStateError")


def describe_credentials(security: Mapping[str, Any] | None) -> str:
    """``kafka.security`` for an error message, without the password: 'SASL_PLAINTEXT, SCRAM-SHA-256, user alice'
    (and 'client certificate PATH' for mutual TLS)."""
    security = security or {}
    parts = [security.get("protocol", "PLAINTEXT"), security.get("sasl_mechanism")]
    parts.append(f"user {security['sasl_username']}" if security.get("sasl_username") else None)
    parts.append(f"client certificate {security['ssl_certfile']}" if security.get("ssl_certfile") else None)
    return ", ".join(p for p in parts if p)


def security_error(tls: bool, bootstrap_servers: str, security: Mapping[str, Any] | None,
                   detail: object) -> KafkaAuthenticationError:
    """The error for a refused login (``tls`` False) or a failed TLS handshake (``tls`` True)."""
    credentials = describe_credentials(security)
    if tls and _CLIENT_CERT_REFUSED.search(str(detail)):
        certfile = (security or {}).get("ssl_certfile") or "not set"
        return KafkaAuthenticationError(f"the TLS handshake with Kafka at {bootstrap_servers} failed: the broker "
                                        f"requires a client certificate it trusts (ssl_certfile {certfile}; "
                                        f"{credentials}): {detail}")
    if tls:
        cafile = (security or {}).get("ssl_cafile") or "not set, so the system's CAs"
        return KafkaAuthenticationError(f"the TLS handshake with Kafka at {bootstrap_servers} failed ({credentials}; "
                                        f"ssl_cafile {cafile}): {detail}")
    return KafkaAuthenticationError(f"Kafka at {bootstrap_servers} refused the credentials ({credentials}): {detail}")


# TLS alerts by which a broker refuses the client's certificate (mutual TLS), missing or from an unknown CA
_CLIENT_CERT_REFUSED = re.compile(r"alert (bad certificate|certificate required|unknown ca)", re.IGNORECASE)


def confluent_refusal(err: Any, bootstrap_servers: str,
                      security: Mapping[str, Any] | None) -> KafkaAuthenticationError | None:
    """The error for a librdkafka error-callback ``err`` that is a refused login or an unverifiable broker
    certificate (librdkafka retries those for ever); None for any other error, a transient one included."""
    from confluent_kafka import KafkaError

    if err.code() == KafkaError._AUTHENTICATION:
        return security_error(False, bootstrap_servers, security, err.str())
    if err.code() == KafkaError._SSL and "certificate" in err.str().lower():  # not a reset mid-handshake
        return security_error(True, bootstrap_servers, security, err.str())
    if err.code() == KafkaError._TRANSPORT and _CLIENT_CERT_REFUSED.search(err.str()):
        return security_error(True, bootstrap_servers, security, err.str())
    return None


class _LoggedErrors(logging.Handler):
    """The exceptions kafka-python logs while it retries a bootstrap (it then raises only "Unable to bootstrap")."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.args, tuple):
            self.errors.extend(a for a in record.args if isinstance(a, BaseException))


@contextmanager
def kafka_python_bootstrap(bootstrap_servers: str, security: Mapping[str, Any] | None) -> Iterator[None]:
    """Around a kafka-python client's constructor: its bootstrap timeout becomes :class:`KafkaAuthenticationError`
    when an attempt failed on the credentials, the broker's certificate or the broker's refusal of the client's
    (mutual TLS), :class:`KafkaBootstrapError` naming the errors seen otherwise.

    kafka-python 3.0.12 often never sees a refused login: the broker sends its error response and closes the
    connection, and when both arrive in one read kafka-python drops the response and reports only "socket
    disconnected". With SASL configured, the message then says that this is the likely cause."""
    from kafka.errors import KafkaTimeoutError

    seen, logger = _LoggedErrors(), logging.getLogger("kafka.net.manager")
    logger.addHandler(seen)
    try:
        yield
    except KafkaTimeoutError as exc:
        if "bootstrap" not in str(exc):
            raise
        credentials = describe_credentials(security)
        errors = [e for e in seen.errors if not isinstance(e, KafkaTimeoutError)]  # not the final "Unable to"
        auth = [e for e in errors if type(e).__name__ in _AUTH_ERRORS]
        if auth:
            raise security_error(False, bootstrap_servers, security, auth[-1]) from exc
        tls = [e for e in errors if "CERTIFICATE_VERIFY_FAILED" in str(e) or _CLIENT_CERT_REFUSED.search(str(e))]
        if tls:
            raise security_error(True, bootstrap_servers, security, tls[-1]) from exc
        seen_text = "; ".join(dict.fromkeys(str(e) for e in errors)) or "no error logged"  # distinct, in order
        hint = (" A broker that closes the connection during the SASL handshake has usually refused the "
                "credentials: check kafka.security." if "SASL" in credentials and "disconnected" in seen_text else "")
        raise KafkaBootstrapError(f"cannot connect to Kafka at {bootstrap_servers} ({credentials}): {exc}; "
                                  f"attempts failed with: {seen_text}.{hint}") from exc
    finally:
        logger.removeHandler(seen)


def client_security_config(client: str, security: Mapping[str, Any] | None) -> dict[str, Any]:
    """Map the config's ``kafka.security`` section to ``client``'s option names (None values dropped).

    ``sasl_password_file`` and ``ssl_key_password_file`` are read (trailing newline stripped) into the password.
    """
    if client not in CLIENTS:
        raise ValueError(f"kafka.client must be one of {CLIENTS}, got {client!r}")
    security = dict(security or {})
    files = {f"{name}_file": name for name in PASSWORD_KEYS}
    unknown = sorted(set(security) - set(_SECURITY_KEYS) - set(files))
    if unknown:
        raise ValueError(f"unknown kafka.security keys {unknown}; known: {sorted(_SECURITY_KEYS)}")
    for file_key, name in files.items():
        password_file = security.pop(file_key, None)
        if not password_file:
            continue
        if security.get(name):
            raise ValueError(f"kafka.security: set {name} or {file_key}, not both")
        try:
            security[name] = read_password_file(password_file)
        except ValueError as exc:
            raise ValueError(f"kafka.security.{file_key}: {exc}") from exc
    column = CLIENTS.index(client)
    return {_SECURITY_KEYS[k][column]: v for k, v in security.items() if v is not None}


def read_password_file(path: str | Path) -> str:
    """A password kept in a file (a mounted Secret): its text, trailing newline stripped. ValueError saying why
    when it cannot be read, is not UTF-8 or is empty."""
    try:
        password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read password file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not password:
        raise ValueError(f"password file {path} is empty")
    return password


BOOTSTRAP_TIMEOUT_S = 30.0  # kafka-python's bootstrap_timeout_ms


def wait_for_a_broker(bootstrap_servers: str, stop: threading.Event, timeout_s: float = BOOTSTRAP_TIMEOUT_S) -> bool:
    """Wait until one of ``bootstrap_servers`` accepts a TCP connection, for at most ``timeout_s``: False when
    ``stop`` is set first. kafka-python's constructors block in their bootstrap for up to 30 s, where a SIGTERM,
    which only sets a flag, went unheard. Raises :class:`KafkaBootstrapError` when none accepts in time."""
    addresses = [host_port(s) for s in bootstrap_servers.split(",") if s.strip()]
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        for host, port in addresses:
            try:
                with socket.create_connection((host, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                    return True
            except OSError as exc:  # refused, unreachable, no such host
                last = exc
        left = deadline - time.monotonic()
        if left <= 0:
            raise KafkaBootstrapError(f"cannot connect to Kafka at {bootstrap_servers}: no broker accepted a "
                                      f"connection within {timeout_s:g} s ({last})")
        if stop.wait(min(0.5, left)):
            return False


def host_port(server: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, a bare IPv6 address or ``host`` (port 9092), with or without ``SCHEME://``, as
    kafka-python reads it."""
    from kafka.cluster import get_ip_port_afi

    try:
        host, port, _family = get_ip_port_afi(server.strip().split("://", 1)[-1])
        return host, int(port)
    except ValueError:
        raise ValueError(f"kafka.bootstrap_servers: cannot read {server.strip()!r} as host:port") from None

