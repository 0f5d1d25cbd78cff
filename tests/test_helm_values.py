"""The chart's values: a strict draft-7 schema that accepts the defaults, a `# --` comment on every value, the chart's
metadata, and bad values that helm template / install --dry-run refuse (schema or a template `fail`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helm_chart import CHART, helm_path, run_helm


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return helm_path()


def test_schema_is_draft7_strict_and_accepts_the_defaults():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, f"{path}: additionalProperties must be false"
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(schema, "#")


def test_every_value_is_documented():
    """helm-docs style: each leaf value has a `# --` comment on itself or on a parent key."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_re = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$")
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        m = key_re.match(line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).split(" #")[0].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j, doc = i - 1, False
        while j >= 0 and lines[j].strip().startswith("#"):
            doc |= lines[j].strip().startswith("# --")
            j -= 1
        documented = doc or any(d for _, d in stack)
        following = next((s for s in lines[i + 1:] if s.strip() and not s.strip().startswith("#")), "")
        is_parent = not rest and len(following) - len(following.lstrip()) > indent \
            and not following.strip().startswith("- ")
        if not is_parent and not documented:
            undocumented.append(f"line {i + 1}: {key}")
        stack.append((indent, documented))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["appVersion"] == "0.1.0" and chart["name"] == "mtn-serve"


def test_helm_is_v4(helm_bin):
    assert run_helm(helm_bin, "version", "--short").stdout.startswith("v4.1.")


