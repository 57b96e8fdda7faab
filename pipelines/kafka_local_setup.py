"""Java and Maven for the local test broker (:mod:`pipelines.kafka_local`): found, or installed with apt-get."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["KafkaSetupError", "find_java", "find_maven"]


class KafkaSetupError(RuntimeError):
    """The local broker could not be installed, started or reached; the message says why and what to do."""


def _java_major(java: str) -> int:
    """The major version of a ``java`` binary (8 for '1.8.0_x'), or 0 if it cannot be run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return 0
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    major = int(match.group(1)) if match else 0
    return int(match.group(2) or 0) if match and major == 1 else major


def _apt_install(candidates: list[str]) -> bool:
    """Install the first of ``candidates`` that apt knows; False when not root or apt-get is missing."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-qq"], env=env, capture_output=True,
                   check=False, timeout=900)
    for pkg in candidates:
        if subprocess.run(["apt-cache", "show", pkg], capture_output=True, check=False).returncode == 0:
            print(f"kafka_local: apt-get install {pkg}", file=sys.stderr)
            cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-qq", "--no-install-recommends", pkg]
            return subprocess.run(cmd, env=env, capture_output=True, check=False).returncode == 0
    return False


def find_java(install: bool = True) -> str:
    """Path of a Java 17+ binary ($JAVA_HOME, PATH, /usr/lib/jvm); installs one with apt-get when it can."""
    home = os.environ.get("JAVA_HOME")
    candidates = [f"{home}/bin/java" if home else None, shutil.which("java")]
    candidates += [str(p) for p in sorted(Path("/usr/lib/jvm").glob("*/bin/java"), reverse=True)]
    for java in filter(None, candidates):
        if _java_major(java) >= 17:
            return java
    if install and _apt_install(["openjdk-17-jre-headless", "openjdk-21-jre-headless", "default-jre"]):
        return find_java(install=False)
    raise KafkaSetupError("Kafka 4.x needs Java 17+ and none was found. Install it, e.g. 'sudo apt-get "
                          "install openjdk-17-jre-headless' (or a JDK 17+); put it on PATH or set JAVA_HOME.")


def find_maven(install: bool = True) -> str:
    """Path of the ``mvn`` binary; installs Maven with apt-get when it can."""
    mvn = shutil.which("mvn")
    if mvn:
        return mvn
    if install and _apt_install(["maven"]):
        return find_maven(install=False)
    raise KafkaSetupError("Maven ('mvn') is needed once to fetch the Kafka jars from Maven Central. "
                          "Install it, e.g. 'sudo apt-get install maven', or put Apache Maven 3.6+ on PATH.")
