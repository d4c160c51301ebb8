"""Static checks of the deployment artefacts (no Docker, no cluster) and the container probe.

* every YAML file under deploy/compose and deploy/k8s parses and passes yamllint
  (deploy/.yamllint);
* the manifests agree with the service: PAIRSIEVE_* names exist in ``Settings``, the values
  are accepted by ``Settings.from_env``, ports are the Settings defaults and the probes target
  them, compose creates exactly the topics of ``service.streaming.topics`` with sane partition
  counts, the images run as a non-root user and pin torch==2.13.0, the ServiceMonitor selects
  the Service;
* deploy/k8s/prometheusrule.yaml is the current output of build_prometheusrule.py;
* deploy/healthcheck.py against a real in-process gRPC server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import shlex
import socket
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from service.settings import Settings
from service.streaming.topics import (
    DEAD_LETTER_TOPIC,
    DECISIONS_TOPIC,
    FEATURES_TOPIC,
    LABELS_TOPIC,
    REQUESTS_TOPIC,
    TOPICS,
    topic_configs,
)

try:
    import yaml
except ImportError:  # PyYAML comes with yamllint (dev extra)
    yaml = None
try:
    from yamllint import linter as yamllint_linter
    from yamllint.config import YamlLintConfig
except ImportError:
    yamllint_linter = None

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
DEFAULTS = Settings()
KNOWN_ENV = {Settings.env_name(f.name) for f in fields(Settings)}
WORKERS = ("pairsieve-worker-1", "pairsieve-worker-2")

needs_yaml = pytest.mark.skipif(yaml is None, reason="PyYAML missing: pip install -e '.[dev]'")
needs_yamllint = pytest.mark.skipif(yamllint_linter is None,
                                    reason="yamllint missing: pip install -e '.[dev]'")


def _yaml_files() -> list[Path]:
    return sorted(p for d in (COMPOSE, K8S) for p in d.rglob("*")
                  if p.suffix in (".yml", ".yaml") and p.is_file())


def _load(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


def _compose() -> dict:
    return _load(COMPOSE_FILE)


def _k8s(name: str) -> dict:
    return _load(K8S / name)


def _container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def _port(container: dict, name: str) -> int:
    (p,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return p


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def _worker_env(service: dict) -> dict[str, str]:
    """A compose worker's environment: env files in order, then ``environment``."""
    env: dict[str, str] = {}
    for entry in service.get("env_file", []):
        path = COMPOSE / (entry["path"] if isinstance(entry, dict) else entry)
        required = entry.get("required", True) if isinstance(entry, dict) else True
        if path.exists():
            env.update(_env_file(path))
        else:
            assert not required, f"required env file {path} is missing"
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return env


def _kafka_init_topics() -> dict[str, tuple[int, str]]:
    """``create TOPIC PARTITIONS POLICY RETENTION`` lines of the kafka-init script."""
    cmd = _compose()["services"]["kafka-init"]["command"]
    script = cmd if isinstance(cmd, str) else "\n".join(cmd)
    out = {}
    for line in script.splitlines():
        if not re.match(r"\s*create\s", line):
            continue
        words = shlex.split(line, comments=True)
        if words[0] == "create":
            name, partitions, policy, _retention = words[1:5]
            assert name not in out, f"topic {name} created twice"
            out[name] = (int(partitions), policy)
    return out


# --------------------------------------------------------------------------- syntax
@needs_yaml
def test_every_yaml_file_parses():
    files = _yaml_files()
    assert COMPOSE_FILE in files and len(files) >= 10, files
    for path in files:
        assert isinstance(_load(path), dict), path


@needs_yamllint
def test_every_yaml_file_passes_yamllint():
    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    problems = []
    for path in _yaml_files():
        problems += [f"{path.relative_to(REPO)}:{p.line}:{p.column} {p.level} {p.desc} ({p.rule})"
                     for p in yamllint_linter.run(path.read_text(encoding="utf-8"), conf,
                                                  str(path))]
    assert not problems, "\n".join(problems)


