"""``kafka.security`` of the daemon's config (:mod:`pipelines.config`): transport, SASL login, CA, and a client
certificate for mutual TLS; its checks, and the passwords read from files at load time."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ._config_schema import Ctx, join_key
from .kafka_security import PASSWORD_KEYS, read_password_file

__all__ = ["SecurityConfig", "check_security"]


@dataclass(frozen=True)
class SecurityConfig:
    """``kafka.security``: transport and authentication; ``sasl_password`` and ``ssl_key_password`` are the
    effective passwords (read from ``<name>_file`` at load time when that is set). Hand :meth:`client_settings` to
    the Kafka client."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    sasl_password_file: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None  # a client certificate (PEM) for brokers that require one: mutual TLS
    ssl_keyfile: str | None = None  # its private key (PEM)
    ssl_key_password: str | None = field(default=None, repr=False)  # the key's password, if it is encrypted
    ssl_key_password_file: str | None = None

    def client_settings(self) -> dict[str, str]:
        """The settings for ``kafka_security.client_security_config`` (the effective passwords, not the files they were
        read from); unset ones left out."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.endswith("_file")}
        return {k: v for k, v in settings.items() if v is not None}


def check_security(s: SecurityConfig, data: Mapping, key: str, ctx: Ctx) -> SecurityConfig:
    if s.sasl_username is not None and s.sasl_username.endswith("\n"):  # from a Secret made with --from-file, as
        s = dataclasses.replace(s, sasl_username=s.sasl_username.rstrip("\r\n"))  # the password file's newline
    sasl = s.protocol.startswith("SASL_")
    mech_key = join_key(key, "sasl_mechanism")
    if sasl and s.sasl_mechanism is None and not ctx.is_bad(mech_key):
        ctx.err(mech_key, f"protocol {s.protocol} needs a sasl_mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)",
                because=join_key(key, "protocol"))
    if s.sasl_mechanism is not None:
        if not sasl and not ctx.is_bad(join_key(key, "protocol")):
            ctx.err(mech_key, f"{s.sasl_mechanism} needs protocol SASL_PLAINTEXT or SASL_SSL, got {s.protocol}",
                    because=join_key(key, "protocol"))
        if not s.sasl_username:
            ctx.err(mech_key, f"{s.sasl_mechanism} needs kafka.security.sasl_username")
        if s.sasl_password is None and s.sasl_password_file is None:
            ctx.err(mech_key, f"{s.sasl_mechanism} needs kafka.security.sasl_password or sasl_password_file")
    credentials = [n for n in ("sasl_username", "sasl_password", "sasl_password_file") if getattr(s, n) is not None]
    if credentials and not sasl and s.sasl_mechanism is None and not ctx.is_bad(join_key(key, "protocol")):
        # the client would connect without them (a mechanism with a wrong protocol is reported above)
        ctx.err(join_key(key, credentials[0]), f"SASL credentials ({', '.join(credentials)}) are used only with "
                f"protocol SASL_PLAINTEXT or SASL_SSL and a sasl_mechanism; got protocol {s.protocol}",
                because=join_key(key, "protocol"))
    for name, path in (("ssl_cafile", s.ssl_cafile), ("ssl_certfile", s.ssl_certfile), ("ssl_keyfile", s.ssl_keyfile)):
        if path is not None and not Path(path).is_file():
            ctx.err(join_key(key, name), f"file {path} not found")
    if (s.ssl_certfile is None) != (s.ssl_keyfile is None):
        given, missing = ("ssl_certfile", "ssl_keyfile") if s.ssl_keyfile is None else ("ssl_keyfile", "ssl_certfile")
        ctx.err(join_key(key, given), f"a client certificate needs both ssl_certfile and ssl_keyfile; set {missing}")
    tls = s.protocol in ("SSL", "SASL_SSL")
    if s.ssl_cafile is not None and not tls and not ctx.is_bad(join_key(key, "protocol")):
        ctx.err(join_key(key, "ssl_cafile"), f"a CA file is used only with protocol SSL or SASL_SSL, got {s.protocol}",
                because=join_key(key, "protocol"))
    if s.ssl_certfile is not None and not tls and not ctx.is_bad(join_key(key, "protocol")):
        ctx.err(join_key(key, "ssl_certfile"), f"a client certificate needs protocol SSL or SASL_SSL, got {s.protocol}",
                because=join_key(key, "protocol"))
    if (s.ssl_key_password is not None or s.ssl_key_password_file is not None) and s.ssl_keyfile is None:
        name = "ssl_key_password" if s.ssl_key_password is not None else "ssl_key_password_file"
        ctx.err(join_key(key, name), "a key password needs the key: set ssl_keyfile")
    for name in PASSWORD_KEYS:
        s = _password_from_file(s, name, key, ctx)
    if s.ssl_cafile is not None and tls and not ctx.is_bad(join_key(key, "ssl_cafile")):
        _check_ca_file(s.ssl_cafile, join_key(key, "ssl_cafile"), ctx)
    names = ("ssl_certfile", "ssl_keyfile", "ssl_key_password", "ssl_key_password_file")
    if s.ssl_certfile is not None and s.ssl_keyfile is not None and not ctx.is_bad(*(join_key(key, n) for n in names)):
        _check_client_certificate(s, key, ctx)
    return s


def _check_ca_file(path: str, key: str, ctx: Ctx) -> None:
    """Load the CA file with OpenSSL, as both clients will: one that is not PEM certificates is a config error
    naming the key, not a failed connection."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        ctx.err(key, f"cannot load {path} as CA certificates: {exc.reason or exc} (it must hold PEM certificates, "
                "-----BEGIN CERTIFICATE-----)")
    except OSError as exc:
        ctx.err(key, f"cannot read {path}: {exc.strerror or exc}")


def _check_client_certificate(s: SecurityConfig, key: str, ctx: Ctx) -> None:
    """Load the client certificate and key with OpenSSL, as both clients will: a wrong or missing password, or a
    key that does not belong to the certificate, is then a config error naming the key, not a failed connection.
    The password comes from the config only: OpenSSL never prompts for one."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(s.ssl_certfile, s.ssl_keyfile,
                                                               password=lambda: s.ssl_key_password or "")
    except ssl.SSLError as exc:
        encrypted = "ENCRYPTED" in Path(s.ssl_keyfile).read_text(errors="replace")  # PKCS#8 or traditional PEM
        if exc.reason == "KEY_VALUES_MISMATCH":
            hint = "the key does not belong to the certificate"
        elif encrypted:
            hint = "a wrong ssl_key_password" if s.ssl_key_password else "the key is encrypted: set ssl_key_password"
        else:
            hint = "both must be PEM: the certificate, and its key"
        ctx.err(join_key(key, "ssl_keyfile"), f"cannot load {s.ssl_keyfile} with the certificate {s.ssl_certfile}: "
                f"{exc.reason or exc} ({hint})")


def _password_from_file(s: SecurityConfig, name: str, key: str, ctx: Ctx) -> SecurityConfig:
    """``s`` with ``name`` read from ``<name>_file`` when that is set (trailing newline stripped)."""
    path = getattr(s, f"{name}_file")
    if path is None:
        return s
    file_key = join_key(key, f"{name}_file")
    if getattr(s, name) is not None:
        ctx.err(file_key, f"set {name} or {name}_file, not both")
        return s
    try:
        password = read_password_file(path)
    except ValueError as exc:
        ctx.err(file_key, str(exc))
        return s
    return dataclasses.replace(s, **{name: password})
