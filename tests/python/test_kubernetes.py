"""The Kubernetes manifests in deploy/kubernetes/ (issue 19, item 5), checked offline: no cluster.

- Every object of a built-in kind (Deployment, Service, HorizontalPodAutoscaler, ConfigMap,
  ServiceAccount, Role, RoleBinding) is validated with kubernetes-validate against the OpenAPI schemas
  of fixed Kubernetes versions: 1.33 (the first with image volumes in beta) and 1.37, strictly (an
  unknown field fails).
- Custom resources (SpinApp, InferencePool, HTTPRoute) and the endpoint picker's config file
  (EndpointPickerConfig, inside a ConfigMap) are NOT schema-validated: kubernetes-validate has no
  schema for them, and the test checks that it indeed refuses them rather than passing them. What
  holds without their schemas is asserted: apiVersion and kind, and that names, labels, ports and
  images agree across the files (selectors match the slm pods, the pool's target port is the
  container's port, probes hit /health on it, the EPP config's plugin references resolve, ...).
- The metrics the EPP config reads exist in `slm serve`'s /metrics (tiny model, served under the
  default model's name so the configured label matches too).
"""
from __future__ import annotations

import pathlib
import re

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT
from test_http import _raw, _start_serve, _stop_serve

DEPLOY = ROOT / "deploy" / "kubernetes"
VERSIONS = ("1.33", "1.37")
BUILTIN = {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"}
CUSTOM = {
    "SpinApp": "core.spinkube.dev/v1alpha1",
    "InferencePool": "inference.networking.k8s.io/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
}
REGISTRY = "registry.example.com/edge-slm"
IMAGE = f"{REGISTRY}/slm:0.1.0"
MODEL = "smollm2-135m-instruct"
MODEL_IMAGE = f"{REGISTRY}/models/{MODEL}:0.1.0"
SPIN_IMAGE = f"{REGISTRY}/slm-http-spin:0.1.0"
SLM_LABELS = {"app.kubernetes.io/name": "slm"}


def _objects() -> list[tuple[str, dict]]:
    out = []
    for f in sorted(DEPLOY.glob("*.yaml")):
        out += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d is not None]
    return out


OBJECTS = _objects()


def _get(kind: str, name: str) -> dict:
    found = [d for _, d in OBJECTS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _file_of(kind: str, name: str) -> str:
    return next(f for f, d in OBJECTS if d["kind"] == kind and d["metadata"]["name"] == name)


def _container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def _port(container: dict, port) -> int:
    """A probe's or Service's port (a name or a number) as the container's port number."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _mib(q: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)", q)
    assert m, q
    return float(m.group(1)) * units[m.group(2)]


def _epp_config() -> dict:
    return yaml.safe_load(_get("ConfigMap", "slm-epp")["data"]["epp-config.yaml"])


def _metric_specs() -> dict[str, str]:
    """The non-empty metric specs of the engine the EPP applies to slm's pods."""
    cfg = _epp_config()
    extractor = next(p for p in cfg["plugins"] if p["type"] == "core-metrics-extractor")
    params = extractor["parameters"]
    engine = next(e for e in params["engineConfigs"] if e["name"] == params["defaultEngine"])
    return {k: v for k, v in engine.items() if k.endswith("Spec") and v}


def _parse_spec(spec: str) -> tuple[str, dict]:
    """`name{label="value",...}` (Prometheus instant-vector selector, equality only) as (name, labels)."""
    m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?', spec)
    assert m, spec
    labels = dict(re.findall(r'(\w+)\s*=\s*"?([^",}]+)"?', m.group(2) or ""))
    return m.group(1), labels


def test_every_object_has_a_known_kind():
    kinds = {d["kind"] for _, d in OBJECTS}
    assert kinds <= BUILTIN | set(CUSTOM), kinds - BUILTIN - set(CUSTOM)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "SpinApp", "InferencePool"} <= kinds
    for _, d in OBJECTS:
        if d["kind"] in CUSTOM:
            assert d["apiVersion"] == CUSTOM[d["kind"]], d["metadata"]["name"]


@pytest.mark.parametrize("version", VERSIONS)
def test_builtin_objects_validate_strictly(version):
    checked = 0
    for f, d in OBJECTS:
        name = f"{f}: {d['kind']}/{d['metadata']['name']}"
        if d["kind"] in BUILTIN:
            try:
                assert kubernetes_validate.validate(d, version, strict=True) == version, name
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name} against {version}: {e.path}: {e.message}")
            checked += 1
        else:
            # A custom resource: no schema to check it against, and no pretending otherwise.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(d, version, strict=True)
    assert checked >= 10


