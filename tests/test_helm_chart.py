"""The Helm chart under deploy/helm/anomalyd: rendered by a real helm, linted strictly, validated with
kubernetes-validate, and its config checked by the daemon's own loader and CLI.

helm is built by scripts/helm.sh (needs Go); skipped when it cannot be had, required under CI=true.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_support import CHART, CRD_KINDS, DEPLOY, GPU_VALUES, KUBERNETES_VERSION, ROOT, RULES, dockerfile
from tests.deploy_support import run as _run
from tests.integration.prometheus import unavailable


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


def test_a_model_served_twice_by_name_fails_the_render(helm: str, tmp_path: Path) -> None:
    """The schema's uniqueItems compares whole entries: {name: m} and {name: m, version: null} passed it, and every
    pod then exited 2 (the daemon refuses a model served twice)."""
    values = tmp_path / "served.yaml"
    values.write_text(yaml.safe_dump({"config": {"models": {"served": [{"name": "sensors-gru"},
                                                                        {"name": "sensors-gru", "version": None}]}}}))
    proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION, "-f", str(values)])
    assert proc.returncode != 0 and 'model "sensors-gru" is served twice' in proc.stderr, proc.stderr


def test_the_helm_built_here_renders_the_chart_as_a_released_helm_does(helm: str) -> None:
    """scripts/helm.sh's helm carries a release build's version stamps: without them it assumed Kubernetes 1.20, under
    the chart's kubeVersion, and refused to render it unless given --kube-version."""
    proc = _run([helm, "template", "rel", str(CHART)])
    assert proc.returncode == 0, proc.stderr
    assert _run([helm, "version", "--short"]).stdout.startswith("v3.21.4")  # unstamped: "v3.21"


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
    pem = {}
    if cfg["kafka"]["security"]["ssl_certfile"] or cfg["kafka"]["security"]["ssl_cafile"]:
        from pipelines.kafka_local_security import make_certificates  # the loader loads the CA and the pair: PEM

        make_certificates(tmp_path / "tls", "127.0.0.1")
        pem = {"ssl_cafile": tmp_path / "tls" / "ca.pem", "ssl_certfile": tmp_path / "tls" / "client.crt",
               "ssl_keyfile": tmp_path / "tls" / "client.key"}
    for key in ("sasl_password_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        mounted = cfg["kafka"]["security"][key]
        if mounted:  # a Secret mount in the pod; a real file for the loader here
            if key not in pem:
                (tmp_path / key).write_text("stand-in")
            text = text.replace(mounted, str(pem.get(key, tmp_path / key)))
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "from-secret") for e in c["env"]}
    path = tmp_path / "config.yaml"
    path.write_text(text)
    from pipelines import config
    return config.load_config(path, env=env)


def test_helm_default_deployment(helm: str, tmp_path: Path) -> None:
    docs = _by_kind(_render(helm))
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    config = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    assert c["ports"][0]["containerPort"] == config["http"]["port"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert c["startupProbe"]["timeoutSeconds"] == 3  # the schema took probes.startup.timeoutSeconds, unrendered
    assert c["resources"]["limits"]["cpu"] == "2"  # model_threads: 0 sizes the scoring threads by it
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
    assert pod["runtimeClassName"] == "nvidia" and "runtimeClassName" not in _by_kind(_render(helm))["Deployment"][
        "spec"]["template"]["spec"]
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
    for bad in ("config.alerts.k=0", "models.source=nfs", "config.models.device=tpu", "unknownKey=1",
                "config.http.bind=",  # the daemon rejects an empty http.bind
                "config.kafka.poll_timeout_ms=60000", "config.alerts.cooldown_s=1e16",  # past the daemon's maxima
                "serviceMonitor.interval=", "serviceMonitor.scrapeTimeout=1.5s", "serviceMonitor.scrapeTimeout=5s1m"):
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
    instructions, _ = dockerfile()
    commands["Dockerfile CMD"] = json.loads(next(rest for kw, rest in instructions if kw == "CMD"))
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    commands["chart args"] = json.loads(re.search(r"args: (\[.*\])", deployment).group(1))
    return commands


def test_anomalyd_commands_parse_with_the_real_cli() -> None:
    from pipelines import cli
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
    secrets = ["--set", "kafka.credentials.existingSecret=kafka-login", "--set", "kafka.tls.caSecret=kafka-ca", "--set",
               "config.kafka.security.protocol=SASL_SSL", "--set", "config.kafka.security.sasl_mechanism=PLAIN"]
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


def test_helm_refuses_secrets_the_protocol_would_not_use(helm: str) -> None:
    """A SASL Secret with protocol PLAINTEXT (or no mechanism) would render a config that never logs in; a CA or
    client certificate without TLS one the daemon rejects: the chart fails, naming the values to set."""
    for values, text in ((["kafka.credentials.existingSecret=login"], "config.kafka.security.protocol to SASL_SSL"),
                         (["kafka.credentials.existingSecret=login", "config.kafka.security.protocol=SASL_SSL"],
                          "config.kafka.security.sasl_mechanism to PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (it is null)"),
                         (["kafka.tls.caSecret=ca"], "kafka.tls.caSecret=ca needs TLS"),
                         (["kafka.tls.clientSecret=tls", "config.kafka.security.protocol=SASL_PLAINTEXT",
                           "config.kafka.security.sasl_mechanism=PLAIN"], "kafka.tls.clientSecret=tls needs TLS")):
        proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION,
                     *(a for v in values for a in ("--set", v))])
        assert proc.returncode != 0 and text in proc.stderr, (values, proc.stderr)