def test_yamllint_config_relaxes_line_length_and_document_start():
    text = (DEPLOY / ".yamllint").read_text(encoding="utf-8")
    assert re.search(r"document-start:\s*disable", text)
    assert re.search(r"line-length:\s*\n\s*max:\s*120", text)


# --------------------------------------------------------------------------- settings
def _all_pairsieve_env() -> dict[str, dict[str, str]]:
    """Where -> {PAIRSIEVE_* name: value} for every place compose and k8s set one."""
    found: dict[str, dict[str, str]] = {}
    services = _compose()["services"]
    for name, svc in services.items():
        env = _worker_env(svc) if "env_file" in svc else {
            k: str(v) for k, v in (svc.get("environment") or {}).items()}
        found[f"compose:{name}"] = {k: v for k, v in env.items() if k.startswith("PAIRSIEVE_")}
    for path in sorted(COMPOSE.glob("*.env*")):
        found[f"compose:{path.name}"] = {k: v for k, v in _env_file(path).items()
                                         if k.startswith("PAIRSIEVE_")}
    found["k8s:configmap"] = dict(_k8s("configmap.yaml")["data"])
    found["k8s:secret"] = dict(_k8s("secret.yaml")["stringData"])
    for name in ("deployment.yaml", "deployment-gpu.yaml"):
        env = _container(_k8s(name)).get("env", [])
        found[f"k8s:{name}"] = {e["name"]: e.get("value", "<ref>") for e in env
                                if e["name"].startswith("PAIRSIEVE_")}
    # any PAIRSIEVE_ token anywhere in the text (comments included) must be a real setting too
    for path in [*_yaml_files(), *DOCKERFILES]:
        for token in re.findall(r"PAIRSIEVE_[A-Z0-9_]+", path.read_text(encoding="utf-8")):
            found.setdefault(f"text:{path.name}", {})[token] = "<text>"
    return found


@needs_yaml
def test_every_pairsieve_env_var_is_a_setting():
    unknown = {(where, k) for where, env in _all_pairsieve_env().items() for k in env
               if k not in KNOWN_ENV}
    assert not unknown, f"not in service.settings.Settings: {sorted(unknown)}"


@needs_yaml
def test_worker_environments_are_valid_settings():
    services = _compose()["services"]
    for name in WORKERS:
        env = _worker_env(services[name])
        s = Settings.from_env(env)
        assert s.kafka_bootstrap == "kafka:9092" and s.auth_token, name
        # a real Kafka refuses session timeouts below group.min.session.timeout.ms (6 s default)
        assert s.session_timeout_seconds >= 6, name
    ids = {_worker_env(services[n])["PAIRSIEVE_WORKER_ID"] for n in WORKERS}
    assert len(ids) == len(WORKERS)
    groups = {Settings.from_env(_worker_env(services[n])).group_id for n in WORKERS}
    assert len(groups) == 1, "all workers must share one consumer group"

    cm = _k8s("configmap.yaml")["data"]
    assert all(isinstance(v, str) for v in cm.values()), "ConfigMap values must be strings"
    s = Settings.from_env({**cm, **_k8s("secret.yaml")["stringData"]})
    assert s.kafka_bootstrap and s.session_timeout_seconds >= 6
    assert set(_k8s("secret.yaml")["stringData"]) == {"PAIRSIEVE_AUTH_TOKEN"}
    assert "PAIRSIEVE_AUTH_TOKEN" not in cm, "the token belongs in the Secret"


