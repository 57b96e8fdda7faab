"""Deployment artefacts under deploy/: Prometheus rules (promtool), Grafana dashboard and provisioning,
docker-compose (docker compose config), Dockerfile. The Helm chart: tests/test_helm_chart.py.

External tools (helm built by scripts/helm.sh, promtool, amtool, docker compose) are skipped when absent and
required under CI=true.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from pipelines.httpserver import HealthServer
from pipelines.metrics import Metrics
from tests.deploy_support import DEPLOY, ROOT, RULES, dockerfile
from tests.deploy_support import run as _run
from tests.deploy_support import tool as _tool
from tests.integration.prometheus import dashboard_queries, unavailable

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "anomalyd.json"


# --- metric names: everything the artefacts query must exist --------------------------------------------------
def _exposed_names() -> set[str]:
    reg = CollectorRegistry()
    Metrics(reg, top_k_streams=3)
    text = generate_latest(reg).decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    kinds = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}
    return names | {f"{n}_{s}" for n, k in kinds.items() if k == "histogram" for s in ("bucket", "sum", "count")}


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:anomalyd|process|python)_[a-z0-9_]+)\b", expr))


def test_dashboard_and_rules_only_use_exposed_metrics() -> None:
    exposed = _exposed_names()
    variables = {"datasource": "p", "model": ".*", "namespace": ".*", "job": ".*", "instance": ".*"}
    exprs = [e for _, e in dashboard_queries(DASHBOARD, variables)]
    exprs += [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    unknown = {n for e in exprs for n in _metric_names(e)} - exposed
    assert unknown == set(), f"queried but not exposed by pipelines.metrics: {sorted(unknown)}"


# --- Grafana ----------------------------------------------------------------------------------------------------
def _all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [q for p in panels for q in [p, *_all_panels(p.get("panels", []))]]


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36  # datasource refs are objects
    assert dash["uid"] and dash["title"] and dash["id"] is None
    panels = _all_panels(dash["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"] == p["datasource"] and t["expr"] and t["refId"], p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "model", "job", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"]["uid"] == "${datasource}"
    titles = " | ".join(p["title"].lower() for p in panels)
    for word in ("throughput", "lag", "end-to-end", "inference latency", "batch size", "alerts", "open incidents",
                 "score distribution", "threshold", "dead-letter rate", "top anomalous streams", "model versions",
                 "cpu and memory", "gpu memory"):
        assert word in titles, f"no panel about {word!r}"


def test_dashboard_queries_substitute_every_variable() -> None:
    variables = {"datasource": "p", "model": "(gru|lstm)", "namespace": ".*", "job": ".*", "instance": ".*"}
    queries = dashboard_queries(DASHBOARD, variables)
    assert len(queries) >= 25
    assert all("$" not in expr and "[[" not in expr for _, expr in queries)
    assert any('model=~"(gru|lstm)"' in expr and "[15s]" in expr for _, expr in queries)
    assert all('namespace=~".*", job=~".*"' in expr for _, expr in queries)  # every panel follows the namespace
    with pytest.raises(ValueError, match=r"\$model"):
        dashboard_queries(DASHBOARD, {"datasource": "p", "namespace": ".*", "job": ".*", "instance": ".*"})


def test_process_panels_show_only_anomalyd_processes(tmp_path) -> None:
    """The CPU and memory panel reads process_* metrics, which every target exports: with "All" instances
    (allValue .*) it must still show anomalyd's processes only, not Prometheus' or Alertmanager's."""
    promtool = _tool("promtool")
    variables = {"datasource": "p", "model": ".*", "namespace": ".*", "job": ".*", "instance": ".*",
                 "__rate_interval": "5m"}
    queries = [e for _, e in dashboard_queries(DASHBOARD, variables) if "process_" in e]
    assert len(queries) == 2, queries
    targets = (("anomalyd", "a:9308"), ("prometheus", "localhost:9090"), ("other-anomalyd", "b:9308"))
    metrics = (("process_cpu_seconds_total", "0+30x10"), ("process_resident_memory_bytes", "1e8x10"))
    series = [(f'{name}{{job="{job}", instance="{inst}"}}', values)
              for job, inst in targets for name, values in metrics]
    series.append(('anomalyd_build_info{job="anomalyd", instance="a:9308", version="1"}', "1x10"))
    test = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": s, "values": v} for s, v in series],
        "promql_expr_test": [{"expr": f"count({q})", "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1}]}
                             for q in queries]}]}
    (tmp_path / "t.yml").write_text(yaml.safe_dump(test))
    proc = _run([promtool, "test", "rules", "t.yml"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_provisioning_matches_compose() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (prom,) = ds["datasources"]
    assert prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090" and prom["isDefault"]
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/anomalyd.yml").read_text())["providers"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert mounts[providers[0]["options"]["path"]] == "./grafana/dashboards"


# --- Prometheus -------------------------------------------------------------------------------------------------
def test_promtool_check_and_unit_test_rules() -> None:
    promtool = _tool("promtool")
    for cmd in (["check", "rules", str(RULES)], ["test", "rules", "rules_test.yml"],
                ["check", "config", "prometheus.yml"]):
        proc = _run([promtool, *cmd], cwd=DEPLOY / "prometheus")
        assert proc.returncode == 0, f"promtool {' '.join(cmd)}:\n{proc.stdout}{proc.stderr}"
    assert "SUCCESS: 15 rules found" in _run([promtool, "check", "rules", str(RULES)]).stdout


def test_alert_rules_cover_the_issue() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    for name in ("AnomalydDown", "AnomalydAbsent", "AnomalydNotReady", "AnomalydConsumerLagGrowing",
                 "AnomalydDeadLetterRateHigh", "AnomalydNoEventsScored", "AnomalydWindowsNeverFill",
                 "AnomalydInferenceLatencyHigh", "AnomalydOpenIncidents"):
        assert rules[name]["labels"]["severity"] in {"critical", "warning", "info"}
        assert rules[name]["annotations"]["summary"] and rules[name]["annotations"]["description"]


def test_amtool_checks_alertmanager_config() -> None:
    proc = _run([_tool("amtool"), "check-config", str(DEPLOY / "alertmanager/alertmanager.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- docker compose and Dockerfile --------------------------------------------------------------------------------
def _compose_cmd() -> list[str]:
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return [shutil.which("docker-compose") or ""]
    unavailable("neither `docker compose` (plugin) nor `docker-compose` is installed")
    return []


def test_docker_compose_config_is_valid() -> None:
    compose = _compose_cmd()
    proc = _run([*compose, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    bad["services"]["anomalyd"]["depends_on"]["kafka"]["condition"] = "whenever"  # the validator can fail
    proc = _run([*compose, "-f", "-", "config", "-q"], input=yaml.safe_dump(bad), cwd=DEPLOY)
    assert proc.returncode != 0


def test_docker_compose_stack() -> None:
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert {"kafka", "anomalyd", "producer", "prometheus", "grafana", "alertmanager"} <= services.keys()
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert services["producer"]["command"][0] == "produce"
    assert services["anomalyd"]["build"]["dockerfile"] == "deploy/Dockerfile"
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: missing bind-mount source {source}"
    grace = yaml.safe_load((DEPLOY / "config.example.yaml").read_text())["shutdown"]["grace_period_s"]
    assert int(services["anomalyd"]["stop_grace_period"].rstrip("s")) > grace


def test_only_the_daemon_keeps_the_image_healthcheck() -> None:
    """The image's HEALTHCHECK probes the daemon's /healthz: services running other commands of the image (train,
    produce) serve no HTTP and would be marked unhealthy, so they turn it off."""
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    on_image = {name for name, svc in services.items() if svc.get("image", "").startswith("anomalyd")}
    assert on_image >= {"anomalyd", "train", "producer"}
    for name in on_image:
        runs_daemon = services[name].get("command", [None])[0] == "run"
        assert services[name].get("healthcheck", {}).get("disable", False) is not runs_daemon, name


def test_dockerfile_structure() -> None:
    instructions, _ = dockerfile()
    stages = [i for i, (kw, _) in enumerate(instructions) if kw == "FROM"]
    assert len(stages) >= 2, "multi-stage build"
    final = instructions[stages[-1]:]
    assert "slim" in final[0][1]
    user = [rest for kw, rest in final if kw == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    assert ["ENTRYPOINT", '["anomalyd"]'] in final
    assert any(kw == "HEALTHCHECK" and "/healthz" in rest for kw, rest in final)
    assert ["ARG", "VARIANT=cpu"] in instructions and any("cuda)" in rest for kw, rest in instructions if kw == "RUN")
    for kw, rest in instructions:
        if kw == "COPY" and "--from" not in rest:
            for source in shlex.split(rest)[:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), f"COPY source {source} missing from the build context"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!pipelines/" in ignore and "!detector/" in ignore


def test_the_tested_versions_fit_the_declared_ranges_and_pin_both_the_venv_and_the_image() -> None:
    """scripts/constraints.txt pins what `make test` ran with; each pin must satisfy pyproject.toml's range for
    that package, and both scripts/setup.sh and the image install with it."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for line in (ROOT / "scripts" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) has no tested version in scripts/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
    assert "-c scripts/constraints.txt" in (ROOT / "scripts" / "setup.sh").read_text()
    instructions, text = dockerfile()
    assert ["COPY", "scripts/constraints.txt ./"] in instructions and "pip install -c /tmp/constraints.txt" in text
    assert "!scripts/constraints.txt" in (DEPLOY / "Dockerfile.dockerignore").read_text()


def test_dockerfile_ships_prebuilt_fused_kernels_without_a_compiler() -> None:
    """The build stage compiles the portable kernels and the native decoder into ANOMALYD_CACHE under
    /opt/anomalyd; the runtime copies /opt/anomalyd, points ANOMALYD_CACHE at the same folder and has no compiler
    (tests/test_fastpath.py and tests/test_native_decode.py check that such a process loads them)."""
    instructions, _ = dockerfile()
    stages = [i for i, (kw, _) in enumerate(instructions) if kw == "FROM"]
    build, final = instructions[:stages[-1]], instructions[stages[-1]:]

    def cache(stage: list[list[str]]) -> list[str]:
        return [m.group(1) for kw, rest in stage if kw == "ENV" for m in [re.search(r"ANOMALYD_CACHE=(\S+)", rest)]
                if m]

    built = [i for i, (kw, rest) in enumerate(build) if kw == "RUN" and "detector.fastpath build --portable" in rest]
    assert any(kw == "RUN" and "pipelines.native_decode build" in rest for kw, rest in build[built[0]:])
    assert built and cache(build[:built[0]]), "kernels built with ANOMALYD_CACHE set"
    assert cache(final) == cache(build[:built[0]])[-1:]
    assert cache(final)[0].startswith("/opt/anomalyd/")
    assert ["COPY", "--from=build /opt/anomalyd /opt/anomalyd"] in final
    assert not any(kw == "RUN" and re.search(r"\b(g\+\+|gcc|build-essential)\b", rest) for kw, rest in final)
    assert any(kw == "RUN" and "libgomp1" in rest for kw, rest in final)


def test_dockerfile_healthcheck_probes_a_real_server() -> None:
    instructions, _ = dockerfile()
    (hc,) = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    argv = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert argv[0] == "python"
    alive = {"ok": True}
    with HealthServer(CollectorRegistry(), bind="127.0.0.1", port=0, is_alive=lambda: alive["ok"]) as srv:
        env = {"ANOMALYD_HTTP__PORT": str(srv.port), "PATH": "/usr/bin:/bin"}
        assert _run([sys.executable, *argv[1:]], env=env).returncode == 0
        alive["ok"] = False
        assert _run([sys.executable, *argv[1:]], env=env).returncode != 0