def test_helm_refuses_passwords_it_would_write_into_the_configmap(helm: str) -> None:
    """The chart renders config into a ConfigMap: a password or an Alertmanager URL with credentials set there is
    refused, naming where it belongs (they had been rendered as they were)."""
    for values, text in ((["config.kafka.security.sasl_password=hunter2"], "kafka.credentials.existingSecret"),
                         (["config.kafka.security.ssl_key_password=keypw"], "kafka.tls.clientKeyPasswordKey"),
                         (["config.sinks.alertmanager.url=http://am:s3cr3t@am:9093"],
                          "ANOMALYD_SINKS__ALERTMANAGER__URL")):
        proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION,
                     *(a for v in values for a in ("--set", v))])
        assert proc.returncode != 0 and text in proc.stderr and "ConfigMap" in proc.stderr, (values, proc.stderr)
        assert "hunter2" not in proc.stderr and "s3cr3t" not in proc.stderr
    for values in (["config.sinks.alertmanager.url=http://am:9093/team@x"], ["config.sinks.alertmanager=null"]):
        proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION, "--set", values[0]])
        assert proc.returncode == 0, (values, proc.stderr)  # an '@' in the path is no password; no section at all


def test_readme_helm_example_logs_in_with_its_secret(helm: str, tmp_path: Path) -> None:
    """The README's `helm install` renders a config that the daemon accepts and that uses the Secret's login."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^helm install anomalyd deploy/helm/anomalyd \\\n(?:.*\\\n)*.*$", readme, re.M).group(0)
    sets = re.findall(r"--set (\S+)", command)
    assert any(s.startswith("kafka.credentials.existingSecret=") for s in sets), command
    loaded = _load_rendered_config(_by_kind(_render(helm, *(a for v in sets for a in ("--set", v)))), tmp_path)
    security = loaded.kafka.security
    assert security.protocol.startswith("SASL_") and security.sasl_mechanism and security.sasl_password_file


def test_servicemonitor_labels_targets_for_the_down_alert_whatever_the_release_name(helm: str) -> None:
    docs = _by_kind(_render(helm, "-f", str(GPU_VALUES), "--set", "fullnameOverride=detector", "--set",
                            "nameOverride=sensors"))
    sm, svc = docs["ServiceMonitor"], docs["Service"]
    assert svc["metadata"]["name"] == "detector" and sm["spec"]["targetLabels"] == ["app.kubernetes.io/part-of"]
    assert svc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "anomalyd"  # -> app_kubernetes_io_part_of
    pod = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]  # scraped by annotation, labels mapped
    assert pod["app.kubernetes.io/part-of"] == "anomalyd"
    proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION,
                 "--set", "podLabels.app\\.kubernetes\\.io/part-of=fleet"])  # the operator's own label: once
    deployment = next(d for d in proc.stdout.split("\n---") if "\nkind: Deployment" in d)
    assert deployment.count("app.kubernetes.io/part-of:") == 2, deployment  # the Deployment's own, the pods' one
    assert "app.kubernetes.io/part-of: fleet" in deployment
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert 'up{app_kubernetes_io_part_of="anomalyd"} == 0' in rules["AnomalydDown"]["expr"]


def _servicemonitor_render(helm: str, *sets: str) -> Any:
    return _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION, "--set",
                 "serviceMonitor.enabled=true", *(a for s in sets for a in ("--set", s))])


def _servicemonitor_endpoint(helm: str, *sets: str) -> dict[str, Any]:
    proc = _servicemonitor_render(helm, *sets)
    assert proc.returncode == 0, (sets, proc.stderr)
    (sm,) = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "ServiceMonitor"]
    (endpoint,) = sm["spec"]["endpoints"]
    return endpoint


def test_servicemonitor_leaves_the_scrape_timeout_to_prometheus_by_default(helm: str) -> None:
    """The default scrapeTimeout was 10s: with interval 5s the Prometheus Operator refused the ServiceMonitor
    ("scrapeTimeout greater than scrapeInterval") and nothing was scraped. Unset, Prometheus caps its own at the
    interval."""
    endpoint = _servicemonitor_endpoint(helm, "serviceMonitor.interval=5s")
    assert endpoint["interval"] == "5s" and "scrapeTimeout" not in endpoint, endpoint
    assert "scrapeTimeout" not in _servicemonitor_endpoint(helm)


def test_servicemonitor_refuses_a_scrape_timeout_longer_than_its_interval(helm: str) -> None:
    for interval, timeout in (("5s", "10s"), ("500ms", "501ms"), ("1m", "60001ms"), ("1h30s", "1h31s"),
                              ("1d", "1w")):
        proc = _servicemonitor_render(helm, f"serviceMonitor.interval={interval}",
                                      f"serviceMonitor.scrapeTimeout={timeout}")
        text = f"serviceMonitor.scrapeTimeout={timeout} is longer than serviceMonitor.interval={interval}"
        assert proc.returncode != 0 and text in proc.stderr, (interval, timeout, proc.stderr)
    proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION, "--skip-schema-validation",
                 "--set", "serviceMonitor.enabled=true", "--set", "serviceMonitor.scrapeTimeout=1.5s"])
    assert proc.returncode != 0 and "scrapeTimeout=1.5s is not a Prometheus duration" in proc.stderr, proc.stderr
    overflow = "99999999999999999999s"  # Sprig's atoi reads it as 0: the timeout rendered as within 15s
    proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION, "--skip-schema-validation",
                 "--set", "serviceMonitor.enabled=true", "--set", f"serviceMonitor.scrapeTimeout={overflow}"])
    assert proc.returncode != 0 and f"scrapeTimeout={overflow} is not a Prometheus duration" in proc.stderr
    assert _servicemonitor_render(helm, f"serviceMonitor.scrapeTimeout={overflow}").returncode != 0  # the schema


def test_servicemonitor_renders_a_scrape_timeout_within_its_interval(helm: str) -> None:
    for interval, timeout in (("5s", "4s"), ("5s", "5s"), ("1m", "59999ms"), ("1h30s", "1h29s"), ("1m", "10s"),
                              ("010s", "9s"), ("2h", "1h59m59s999ms")):
        endpoint = _servicemonitor_endpoint(helm, f"serviceMonitor.interval={interval}",
                                            f"serviceMonitor.scrapeTimeout={timeout}")
        assert (endpoint["interval"], endpoint["scrapeTimeout"]) == (interval, timeout), endpoint


def test_helm_network_policy_admits_the_metrics_port_and_limits_egress_when_asked(helm: str, tmp_path: Path) -> None:
    import kubernetes_validate

    assert "NetworkPolicy" not in _by_kind(_render(helm))  # off by default: it needs a CNI that enforces it
    scrapers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    brokers = [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}], "ports": [{"port": 9092, "protocol": "TCP"}]}]
    values = tmp_path / "np.yaml"
    for egress in ([], brokers):
        values.write_text(yaml.safe_dump({"networkPolicy": {"enabled": True, "metricsFrom": scrapers,
                                                            "egress": egress}}))
        docs = _by_kind(_render(helm, "-f", str(values)))
        policy = docs["NetworkPolicy"]
        kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
        spec = policy["spec"]
        pod = docs["Deployment"]["spec"]["template"]
        check = [d for d in _render(helm, "-f", str(values)) if d["kind"] == "Pod"][0]
        for labels in (pod["metadata"]["labels"], check["metadata"]["labels"]):  # helm test meets the same rules
            assert all(labels.get(e["key"]) in e["values"] for e in spec["podSelector"]["matchExpressions"])
        (c,) = pod["spec"]["containers"]
        (rule,) = spec["ingress"]
        assert [p["port"] for p in rule["ports"]] == [c["ports"][0]["name"]] and rule["from"] == scrapers
        if egress:
            assert spec["policyTypes"] == ["Ingress", "Egress"]
            dns, *rest = spec["egress"]
            assert {p["port"] for p in dns["ports"]} == {53} and rest == brokers
        else:  # egress left open: the brokers' addresses are the operator's to name
            assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec
    values.write_text(yaml.safe_dump({"networkPolicy": {"enabled": True, "egress": brokers,
                                                        "dns": [{"ports": [{"port": 5353, "protocol": "UDP"}]}]}}))
    assert _by_kind(_render(helm, "-f", str(values)))["NetworkPolicy"]["spec"]["egress"][0]["ports"][0]["port"] == 5353
    values.write_text(yaml.safe_dump({"networkPolicy": {"enabled": True, "egress": brokers, "dns": []}}))
    assert _by_kind(_render(helm, "-f", str(values)))["NetworkPolicy"]["spec"]["egress"] == brokers  # no DNS rule


def _rendered_config(docs: list[dict[str, Any]], tmp_path: Path):
    """The daemon's config as the chart renders it, loaded by the daemon's own loader."""
    from pipelines.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(_by_kind(docs)["ConfigMap"]["data"]["config.yaml"])
    return load_config(path, env={})


@pytest.fixture(scope="module")
def chart_config(helm: str) -> dict[str, Any]:
    """The daemon's config as the chart renders it by default."""
    return yaml.safe_load(_by_kind(_render(helm))["ConfigMap"]["data"]["config.yaml"])


