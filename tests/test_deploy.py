"""Deployment artefacts under deploy/: Helm chart (real helm + kubernetes-validate), Prometheus rules (promtool),
Grafana dashboard and provisioning, docker-compose (docker compose config), Dockerfile.

External tools (helm built by scripts/helm.sh, promtool, amtool, docker compose) are skipped when absent and
required under CI=true.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from pipelines.httpserver import HealthServer
from pipelines.metrics import Metrics
from tests.integration.prometheus import dashboard_queries, unavailable

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "anomalyd"
GPU_VALUES = CHART / "ci" / "gpu-servicemonitor-values.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "anomalyd.json"
RULES = DEPLOY / "prometheus" / "rules.yml"
KUBERNETES_VERSION = "1.35.0"  # validated against kubernetes-validate's bundled 1.35 schemas
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # Operator CRDs: not in kubernetes-validate, checked by hand


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found")
    return path


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
    exprs = [e for _, e in dashboard_queries(DASHBOARD, {"datasource": "p", "model": ".*", "instance": ".*"})]
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
    for name in ("model", "instance"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"]["uid"] == "${datasource}"
    titles = " | ".join(p["title"].lower() for p in panels)
    for word in ("throughput", "lag", "end-to-end", "inference latency", "batch size", "alerts", "open incidents",
                 "score distribution", "threshold", "dead-letter rate", "top anomalous streams", "model versions",
                 "cpu and memory", "gpu memory"):
        assert word in titles, f"no panel about {word!r}"


def test_dashboard_queries_substitute_every_variable() -> None:
    queries = dashboard_queries(DASHBOARD, {"datasource": "p", "model": "(gru|lstm)", "instance": ".*"})
    assert len(queries) >= 25
    assert all("$" not in expr and "[[" not in expr for _, expr in queries)
    assert any('model=~"(gru|lstm)"' in expr and "[15s]" in expr for _, expr in queries)
    with pytest.raises(ValueError, match=r"\$model"):
        dashboard_queries(DASHBOARD, {"datasource": "p", "instance": ".*"})


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
    assert "SUCCESS: 10 rules found" in _run([promtool, "check", "rules", str(RULES)]).stdout


def test_alert_rules_cover_the_issue() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    for name in ("AnomalydDown", "AnomalydNotReady", "AnomalydConsumerLagGrowing", "AnomalydDeadLetterRateHigh",
                 "AnomalydNoEventsScored", "AnomalydInferenceLatencyHigh", "AnomalydOpenIncidents"):
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


def _dockerfile() -> tuple[list[list[str]], str]:
    """Instructions of deploy/Dockerfile as [KEYWORD, rest] pairs (continuations joined), and the raw text."""
    text = (DEPLOY / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [line.strip().split(None, 1) for line in logical.splitlines() if line.strip()], text


def test_dockerfile_structure() -> None:
    instructions, _ = _dockerfile()
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


def test_dockerfile_ships_prebuilt_fused_kernels_without_a_compiler() -> None:
    """The build stage compiles the portable kernels and the native decoder into ANOMALYD_CACHE under
    /opt/anomalyd; the runtime copies /opt/anomalyd, points ANOMALYD_CACHE at the same folder and has no compiler
    (tests/test_fastpath.py and tests/test_native_decode.py check that such a process loads them)."""
    instructions, _ = _dockerfile()
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
    instructions, _ = _dockerfile()
    (hc,) = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    argv = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert argv[0] == "python"
    alive = {"ok": True}
    with HealthServer(CollectorRegistry(), bind="127.0.0.1", port=0, is_alive=lambda: alive["ok"]) as srv:
        env = {"ANOMALYD_HTTP__PORT": str(srv.port), "PATH": "/usr/bin:/bin"}
        assert _run([sys.executable, *argv[1:]], env=env).returncode == 0
        alive["ok"] = False
        assert _run([sys.executable, *argv[1:]], env=env).returncode != 0


# --- Helm ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def helm() -> str:
    if shutil.which("go") is None and not list((Path.home() / ".cache/anomalyd/bin").glob("helm-*")):
        unavailable("helm needs the Go toolchain to be built (scripts/helm.sh)")
    proc = _run(["bash", str(ROOT / "scripts/helm.sh")])
    if proc.returncode != 0:
        unavailable(f"scripts/helm.sh failed:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip()


VARIANTS = {"default": [], "gpu-servicemonitor": ["-f", str(GPU_VALUES)]}


def _render(helm: str, *args: str) -> list[dict[str, Any]]:
    proc = _run([helm, "template", "rel", str(CHART), "--namespace", "detect", "--kube-version", KUBERNETES_VERSION,
                 *args])
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict(helm: str, variant: str) -> None:
    proc = _run([helm, "lint", "--strict", str(CHART), "--kube-version", KUBERNETES_VERSION, *VARIANTS[variant]])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_manifests_validate(helm: str, variant: str) -> None:
    import kubernetes_validate

    docs = _render(helm, *VARIANTS[variant])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ConfigMap", "Service", "ServiceAccount", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert (CRD_KINDS <= kinds) == (variant == "gpu-servicemonitor")


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


def _load_rendered_config(docs: dict[str, dict[str, Any]], tmp_path: Path) -> Any:
    """The ConfigMap's config.yaml with the container's environment, checked by the daemon's own loader (when
    importable); Secret-backed files and variables get stand-ins."""
    text = docs["ConfigMap"]["data"]["config.yaml"]
    example = yaml.safe_load((DEPLOY / "config.example.yaml").read_text())
    cfg = yaml.safe_load(text)
    key_paths = lambda d, p="": {f"{p}{k}" for k in d} | {
        x for k, v in d.items() if isinstance(v, dict) and k != "labels" for x in key_paths(v, f"{p}{k}.")}
    assert key_paths(cfg) == key_paths(example), "ConfigMap config must have the shape of config.example.yaml"
    pair = {}
    if cfg["kafka"]["security"]["ssl_certfile"]:  # the loader loads the pair: a real certificate and key
        from pipelines.kafka_local_security import make_certificates

        make_certificates(tmp_path / "tls", "127.0.0.1")
        pair = {"ssl_certfile": tmp_path / "tls" / "client.crt", "ssl_keyfile": tmp_path / "tls" / "client.key"}
    for key in ("sasl_password_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        mounted = cfg["kafka"]["security"][key]
        if mounted:  # a Secret mount in the pod; a real file for the loader here
            if key not in pair:
                (tmp_path / key).write_text("stand-in")
            text = text.replace(mounted, str(pair.get(key, tmp_path / key)))
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "from-secret") for e in c["env"]}
    path = tmp_path / "config.yaml"
    path.write_text(text)
    config = pytest.importorskip("pipelines.config")
    return config.load_config(path, env=env)


def test_helm_default_deployment(helm: str, tmp_path: Path) -> None:
    docs = _by_kind(_render(helm))
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    config = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    assert c["ports"][0]["containerPort"] == config["http"]["port"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert pod["terminationGracePeriodSeconds"] == config["shutdown"]["grace_period_s"] + 10
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts[config["models"]["dir"]]["readOnly"] and "/tmp" in mounts
    assert docs["PersistentVolumeClaim"]["metadata"]["name"] == "rel-anomalyd-models"
    svc = docs["Service"]["spec"]
    assert svc["ports"][0]["targetPort"] == c["ports"][0]["name"]
    assert svc["selector"].items() <= docs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    loaded = _load_rendered_config(docs, tmp_path)
    assert loaded.alerts.n == 5 and loaded.http.port == 9308


def test_helm_gpu_servicemonitor_variant(helm: str, tmp_path: Path) -> None:
    docs = _by_kind(_render(helm, "-f", str(GPU_VALUES)))
    dep = docs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["replicas"] == 3 and c["image"].endswith("-cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
    assert pod["terminationGracePeriodSeconds"] == 45 + 10
    assert "PersistentVolumeClaim" not in docs and not any(v["name"] == "models" for v in pod["volumes"])
    env = {e["name"]: e for e in c["env"]}
    assert env["ANOMALYD_KAFKA__SECURITY__SASL_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == "anomalyd-kafka"
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"anomalyd-kafka", "kafka-ca", "anomalyd-kafka-client"}
    config = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    assert config["kafka"]["security"]["sasl_password"] is None
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert Path(config["kafka"]["security"]["sasl_password_file"]).parent == Path(mounts["kafka-credentials"])
    assert Path(config["kafka"]["security"]["ssl_cafile"]).parent == Path(mounts["kafka-ca"])
    client = next(v["secret"] for v in pod["volumes"] if v["name"] == "kafka-client")
    for key, item in (("ssl_certfile", "tls.crt"), ("ssl_keyfile", "tls.key")):
        path = Path(config["kafka"]["security"][key])
        assert path.parent == Path(mounts["kafka-client"]) and path.name == item
        assert {"key": item, "path": item} in client["items"]
    # ServiceMonitor: selects the Service by its labels and scrapes its named port (shape checked by hand).
    sm = docs["ServiceMonitor"]
    svc = docs["Service"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == ["detect"]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    # PrometheusRule: exactly the rules of deploy/prometheus/rules.yml.
    assert docs["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    loaded = _load_rendered_config(docs, tmp_path)
    assert loaded.kafka.security.protocol == "SASL_SSL" and loaded.kafka.security.sasl_username == "from-secret"
    assert loaded.kafka.security.ssl_certfile and loaded.kafka.security.ssl_keyfile  # the loader's checks passed


def test_helm_client_key_password_from_the_client_secret(helm: str, tmp_path: Path) -> None:
    """An encrypted client key: its password is a file from the same Secret, never a value in the ConfigMap."""
    docs = _by_kind(_render(helm, "--set", "config.kafka.security.protocol=SSL", "--set",
                            "kafka.tls.clientSecret=client", "--set", "kafka.tls.clientKeyPasswordKey=password"))
    security = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["kafka"]["security"]
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (client,) = [v["secret"] for v in pod["volumes"] if v["name"] == "kafka-client"]
    assert client["secretName"] == "client" and {"key": "password", "path": "key-password"} in client["items"]
    (c,) = pod["containers"]
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "kafka-client")
    assert security["ssl_key_password_file"] == f"{mount}/key-password" and security["ssl_key_password"] is None


def test_helm_values_schema_rejects_bad_values(helm: str) -> None:
    for bad in ("config.alerts.k=0", "models.source=nfs", "config.models.device=tpu", "unknownKey=1"):
        proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION, "--set", bad])
        assert proc.returncode != 0 and "schema" in proc.stderr, bad


def _anomalyd_commands() -> dict[str, list[str]]:
    """Every ``anomalyd`` command line the artefacts run: compose services, the image's CMD, the chart's args."""
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    commands = {name: svc["command"] for name, svc in services.items()
                if svc.get("image", "").startswith("anomalyd") and "entrypoint" not in svc}
    script = services["train"]["command"][0].replace("\\\n", " ").replace("$$kind", "gru").replace('"', "")
    for i, line in enumerate(script.splitlines()):
        if line.strip().startswith("anomalyd "):
            commands[f"train script line {i + 1}"] = shlex.split(line)[1:]
    instructions, _ = _dockerfile()
    commands["Dockerfile CMD"] = json.loads(next(rest for kw, rest in instructions if kw == "CMD"))
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    commands["chart args"] = json.loads(re.search(r"args: (\[.*\])", deployment).group(1))
    return commands


def test_anomalyd_commands_parse_with_the_real_cli() -> None:
    cli = pytest.importorskip("pipelines.cli")
    commands = _anomalyd_commands()
    assert {"anomalyd", "producer", "Dockerfile CMD", "chart args"} <= commands.keys()
    assert sum(name.startswith("train script") for name in commands) == 2  # produce history, then train
    for name, argv in commands.items():
        try:
            cli.build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: `anomalyd {' '.join(argv)}` is rejected by pipelines.cli")


def test_helm_test_pod_checks_with_the_daemons_config_and_secrets(helm: str) -> None:
    """`helm test` runs `anomalyd check --connect` with the daemon container's env, mounts and volumes, is not
    selected by the daemon's Service, and runs beside a daemon pod when the models volume is ReadWriteOnce."""
    secrets = ["--set", "kafka.credentials.existingSecret=kafka-login", "--set", "kafka.tls.caSecret=kafka-ca"]
    docs = _by_kind(_render(helm, *secrets))
    pod, daemon = docs["Pod"], docs["Deployment"]["spec"]["template"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test" and pod["spec"]["restartPolicy"] == "Never"
    (check,), (run,) = pod["spec"]["containers"], daemon["spec"]["containers"]
    assert check["args"] == ["check", "--config", "/etc/anomalyd/config.yaml", "--connect"]
    assert check["image"] == run["image"] and check["env"] == run["env"]
    assert check["volumeMounts"] == run["volumeMounts"] and pod["spec"]["volumes"] == daemon["spec"]["volumes"]
    assert {m["mountPath"] for m in check["volumeMounts"]} >= {"/var/run/secrets/kafka", "/var/run/secrets/kafka-ca"}
    selector = docs["Service"]["spec"]["selector"]
    assert not selector.items() <= pod["metadata"]["labels"].items()
    affinity = pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert affinity["labelSelector"]["matchLabels"] == selector
    shared = _by_kind(_render(helm, "--set", "models.persistence.accessModes={ReadOnlyMany}"))["Pod"]
    assert "affinity" not in shared["spec"]
    assert "Pod" not in _by_kind(_render(helm, "--set", "helmTest.enabled=false"))
    assert {"name": "ANOMALYD_LOG_FORMAT", "value": "text"} in run["env"]
    json_logs = _by_kind(_render(helm, "--set", "logFormat=json"))["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "ANOMALYD_LOG_FORMAT", "value": "json"} in json_logs["containers"][0]["env"]
    gpu = _by_kind(_render(helm, "-f", str(GPU_VALUES)))["Pod"]["spec"]["containers"][0]
    assert {"name": "ANOMALYD_MODELS__DEVICE", "value": "cpu"} in gpu["env"]
    assert "nvidia.com/gpu" not in gpu["resources"].get("limits", {})
