"""SASL and TLS listeners for the local test broker (:class:`pipelines.kafka_local.LocalKafka`).

SASL_PLAINTEXT, SASL_SSL and SSL listeners beside the broker's own PLAINTEXT one, with users that can log in by
PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512, and an SSL listener named MTLS that requires a client certificate
(mutual TLS). The TLS ones use a certificate authority made for this broker alone (``openssl``; files in
``<data dir>/tls``): clients trust ``ca.pem`` and check the broker's name, 127.0.0.1; ``client.crt`` and
``client.key`` are a client certificate from the same authority, ``client-encrypted.key`` the same key encrypted
with the password in ``client-key.password``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

__all__ = ["SCRAM_MECHANISMS", "CLIENT_KEY_PASSWORD", "with_listeners", "scram_format_args", "make_certificates"]

SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
CLIENT_KEY_PASSWORD = "anomalyd-test-key"  # of client-encrypted.key, the client key encrypted (PKCS#8, AES-256)
CERT_DAYS = 30


def with_listeners(props: str, host: str, users: Mapping[str, str], sasl_port: int | None = None,
                   sasl_ssl_port: int | None = None, broker_pem: Path | None = None,
                   ssl_port: int | None = None, mtls_port: int | None = None, ca_pem: Path | None = None) -> str:
    """``props`` (the filled-in server.properties) with SASL_PLAINTEXT on ``sasl_port``, SASL_SSL on
    ``sasl_ssl_port``, SSL (TLS, no login) on ``ssl_port`` and SSL with a required client certificate (issued
    by ``ca_pem``) on ``mtls_port`` added (each only when given); the TLS listeners serve ``broker_pem`` (key and
    certificate)."""
    ports = {"SASL_PLAINTEXT": sasl_port, "SASL_SSL": sasl_ssl_port, "SSL": ssl_port, "MTLS": mtls_port}
    protocol = {"MTLS": "SSL"}  # a listener's name is its protocol, but for this one
    listeners = [name for name, port in ports.items() if port]
    if not listeners:
        return props
    for key, values in (("listeners", [f"{n}://{host}:{ports[n]}" for n in listeners]),
                        ("advertised.listeners", [f"{n}://{host}:{ports[n]}" for n in listeners]),
                        ("listener.security.protocol.map", [f"{n}:{protocol.get(n, n)}" for n in listeners])):
        extra = ",".join(values)
        props = re.sub(rf"^{re.escape(key)}=(.*)$", lambda m, e=extra: f"{m.group(0)},{e}", props, count=1, flags=re.M)
    plain = " ".join(f'user_{user}="{password}"' for user, password in users.items())
    lines = [f"sasl.enabled.mechanisms=PLAIN,{','.join(SCRAM_MECHANISMS)}"]
    for name in (n for n in listeners if n.startswith("SASL")):
        prefix = f"listener.name.{name.lower()}"
        lines.append(f"{prefix}.plain.sasl.jaas.config="
                     f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain};")
        lines += [f"{prefix}.{mech.lower()}.sasl.jaas.config="
                  "org.apache.kafka.common.security.scram.ScramLoginModule required;" for mech in SCRAM_MECHANISMS]
    if sasl_ssl_port or ssl_port or mtls_port:
        if broker_pem is None:
            raise ValueError("a TLS listener needs the broker's key and certificate (broker_pem)")
        lines += ["ssl.keystore.type=PEM", f"ssl.keystore.location={broker_pem}", "ssl.client.auth=none"]
    if mtls_port:
        if ca_pem is None:
            raise ValueError("the mutual-TLS listener needs the CA of its clients' certificates (ca_pem)")
        lines += ["listener.name.mtls.ssl.client.auth=required", "listener.name.mtls.ssl.truststore.type=PEM",
                  f"listener.name.mtls.ssl.truststore.location={ca_pem}"]
    return props.rstrip("\n") + "\n\n# SASL / TLS listeners (LocalKafka)\n" + "\n".join(lines) + "\n"


def scram_format_args(users: Mapping[str, str]) -> list[str]:
    """``kafka-storage format`` arguments that create every user for both SCRAM mechanisms."""
    return [arg for user, password in users.items() for mech in SCRAM_MECHANISMS
            for arg in ("--add-scram", f"{mech}=[name={user},password={password}]")]


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {(res.stdout + res.stderr)[-2000:]}")


def make_certificates(tls_dir: Path, host: str) -> tuple[Path, Path]:
    """A new certificate authority, a broker certificate for ``host`` and a client certificate (``client.crt``,
    ``client.key``) in ``tls_dir``: ``(ca.pem, broker.pem)``; broker.pem holds the broker's unencrypted key and its
    certificate (Kafka's PEM keystore)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the SASL_SSL listener needs the openssl command (e.g. 'apt-get install openssl')")
    tls_dir.mkdir(parents=True, exist_ok=True)
    days = str(CERT_DAYS)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", days,
             "-subj", "/CN=anomalyd local test CA", cwd=tls_dir)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr",
             "-subj", f"/CN={host}", cwd=tls_dir)
    (tls_dir / "san.ext").write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "broker.crt", "-days", days, "-extfile", "san.ext", cwd=tls_dir)
    broker_pem = tls_dir / "broker.pem"
    broker_pem.write_text((tls_dir / "broker.key").read_text() + (tls_dir / "broker.crt").read_text())
    broker_pem.chmod(0o600)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
             "-subj", "/CN=anomalyd", cwd=tls_dir)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "client.crt", "-days", days, cwd=tls_dir)
    (tls_dir / "client-key.password").write_text(f"{CLIENT_KEY_PASSWORD}\n")
    _openssl("pkcs8", "-topk8", "-in", "client.key", "-out", "client-encrypted.key", "-v2", "aes-256-cbc",
             "-passout", "file:client-key.password", cwd=tls_dir)
    return tls_dir / "ca.pem", broker_pem
