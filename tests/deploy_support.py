"""What the deployment tests share: the deploy/ paths, the Kubernetes version they validate against, and how
they run an external tool (helm, promtool, amtool, docker compose; required under CI=true)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.integration.prometheus import unavailable

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "anomalyd"
GPU_VALUES = CHART / "ci" / "gpu-servicemonitor-values.yaml"
KUBERNETES_VERSION = "1.35.0"  # validated against kubernetes-validate's bundled 1.35 schemas
RULES = DEPLOY / "prometheus" / "rules.yml"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # Operator CRDs: not in kubernetes-validate, checked by hand


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def tool(name: str) -> str:
    """The tool's path; skipped where it is absent (a failure under CI=true)."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found")
    return path


def dockerfile() -> tuple[list[list[str]], str]:
    """Instructions of deploy/Dockerfile as [KEYWORD, rest] pairs (continuations joined), and the raw text."""
    text = (DEPLOY / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [line.strip().split(None, 1) for line in logical.splitlines() if line.strip()], text