def _with_set(config: dict[str, Any], assignment: str) -> None:
    """Apply one ``config.<key>=<value>`` of helm's --set to the rendered config (an int, a {list} or a string)."""
    path, _, text = assignment.partition("=")
    value: Any = text.replace("\\,", ",")
    if text.startswith("{") and text.endswith("}"):
        value = text[1:-1].split(",")
    elif re.fullmatch(r"-?[0-9]+", text):
        value = int(text)
    keys = [int(k[1:-1]) if k.startswith("[") else k for k in re.findall(r"\[[0-9]+\]|[^.\[]+", path)][1:]
    node = config
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value


@pytest.mark.parametrize("bad", [
    "config.alerts.k=6", "config.kafka.heartbeat_interval_ms=20000", "config.kafka.session_timeout_ms=2000",
    "config.sinks.alertmanager.url=alertmanager:9093", "config.sinks.alertmanager.labels.team-name=ops",
    "config.sinks.alertmanager.labels.stream=x", "config.models.served[0].name=../x", "config.kafka.topics[0]=",
    "models.persistence.accessModes[0]=ReadWriteOncePod",  # helm test's pod and the training Job could not mount it
    "config.kafka.fetch_max_wait_ms=30000",  # kafka-python, the chart's client, refuses it
    "config.kafka.client=confluent,config.kafka.fetch_max_wait_ms=59001",  # librdkafka's fetches would time out
    "config.kafka.topics[0]=a b", "config.kafka.topics[0]=..", "config.kafka.topics[0]=" + "x" * 250,
    "config.kafka.dead_letter_topic=.", "config.kafka.dead_letter_topic=dead/letters",
    "config.sinks.kafka.topic=tópico",
    "config.default_models={sensors-gru,sensors-gru}", "config.routes[0].models={sensors-gru,sensors-gru}",
    "config.kafka.bootstrap_servers=\\,", "config.kafka.bootstrap_servers= ",
])
def test_helm_refuses_what_the_daemon_would_refuse_at_every_start(helm: str, bad: str,
                                                                  chart_config: dict[str, Any]) -> None:
    """Each rendered, installed, and every pod then exited 2 (CrashLoopBackOff) on its config; the daemon's loader
    refuses it too (the chart refuses no more than that)."""
    proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION, "--set", bad])
    assert proc.returncode != 0 and ("schema" in proc.stderr or "must be" in proc.stderr), (bad, proc.stderr)
    if bad.startswith("config."):
        from pipelines.config import Config, ConfigError

        config = copy.deepcopy(chart_config)
        for assignment in re.split(r"(?<!\\),(?![^{]*})", bad):
            _with_set(config, assignment)
        with pytest.raises(ConfigError) as refused:
            Config.from_dict(config)
        assert len(refused.value.errors) == 1, refused.value.errors  # for that value alone