# --------------------------------------------------------------------------- ports
def test_settings_defaults_are_the_documented_ports():
    assert (DEFAULTS.grpc_port, DEFAULTS.metrics_port) == (50051, 9464)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(dockerfile):
    text = dockerfile.read_text(encoding="utf-8")
    m = re.search(r'pip install "torch==2\.13\.0" --index-url (\S+)', text)
    assert m, "torch==2.13.0 pinned, from the PyTorch index"
    index = m.group(1).strip('"')
    if index == "${TORCH_INDEX}":
        index = re.search(r"^ARG TORCH_INDEX=(\S+)$", text, re.M).group(1)
    assert index.startswith("https://download.pytorch.org/whl/")
    assert set(re.findall(r"torch==([0-9][0-9A-Za-z.+]*[0-9A-Za-z])", text)) == {"2.13.0"}
    assert not re.search(r"torch(>=|~=|<|>)", text)
    froms = re.findall(r"^ARG (?:PYTHON|CUDA)_IMAGE=(\S+)$", text, re.M)
    assert froms and all(re.fullmatch(r"[\w./-]+:[\w.-]+", f) and not f.endswith(":latest")
                         for f in froms), "base image pinned by tag"
    if dockerfile.name == "Dockerfile":
        assert "--index-url https://download.pytorch.org/whl/cpu" in text
        assert froms[0].startswith("python:3.11")
        assert "PAIRSIEVE_DEVICE=cpu" in text
    else:
        assert froms[0].startswith("nvidia/cuda:") and "runtime" in froms[0]
        assert "PAIRSIEVE_DEVICE=cuda" in text
    assert re.search(r"useradd .*--uid 10001", text)
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    assert user.split(":")[0] in ("10001", "pairsieve")
    assert re.search(r"^EXPOSE 50051 9464$", text, re.M)
    assert (DEFAULTS.grpc_port, DEFAULTS.metrics_port) == (50051, 9464)
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["python", "/opt/pairsieve/healthcheck\.py"\]',
                     text, re.M)
    assert "COPY deploy/healthcheck.py /opt/pairsieve/healthcheck.py" in text
    assert re.search(r'^ENTRYPOINT \["pairsieve", "serve"\]$', text, re.M)
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text(encoding="utf-8")
    for needed in ("pyproject.toml", "README.md", "service/", "deploy/healthcheck.py"):
        assert f"!{needed}" in ignore


@needs_yaml
def test_compose_workers_ports_healthchecks_and_ordering():
    services = _compose()["services"]
    for name in WORKERS:
        svc = services[name]
        env = Settings.from_env(_worker_env(svc))
        assert (env.grpc_port, env.metrics_port) == (DEFAULTS.grpc_port, DEFAULTS.metrics_port)
        targets = {int(p.split(":")[-1]) for p in svc["ports"]}
        assert targets == {env.grpc_port, env.metrics_port}, name
        assert svc["healthcheck"]["test"] == ["CMD", "python", "/opt/pairsieve/healthcheck.py"]
        assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (COMPOSE / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() \
            == (DEPLOY / "Dockerfile").resolve()
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "healthcheck" in services["kafka"]


@needs_yaml
def test_compose_kafka_is_single_node_kraft():
    kafka = _compose()["services"]["kafka"]
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", kafka["image"])
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]), "base64 UUID"
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]) == "false"
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= DEFAULTS.max_message_bytes


@needs_yaml
def test_compose_images_are_pinned_and_observability_files_are_mounted():
    services = _compose()["services"]
    for name, svc in services.items():
        if "image" in svc:
            image = svc["image"]
            assert ":" in image and not image.endswith(":latest"), (name, image)
    mounts = {v.split(":")[0] for name in ("prometheus", "grafana")
              for v in services[name]["volumes"]}
    for rel in ("../prometheus/prometheus.yml", "../prometheus/alerts.yml",
                "../grafana/provisioning", "../grafana/dashboards"):
        assert rel in mounts, rel


