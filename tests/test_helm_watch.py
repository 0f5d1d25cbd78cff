"""Watching the service through the chart: Ray's metrics port on every Ray container, the optional PodMonitor, Serve's
JSON logging config, and the `helm test` hook (rendered, validated, and its script run against a fake service)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.helm_chart import REPO, by_kind, groups, helm_path, render, run_helm, serve_app, vk

PROMETHEUS_PEER = '[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]'
WITH_MONITOR = ["--set", "metrics.podMonitor.enabled=true,metrics.podMonitor.labels.release=prometheus",
                "--set-json", f"networkPolicy.metrics.from={PROMETHEUS_PEER}"]


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    return helm_path()


@pytest.fixture(scope="module")
def default(helm_bin) -> list[dict]:
    return render(helm_bin)


def ray_pods(docs: list[dict]) -> list[dict]:
    (rs,) = by_kind(docs, "RayService")
    head, workers = groups(rs)
    return [head["template"], *(w["template"] for w in workers)]


def test_every_ray_container_names_the_metrics_port(default):
    for pod in ray_pods(default):
        (c,) = pod["spec"]["containers"]
        assert {"name": "metrics", "containerPort": 8080} in c["ports"], c["name"]


def test_podmonitor_only_when_enabled_and_it_scrapes_the_ray_pods(helm_bin, default):
    assert by_kind(default, "PodMonitor") == []
    docs = render(helm_bin, *WITH_MONITOR)
    (pm,) = by_kind(docs, "PodMonitor")
    assert (pm["apiVersion"], pm["metadata"]["name"]) == ("monitoring.coreos.com/v1", "mtn-serve")
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s",
                                                  "scrapeTimeout": "10s"}]
    from pod_security import selector_matches

    for pod in ray_pods(docs):  # both Ray pods, by a port name their container has
        assert selector_matches(pm["spec"]["selector"], pod["metadata"]["labels"])
        assert "metrics" in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    (test_pod,) = by_kind(docs, "Pod")
    assert not selector_matches(pm["spec"]["selector"], test_pod["metadata"]["labels"])
    assert vk.object_errors(pm) == ("PodMonitor structure (no CRD offline)", [])


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda s: s["podMetricsEndpoints"][0].pop("port"), "port (a container port name) is required"),
    (lambda s: s["podMetricsEndpoints"][0].update(interval="30 seconds"), "is not a Prometheus duration"),
    (lambda s: s["podMetricsEndpoints"][0].update(portname="metrics"), "unknown fields ['portname']"),
    (lambda s: s.update(selector={}), "an empty one selects every pod"),
    (lambda s: s.update(podMetricsEndpoints=[]), "at least one endpoint is required"),
    (lambda s: s["selector"]["matchExpressions"][0].update(operator="Has"), "needs a key and an operator"),
])
def test_podmonitor_check_catches_a_broken_shape(helm_bin, mutate, expected):
    (pm,) = by_kind(render(helm_bin, *WITH_MONITOR), "PodMonitor")
    broken = copy.deepcopy(pm)
    mutate(broken["spec"])
    _, errors = vk.object_errors(broken)
    assert any(expected in e for e in errors), errors


def test_podmonitor_needs_prometheus_admitted_by_the_network_policy(helm_bin):
    proc = run_helm(helm_bin, "template", "mtn-serve", str(REPO / "helm" / "mtn-serve"),
                    "--set", "metrics.podMonitor.enabled=true")
    assert proc.returncode != 0 and "metrics.podMonitor.enabled needs networkPolicy.metrics.from" in proc.stderr
    docs = render(helm_bin, "--set", "metrics.podMonitor.enabled=true,networkPolicy.enabled=false")
    assert len(by_kind(docs, "PodMonitor")) == 1 and by_kind(docs, "NetworkPolicy") == []


def test_serve_logs_json_by_default_as_in_serve_config(helm_bin, default):
    from ray.serve.schema import LoggingConfig

    (rs,) = by_kind(default, "RayService")
    logging_config = serve_app(rs)["logging_config"]
    assert logging_config == {"encoding": "JSON", "log_level": "INFO", "enable_access_log": True}
    assert LoggingConfig(**logging_config).encoding == "JSON"
    ref = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]
    assert ref["logging_config"] == logging_config
    (rs,) = by_kind(render(helm_bin, "--set", "logging.encoding=TEXT,logging.enableAccessLog=false"), "RayService")
    assert serve_app(rs)["logging_config"] == {"encoding": "TEXT", "log_level": "INFO", "enable_access_log": False}


# ------------------------------------------------------------------------------------------------ helm test
def test_helm_test_hook_is_a_restricted_pod_admitted_to_the_serve_port(helm_bin, default):
    (pod,) = by_kind(default, "Pod")
    assert pod["metadata"]["annotations"] == {"helm.sh/hook": "test",
                                              "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded"}
    spec = pod["spec"]
    (c,) = spec["containers"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert {"name": "MTN_SERVE_URL", "value": "http://mtn-serve-serve-svc:8000"} in c["env"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert set(c["resources"]["limits"]) == {"cpu", "memory"}
    assert vk.object_errors(pod) == ("kubernetes-validate --strict 1.30.0, 1.35.0 + restricted pods", [])
    assert c["image"] == ray_pods(default)[0]["spec"]["containers"][0]["image"]  # the chart's own image
    # a privileged variant is caught by the project policy
    bad = copy.deepcopy(pod)
    bad["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    assert any("allowPrivilegeEscalation" in e for e in vk.object_errors(bad)[1])
    # with API keys it sends the first key, read from the Secret
    (pod,) = by_kind(render(helm_bin, "--set", "auth.apiKeys.enabled=true,auth.apiKeys.existingSecret=keys"), "Pod")
    assert {"name": "MTN_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-keys"}}} in \
        pod["spec"]["containers"][0]["env"]
    # switched off: no Pod, and no NetworkPolicy rule for it
    docs = render(helm_bin, "--set", "helmTest.enabled=false")
    (np,) = by_kind(docs, "NetworkPolicy")
    assert by_kind(docs, "Pod") == [] and len(np["spec"]["ingress"]) == len(
        by_kind(default, "NetworkPolicy")[0]["spec"]["ingress"]) - 1


class FakeService(BaseHTTPRequestHandler):
    """/healthz and /v1/generate as the service answers them; `generate_status` other than 200 fails the generate."""

    generate_status = 200
    seen: list = []

    def _answer(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):  # noqa: N802 (http.server's name)
        self._answer(200, {"status": "ok"}) if self.path == "/healthz" else self._answer(404, {})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, self.headers.get("Authorization"), body))
        if self.generate_status != 200:
            return self._answer(self.generate_status, {"error": "at capacity"})
        return self._answer(200, {"images": ["iVBORw0KGgo="], "route": {"route": "native"}, "timings": {"total_ms": 5}})

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [200, 503])
def test_helm_test_script_passes_on_a_healthy_service_only(default, status, monkeypatch):
    (pod,) = by_kind(default, "Pod")
    (c,) = pod["spec"]["containers"]
    assert c["command"][:2] == ["python", "-c"]
    monkeypatch.setattr(FakeService, "generate_status", status)
    monkeypatch.setattr(FakeService, "seen", [])
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeService)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, **{e["name"]: e["value"] for e in c["env"]}, "MTN_API_KEYS": "k1, k2",
               "MTN_SERVE_URL": f"http://127.0.0.1:{server.server_address[1]}"}
        proc = subprocess.run([sys.executable, "-c", c["command"][2]], env=env, capture_output=True, text=True,
                              timeout=60)
    finally:
        server.shutdown()
    ((path, auth, body),) = FakeService.seen
    assert (path, auth) == ("/v1/generate", "Bearer k1") and body["num_inference_steps"] == 1
    if status == 200:
        assert proc.returncode == 0 and "ok: /healthz, and one image on route native" in proc.stdout, proc.stderr
    else:
        assert proc.returncode != 0 and "503" in proc.stderr