def test_helm_takes_what_the_daemon_takes_at_its_limits(helm: str, tmp_path: Path) -> None:
    """The bounds the chart refuses past are the daemon's: at them it renders a config the daemon loads."""
    for sets, key, want in (
            (["config.kafka.fetch_max_wait_ms=29999"], "fetch_max_wait_ms", 29999),
            (["config.kafka.client=confluent", "config.kafka.fetch_max_wait_ms=59000"], "fetch_max_wait_ms", 59000),
            (["config.kafka.topics[0]=" + "x" * 249], "topics", ["x" * 249]),
            (["config.kafka.dead_letter_topic=a.b_c-D9"], "dead_letter_topic", "a.b_c-D9"),
            (["config.kafka.bootstrap_servers=kafka:9092\\, "], "bootstrap_servers", "kafka:9092, ")):
        cfg = _rendered_config(_render(helm, *(a for s in sets for a in ("--set", s))), tmp_path)
        assert getattr(cfg.kafka, key) == want, sets
    assert _rendered_config(_render(helm, "--set", "config.sinks.kafka.topic=..."), tmp_path).sinks.kafka.topic == "..."


def test_replicas_need_a_models_claim_every_node_can_mount(helm: str) -> None:
    """A second replica on another node cannot mount the chart's ReadWriteOnce claim: it waited in
    ContainerCreating for ever, unseen by the alerts (no endpoint, no target)."""
    proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION, "--set", "replicaCount=2"])
    assert proc.returncode != 0 and "replicaCount=2 with a ReadWriteOnce models claim" in proc.stderr, proc.stderr
    term = "affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0]"
    labels = f"{term}.labelSelector.matchLabels.app\\.kubernetes\\.io"
    one_node = [f"{term}.topologyKey=kubernetes.io/hostname", f"{labels}/name=anomalyd", f"{labels}/instance=rel"]
    for loose in ([f"{term}.topologyKey=topology.kubernetes.io/zone", *one_node[1:]], one_node[:1],
                  [*one_node[:1], f"{labels}/name=redis", one_node[2]], [*one_node, f"{term}.namespaces[0]=other"],
                  [*one_node, f"{term}.matchLabelKeys[0]=pod-template-hash"],
                  ["affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight=1"]):
        proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION, "--set",
                     "replicaCount=2", *[a for s in loose for a in ("--set", s)]])
        assert proc.returncode != 0 and "ReadWriteOnce models claim" in proc.stderr, loose  # not one node for sure
    for ok in (["models.persistence.accessModes[0]=ReadWriteMany"], ["models.existingClaim=shared-models"],
               ["models.source=image"], one_node):
        deployment = _by_kind(_render(helm, "--set", "replicaCount=2", *[a for s in ok for a in ("--set", s)]))
        assert deployment["Deployment"]["spec"]["replicas"] == 2