# --------------------------------------------------------------------------- topics
@needs_yaml
def test_compose_creates_exactly_the_service_topics():
    topics = _kafka_init_topics()
    assert set(topics) == set(TOPICS)
    assert all(n >= 1 for n, _ in topics.values())
    assert topics[LABELS_TOPIC][0] == 1 and topics[DEAD_LETTER_TOPIC][0] == 1
    # the service checks existing topics against PAIRSIEVE_FEATURES_PARTITIONS (features and
    # requests both get that count) and refuses to start on a mismatch
    assert topics[FEATURES_TOPIC][0] == topics[REQUESTS_TOPIC][0]
    services = _compose()["services"]
    for name in WORKERS:
        s = Settings.from_env(_worker_env(services[name]))
        assert s.features_partitions == topics[FEATURES_TOPIC][0]
        assert s.topic_suffix == ""
        assert len(WORKERS) <= s.features_partitions
    cm = Settings.from_env(_k8s("configmap.yaml")["data"])
    assert cm.features_partitions == topics[FEATURES_TOPIC][0]
    # every request is an event (budget, dedup replay): the requests log is never compacted
    assert topics[REQUESTS_TOPIC][1] == "delete"
    # the acquired pairs (keyed by pair) and the newest model (one key) are compacted, as the
    # service itself creates them (topic_configs)
    for t, cfg in topic_configs().items():
        assert topics[t][1] == cfg["cleanup.policy"], t
    assert topics[DECISIONS_TOPIC][0] == topics[FEATURES_TOPIC][0]  # one log partition per one


# --------------------------------------------------------------------------- kubernetes
@needs_yaml
@pytest.mark.parametrize("name", ["deployment.yaml", "deployment-gpu.yaml"])
def test_k8s_deployment(name):
    dep = _k8s(name)
    assert dep["metadata"]["name"] == "pairsieve"
    assert dep["spec"]["replicas"] >= 1
    assert dep["spec"]["replicas"] <= Settings.from_env(
        _k8s("configmap.yaml")["data"]).features_partitions
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep)
    grpc_port, metrics_port = _port(c, "grpc"), _port(c, "metrics")
    assert (grpc_port, metrics_port) == (DEFAULTS.grpc_port, DEFAULTS.metrics_port)
    cm = Settings.from_env(_k8s("configmap.yaml")["data"])
    assert (cm.grpc_port, cm.metrics_port) == (grpc_port, metrics_port)
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": metrics_port}
    # security: non-root uid 10001, read-only root with writable /tmp and work dir
    for ctx in (pod["securityContext"], c["securityContext"]):
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts.get("/tmp") in volumes
    workdirs = {re.findall(r"^WORKDIR (\S+)$", d.read_text(), re.M)[-1] for d in DOCKERFILES}
    assert workdirs == {"/var/lib/pairsieve"} and mounts.get("/var/lib/pairsieve") in volumes
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][key]), key
    assert pod["terminationGracePeriodSeconds"] >= 2 * cm.shutdown_grace_seconds
    # config and secret wiring
    assert {"configMapRef": {"name": _k8s("configmap.yaml")["metadata"]["name"]}} in c["envFrom"]
    (token,) = [e for e in c["env"] if e["name"] == "PAIRSIEVE_AUTH_TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["name"] == _k8s("secret.yaml")["metadata"]["name"]
    assert ref["key"] in _k8s("secret.yaml")["stringData"]
    # the Service, the PDB and the ServiceMonitor select these pods
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _k8s("service.yaml")["spec"]["selector"].items() <= labels.items()
    assert _k8s("pdb.yaml")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    if name == "deployment-gpu.yaml":
        assert c["image"].endswith("-cuda")
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert {"name": "PAIRSIEVE_DEVICE", "value": "cuda"} in c["env"]
    else:
        assert dep["spec"]["replicas"] == 2 and not c["image"].endswith("-cuda")


@needs_yaml
def test_k8s_service_and_servicemonitor_agree():
    svc = _k8s("service.yaml")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == DEFAULTS.grpc_port and ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["port"] == DEFAULTS.metrics_port
    assert ports["metrics"]["targetPort"] == "metrics"
    sm = _k8s("servicemonitor.yaml")
    assert sm["kind"] == "ServiceMonitor"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    # the alert rules select job="pairsieve": the operator's default job label is the Service name
    assert svc["metadata"]["name"] == "pairsieve" and "jobLabel" not in sm["spec"]


@needs_yaml
def test_k8s_kustomization_lists_every_manifest_once():
    kust = _k8s("kustomization.yaml")
    listed = kust["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml",
                                                      "deployment-gpu.yaml"}
    assert set(listed) == on_disk
    names = [(d["kind"], d["metadata"]["name"]) for d in map(_k8s, listed)]
    assert len(names) == len(set(names))
    for name in listed:
        doc = _k8s(name)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kust["namespace"], name
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
            "ServiceMonitor", "PrometheusRule"} == {k for k, _ in names}