def test_strict_validation_rejects_unknown_fields():
    """The control for the test above: a misspelled field fails."""
    d = yaml.safe_load(yaml.safe_dump(_get("Deployment", "slm")))
    _container(d, "slm")["readinessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(d, VERSIONS[0], strict=True)


def test_slm_deployment():
    dep = _get("Deployment", "slm")
    pod = dep["spec"]["template"]
    assert dep["metadata"]["labels"] == SLM_LABELS and pod["metadata"]["labels"] == SLM_LABELS
    assert dep["spec"]["selector"]["matchLabels"] == SLM_LABELS
    c = _container(dep, "slm")
    assert c["image"] == IMAGE
    args = c["args"]
    flag = lambda f: args[args.index(f) + 1]  # noqa: E731
    assert args[0] == "serve" and flag("--models") == "/models"
    port = _port(c, "http")
    assert port == 8080 and flag("--listen") == f"0.0.0.0:{port}"
    assert flag("--threads") == c["resources"]["requests"]["cpu"]  # inference threads = the CPU request
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and _port(c, get["port"]) == port, probe
    # A first start compiles the component: the startup probe allows minutes, not seconds.
    sp = c["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 60
    assert _mib(c["resources"]["limits"]["memory"]) > _mib(c["resources"]["requests"]["memory"])
    # Security context.
    psc, sc = pod["spec"]["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532 and psc["runAsGroup"] == 65532
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # The optional API key comes from a Secret that may be absent.
    env = {e["name"]: e for e in c["env"]}
    ref = env["SLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True
    # Models from the image volume at /models; a writable emptyDir where the image's SLM_CACHE_DIR points.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/models"]["name"]]["image"] == {"reference": MODEL_IMAGE, "pullPolicy": "IfNotPresent"}
    assert "emptyDir" in volumes[mounts["/var/cache/slm"]["name"]]
    # The PersistentVolumeClaim alternative is there, commented out.
    assert "#   persistentVolumeClaim:" in (DEPLOY / _file_of("Deployment", "slm")).read_text()


def test_services_and_autoscaler_point_at_the_deployment():
    dep = _get("Deployment", "slm")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    c = _container(dep, "slm")
    svc = _get("Service", "slm")
    assert _selects(svc["spec"]["selector"], pod_labels)
    (p,) = svc["spec"]["ports"]
    assert p["port"] == 80 and _port(c, p["targetPort"]) == 8080
    hpa = _get("HorizontalPodAutoscaler", "slm")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "slm"}
    assert "replicas" not in dep["spec"]  # the autoscaler owns it
    (m,) = hpa["spec"]["metrics"]
    assert m["resource"]["name"] == "cpu" and m["resource"]["target"]["type"] == "Utilization"
    assert "slm_requests_waiting" in (DEPLOY / _file_of("HorizontalPodAutoscaler", "slm")).read_text()


def test_headless_service_is_what_haproxy_cfg_resolves():
    svc = _get("Service", "slm-replicas")
    assert svc["spec"]["clusterIP"] == "None"
    assert _selects(svc["spec"]["selector"], _get("Deployment", "slm")["spec"]["template"]["metadata"]["labels"])
    (p,) = svc["spec"]["ports"]
    cfg = (DEPLOY / "haproxy.cfg").read_text()
    hosts = set(re.findall(r"server-template \S+ \S+ ([\w.-]+):(\d+)", cfg))
    assert hosts == {("slm-replicas.default.svc.cluster.local", str(p["port"]))}, hosts


def test_only_slm_pods_carry_the_pool_labels():
    """The Services and the InferencePool select slm's pods and no other pod of these files."""
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for _, d in OBJECTS
            if d["kind"] == "Deployment"}
    for sel in (_get("Service", "slm")["spec"]["selector"], _get("InferencePool", "slm")["spec"]["selector"]["matchLabels"]):
        assert [n for n, labels in pods.items() if _selects(sel, labels)] == ["slm"]


def test_spinapp():
    app = _get("SpinApp", "slm-spin")
    spec = app["spec"]
    assert spec["image"] == SPIN_IMAGE and spec["executor"] == "containerd-shim-spin"
    assert spec["replicas"] >= 1
    assert {spec["checks"][k]["httpGet"]["path"] for k in ("readiness", "liveness")} == {"/health"}
    # spin-operator's admission webhook refuses an invocation limit above the pod's memory limit.
    assert _mib(spec["invocationLimits"]["memory"]) <= _mib(spec["resources"]["limits"]["memory"])
    # The route the component serves under Spin.
    assert '[[trigger.http]]\nroute = "/..."' in (ROOT / "spin.toml").read_text()


def test_inference_pool_epp_and_route_agree():
    pool = _get("InferencePool", "slm")
    dep = _get("Deployment", "slm")
    assert _selects(pool["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [_port(_container(dep, "slm"), "http")]
    # The endpoint picker: the Service the pool names, the Deployment behind it, on its ext_proc port.
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service" and ref["failureMode"] in ("FailOpen", "FailClose")
    svc = _get("Service", ref["name"])
    epp = _get("Deployment", "slm-epp")
    assert _selects(svc["spec"]["selector"], epp["spec"]["template"]["metadata"]["labels"])
    c = _container(epp, "epp")
    sp = next(p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"])
    assert _port(c, sp["targetPort"]) == 9002
    assert c["image"].startswith("registry.k8s.io/gateway-api-inference-extension/epp:v")
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert args["pool-name"] == pool["metadata"]["name"]
    # v1.5.0 refuses the old per-metric flags; the metric names are in the config file.
    for old in ("total-queued-requests-metric", "total-running-requests-metric",
                "kv-cache-usage-percentage-metric", "lora-info-metric", "cache-info-metric"):
        assert old not in args
    # The config file is the ConfigMap's key, mounted where --config-file points.
    mount_dir, key = args["config-file"].rsplit("/", 1)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == mount_dir)
    vol = next(v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert key in _get("ConfigMap", vol["configMap"]["name"])["data"]
    # RBAC: the Deployment's service account is bound to a Role that can watch pods and the pool.
    sa = epp["spec"]["template"]["spec"]["serviceAccountName"]
    _get("ServiceAccount", sa)
    binding = _get("RoleBinding", sa)
    assert {"kind": "ServiceAccount", "name": sa} in binding["subjects"]
    rules = _get("Role", binding["roleRef"]["name"])["rules"]
    assert any("pods" in r["resources"] and "watch" in r["verbs"] for r in rules)
    assert any("inferencepools" in r["resources"] and "inference.networking.k8s.io" in r["apiGroups"] for r in rules)
    # The route sends to the pool.
    route = _get("HTTPRoute", "slm")
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "slm"}]


def test_epp_config_is_consistent():
    cfg = _epp_config()
    assert cfg["apiVersion"] == "inference.networking.x-k8s.io/v1alpha1" and cfg["kind"] == "EndpointPickerConfig"
    names = {p.get("name", p["type"]) for p in cfg["plugins"]}
    refs = [p["pluginRef"] for prof in cfg["schedulingProfiles"] for p in prof["plugins"]]
    for src in cfg["dataLayer"]["sources"]:
        refs += [src["pluginRef"]] + [e["pluginRef"] for e in src["extractors"]]
    assert set(refs) <= names, set(refs) - names
    assert {"queue-scorer", "kv-cache-utilization-scorer"} <= set(refs)
    extractor = next(p for p in cfg["plugins"] if p["type"] == "core-metrics-extractor")
    engine = next(e for e in extractor["parameters"]["engineConfigs"] if e["name"] == "slm")
    assert extractor["parameters"]["defaultEngine"] == "slm"
    assert engine["loraSpec"] == ""  # no LoRA adapters, no LoRA metric
    specs = _metric_specs()
    assert set(specs) == {"queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"}
    for spec in specs.values():
        assert _parse_spec(spec)[1] == {"model": MODEL}, spec


@pytest.fixture(scope="module")
def metrics_text(tiny_dir, tmp_path_factory) -> str:
    """`slm serve`'s /metrics, with the tiny model served under the default model's name."""
    d = tmp_path_factory.mktemp("k8s")
    (d / "models").mkdir()
    (d / "models" / MODEL).symlink_to(tiny_dir, target_is_directory=True)
    url, proc, log = _start_serve(d / "models", d / "serve.log", "--threads", "1")
    try:
        status, _, body = _raw(url, "GET", "/metrics")
    finally:
        _stop_serve(proc, log)
    assert status == 200
    return body.decode()


def test_epp_metrics_exist_in_slm_metrics(metrics_text):
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, re.M))
    samples = re.findall(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})? (\S+)$", metrics_text, re.M)
    for field, spec in _metric_specs().items():
        name, labels = _parse_spec(spec)
        assert types.get(name) == "gauge", f"{field}: {name} is not a gauge in /metrics"
        values = [float(v) for n, lab, v in samples
                  if n == name and labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', lab)).items()]
        assert len(values) == 1, f"{field}: {spec} matches {len(values)} series"
        if field == "kvUsageSpec":
            assert 0 <= values[0] <= 1