def test_an_empty_namespace_selector_is_every_namespace(helm: str, tmp_path: Path) -> None:
    """``namespaceSelector: {}`` selects pods in every namespace: a same-named release elsewhere, on another node."""
    ours = {"app.kubernetes.io/name": "anomalyd", "app.kubernetes.io/instance": "rel"}
    term = {"topologyKey": "kubernetes.io/hostname", "namespaceSelector": {}, "labelSelector": {"matchLabels": ours}}
    values = {"replicaCount": 2,
              "affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}}
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(values))
    proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION,
                 "-f", str(tmp_path / "v.yaml")])
    assert proc.returncode != 0 and "ReadWriteOnce models claim" in proc.stderr, proc.stderr
    del term["namespaceSelector"]
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(values))
    assert _by_kind(_render(helm, "-f", str(tmp_path / "v.yaml")))["Deployment"]["spec"]["replicas"] == 2


def test_a_null_pod_affinity_renders(helm: str, tmp_path: Path) -> None:
    (tmp_path / "v.yaml").write_text("affinity:\n  podAffinity:\n")  # a placeholder left empty
    assert _by_kind(_render(helm, "-f", str(tmp_path / "v.yaml")))["PersistentVolumeClaim"]


def test_the_pod_waits_for_models_in_a_claim_but_not_for_models_in_the_image(helm: str, tmp_path: Path) -> None:
    assert _rendered_config(_render(helm), tmp_path).models.wait_for_models_s == 3600
    image = _rendered_config(_render(helm, "--set", "models.source=image"), tmp_path)
    assert image.models.wait_for_models_s == 0