# --------------------------------------------------------------------------- PrometheusRule
def _build_module():
    spec = importlib.util.spec_from_file_location("build_prometheusrule",
                                                  K8S / "build_prometheusrule.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_yaml
def test_prometheusrule_is_generated_from_alerts_yml():
    alerts = DEPLOY / "prometheus" / "alerts.yml"
    if not alerts.exists():
        pytest.skip("deploy/prometheus/alerts.yml not written yet")
    mod = _build_module()
    expected = mod.build(alerts.read_text(encoding="utf-8"))
    actual = (K8S / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert actual == expected, "stale: run python deploy/k8s/build_prometheusrule.py"
    rule = yaml.safe_load(actual)
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(alerts.read_text())["groups"]


@needs_yaml
def test_prometheusrule_builder_round_trips_multiline_rules():
    src = ("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n"
           "          sum(rate(x[5m]))\n            > 1\n        for: 1m\n"
           "        annotations:\n          description: \"" + "word " * 40 + "\"\n")
    out = _build_module().build(src)
    assert yaml.safe_load(out)["spec"]["groups"] == yaml.safe_load(src)["groups"]
    assert "expr: |" in out
    if yamllint_linter is not None:
        conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
        assert not list(yamllint_linter.run(out, conf))


# --------------------------------------------------------------------------- healthcheck probe
def _healthcheck():
    spec = importlib.util.spec_from_file_location("pairsieve_healthcheck",
                                                  DEPLOY / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_probe_against_a_real_grpc_server(monkeypatch):
    from service.rpc.server import start_grpc_server
    from service.runtime import build_engine

    hc = _healthcheck()
    handler = build_engine(Settings(modalities="image:8,text:6", embedding_dim=4,
                                    index_size=16, cache_capacity=16))

    async def scenario():
        server = await start_grpc_server(handler, host="127.0.0.1", port=0,
                                         auth_token="tok")  # health stays open with auth
        try:
            # the probe is blocking: run it off the loop that serves the call
            async def probe(**kw):
                return await asyncio.to_thread(hc.probe, "127.0.0.1", server.port,
                                               timeout_s=5.0, **kw)

            assert await probe() == hc.SERVING == 0
            monkeypatch.setenv("PAIRSIEVE_GRPC_PORT", str(server.port))
            monkeypatch.setenv("HEALTHCHECK_HOST", "127.0.0.1")
            assert await asyncio.to_thread(hc.main) == 0  # port from the environment
            await server.set_serving(False)  # the first step of a shutdown
            assert await probe() == hc.NOT_SERVING != 0
            assert await asyncio.to_thread(hc.main) != 0
            await server.set_serving(True)
            assert await probe(service="pairsieve.v1.Selector") == 0
            assert await probe(service="no.such.Service") != 0
        finally:
            await server.stop(0.5)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        handler.close()


def test_healthcheck_probe_unreachable_is_nonzero():
    hc = _healthcheck()
    assert hc.probe("127.0.0.1", _free_port(), timeout_s=1.0) == hc.UNREACHABLE != 0


def test_healthcheck_script_exit_code_when_run_as_a_command():
    import subprocess

    proc = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")],
                          env={"PAIRSIEVE_GRPC_PORT": str(_free_port()),
                               "HEALTHCHECK_HOST": "127.0.0.1", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "unhealthy" in proc.stderr