SCHEMA_ERROR = "values don't meet the specifications of the schema"


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "worker.maxReplicas=-1"], [SCHEMA_ERROR, "/worker/maxReplicas", "minimum"]),
    (["--set", "image.pullPolicy=Sometimes"], [SCHEMA_ERROR, "/image/pullPolicy", "IfNotPresent"]),
    (["--set", "replicaCount=2"], [SCHEMA_ERROR, "replicaCount", "not allowed"]),
    (["--set", "batching.maxBatchSize=notanumber"], [SCHEMA_ERROR, "/batching/maxBatchSize", "want integer"]),
    (["--set", "worker.gpu=1"], [SCHEMA_ERROR, "'gpu' not allowed"]),
    (["--set", "model.dtype=int8"], [SCHEMA_ERROR, "/model/dtype"]),
    (["--set", "limits.maxImages=100"], [SCHEMA_ERROR, "/limits/maxImages", "maximum"]),
    (["--set-string", "generator.numGpus=1"], [SCHEMA_ERROR, "/generator/numGpus", "want number"]),
    (["--set", "head.rayStartParams.num-cpus=0"], [SCHEMA_ERROR, "/head/rayStartParams/num-cpus", "want string"]),
    (["--set", "translators.German=x"], [SCHEMA_ERROR, "invalid propertyName 'German'"]),
    # rules a JSON schema cannot express: `fail` in templates/_helpers.tpl
    (["--set", "worker.minReplicas=5"], ["worker.minReplicas (5) must be <= worker.maxReplicas (4)"]),
    (["--set", "worker.replicas=9"], ["worker.replicas (9) must be between"]),
    (["--set", "generator.autoscaling.minReplicas=6"], ["generator.autoscaling.minReplicas (6) must be <="]),
    (["--set", "worker.gpus=0"], ["generator.numGpus is 1 but worker.gpus is 0"]),
    (["--set", "generator.autoscaling.maxReplicas=5"], ["need more GPUs than 4 worker pod(s)"]),
    (["--set", "routes.english=de"], ['routes.english="de" is neither "native" nor a key of translators']),
    (["--set", "ingress.enabled=true,ingress.tls.enabled=true"], ["ingress.tls.enabled needs ingress.host"]),
    (["--set", "fullnameOverride=9lives"], ["is not a DNS-1035 label"]),
    (["--set-json", "scratchVolumes=[]"], ["no scratchVolumes entry mounts /tmp"]),
    (["--set-json", 'scratchVolumes=[{"name":"tmp","mountPath":"/tmp"},{"name":"logs","mountPath":"/tmp/ray"}]'],
     ["the /tmp/ray volume must be named ray-logs"]),
    # issue 13: the cluster's security values (the rules themselves: test_helm_security.py)
    (["--set", "image.tag="], [SCHEMA_ERROR, "/image/tag", "minLength"]),
    (["--set", "image.tag=v1:bad"], [SCHEMA_ERROR, "/image/tag"]),
    (["--set", "serviceAccount.name=mtn"], [SCHEMA_ERROR, "'name' not allowed"]),
    (["--set", "auth.apiKeys.enabled=true"], [SCHEMA_ERROR, "/auth/apiKeys/existingSecret", "minLength"]),
    (["--set", "rayAuth.existingSecret=Ray_Token"], [SCHEMA_ERROR, "/rayAuth/existingSecret"]),
    (["--set-json", "networkPolicy.serve.from=[{}]"], [SCHEMA_ERROR, "/networkPolicy/serve/from/0", "minProperties"]),
    (["--set-json", 'networkPolicy.serve.namespaces=["Ingress NGINX"]'], [SCHEMA_ERROR, "/networkPolicy/serve/namespaces/0"]),
    (["--set", "podDisruptionBudget.minAvailable=-1"], [SCHEMA_ERROR, "/podDisruptionBudget/minAvailable"]),
    (["--set", "podDisruptionBudget.maxUnavailable=1"], ["set minAvailable or maxUnavailable, not both"]),
    (["--set", "podDisruptionBudget.minAvailable=null"], ["podDisruptionBudget.enabled needs minAvailable or maxUnavailable"]),
    (["--set-json", 'extraEnv=[{"name":"RAY_AUTH_MODE","value":"disabled"}]'], ["extraEnv: RAY_AUTH_MODE is set by the chart"]),
    (["--set-json", 'extraEnv=[{"name":"MTN_API_KEYS","value":"k"}]'], ["extraEnv: MTN_API_KEYS is set by the chart"]),
    (["--set", "worker.podLabels.app\\.kubernetes\\.io/component=x"],
     ["worker.podLabels must not set app.kubernetes.io/component"]),
    (["--set", "commonLabels.app\\.kubernetes\\.io/instance=x"], ["commonLabels must not set app.kubernetes.io/instance"]),
    (["--set-json", 'networkPolicy.operator.from=[{"namespaceSelector":{}}]'],
     ["networkPolicy.operator.from[0] needs a podSelector with labels"]),
    (["--set", "serviceAccount.head.name=mtn,serviceAccount.worker.name=mtn"],
     ["serviceAccount.head.name and serviceAccount.worker.name are equal"]),
    # issue 13: overload values (serve.config.Admission; the proxy timeout; the Ingress's slots)
    (["--set", "admission.maxQueuedRequests=0"], [SCHEMA_ERROR, "/admission/maxQueuedRequests", "minimum"]),
    (["--set", "admission.maxBodyBytes=100"], [SCHEMA_ERROR, "/admission/maxBodyBytes", "minimum"]),
    (["--set", "admission.queue=1"], [SCHEMA_ERROR, "'queue' not allowed"]),
    (["--set", "httpOptions.requestTimeoutS=0"], [SCHEMA_ERROR, "/httpOptions/requestTimeoutS"]),
    (["--set", "httpOptions.requestTimeoutS=120"],
     ["httpOptions.requestTimeoutS (120) must be above admission.requestTimeoutS (120)"]),
    (["--set-json", "admission.requestTimeoutS=150.5"],
     ["httpOptions.requestTimeoutS (150) must be above admission.requestTimeoutS (150.5)"]),
    # autoscaling: 4 max replicas x 28 + 16 = 128 admitted, not below the Ingress's 128 slots
    (["--set", "generator.maxOngoingRequests=28"],
     ["serveIngress.maxOngoingRequests (128) must be above 128 = Generator max replicas (4) x "
      "generator.maxOngoingRequests (28) + admission.maxQueuedRequests (16)", "at least 129"]),
    # fixed replicas: 3 x 16 + 16 = 64
    (["--set", "generator.autoscaling.enabled=false,generator.replicas=3,serveIngress.maxOngoingRequests=64"],
     ["serveIngress.maxOngoingRequests (64) must be above 64 = Generator max replicas (3)"]),
    (["--set", "admission.maxQueuedRequests=100"], ["serveIngress.maxOngoingRequests (128) must be above 164"]),
    (["--set", "limits.maxRequestPixels=2097153"],
     ["limits.maxRequestPixels (2097153) must be <= batching.maxBatchPixels (2097152)"]),
])
def test_bad_values_are_refused(helm_bin, args, expected):
    for command in (["template", "mtn-serve", str(CHART)], ["install", "mtn-serve", str(CHART), "--dry-run=client"]):
        proc = run_helm(helm_bin, *command, *args)
        assert proc.returncode != 0, f"{args} was accepted by helm {command[0]}"
        for text in expected:
            assert text in proc.stderr, f"{args}: {text!r} not in {proc.stderr!r}"
    if SCHEMA_ERROR in expected:  # helm lint checks the schema but only logs `fail` (lint renders leniently)
        assert run_helm(helm_bin, "lint", "--strict", str(CHART), *args).returncode != 0