def test_a_topic_pattern_replaces_the_charts_default_topics(helm: str, tmp_path: Path) -> None:
    """values.yaml names a topic; a pattern set on top of it made the daemon refuse both."""
    cfg = _rendered_config(_render(helm, "--set", "config.kafka.topic_pattern=^sensors-.*"), tmp_path)
    assert (cfg.kafka.topic_pattern, cfg.kafka.topics) == ("^sensors-.*", [])
    assert _rendered_config(_render(helm), tmp_path).kafka.topics == ["sensors"]


def test_a_recreate_strategy_renders_a_deployment_kubernetes_takes(helm: str) -> None:
    """The chart's default rollingUpdate was merged into it: the API server refuses rollingUpdate with Recreate."""
    import kubernetes_validate

    deployment = _by_kind(_render(helm, "--set", "strategy.type=Recreate"))["Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    assert _by_kind(_render(helm))["Deployment"]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0,
                                                                                         "maxUnavailable": 1}


def test_the_user_name_may_come_from_the_config_when_the_secret_has_none(helm: str, tmp_path: Path) -> None:
    """A Strimzi KafkaUser Secret holds the password, not the user name: usernameKey "" leaves the name to the
    config (the env var from a missing key kept the pod in CreateContainerConfigError)."""
    sasl = ["--set", "kafka.credentials.existingSecret=kafka-user", "--set", "config.kafka.security.protocol=SASL_SSL",
            "--set", "config.kafka.security.sasl_mechanism=SCRAM-SHA-512"]
    docs = _render(helm, *sasl, "--set", "kafka.credentials.usernameKey=", "--set",
                   "config.kafka.security.sasl_username=my-user")
    (c,) = _by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert "ANOMALYD_KAFKA__SECURITY__SASL_USERNAME" not in {e["name"] for e in c["env"]}
    assert yaml.safe_load(_by_kind(docs)["ConfigMap"]["data"]["config.yaml"])["kafka"]["security"][
        "sasl_username"] == "my-user"
    proc = _run([helm, "template", "rel", str(CHART), "--kube-version", KUBERNETES_VERSION, *sasl, "--set",
                 "kafka.credentials.usernameKey="])  # no name from anywhere: every pod would exit 2
    assert proc.returncode != 0 and "set config.kafka.security.sasl_username" in proc.stderr, proc.stderr
    (c,) = _by_kind(_render(helm, *sasl))["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert {"name": "ANOMALYD_KAFKA__SECURITY__SASL_USERNAME",
            "valueFrom": {"secretKeyRef": {"name": "kafka-user", "key": "username"}}} in c["env"]


def test_every_label_value_is_a_valid_one_with_a_long_name_override(helm: str) -> None:
    """Label values are at most 63 characters: "-check" after a name already cut to 63 made the `helm test` pod's
    label and the NetworkPolicy's selector value longer, which the API server refuses."""
    import re

    docs = _render(helm, "--set", f"nameOverride={'n' * 61}", "--set", "networkPolicy.enabled=true")
    values: list[str] = []

    def collect(node: Any, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("labels", "matchLabels") and isinstance(v, dict):
                    values.extend(str(x) for x in v.values())
                elif k == "values" and key == "matchExpressions" and isinstance(v, list):
                    values.extend(str(x) for x in v)
                collect(v, k if k != "values" else key)
        elif isinstance(node, list):
            for item in node:
                collect(item, key)

    for doc in docs:
        collect(doc)
    assert any(v.endswith("-check") for v in values) and len(values) > 20
    bad = [v for v in values if len(v) > 63 or not re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?", v)]
    assert bad == []
