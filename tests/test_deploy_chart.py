"""The Helm chart under deploy/helm/trtqwen: rendered offline by Helm's own Go library (helm_python), every built-in
object validated strictly against Kubernetes' JSON schemas (kubernetes_validate), the CRD objects checked by hand."""
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, lint

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "trtqwen"
KUBE = "1.30"
NS = "llm"
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
FULL = {"replicaCount": 4, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "bench": {"enabled": True}}


@pytest.fixture(scope="module")
def chart():
    with Chart.load(CHART) as c:
        yield c


def render(chart, values=None):
    """{(kind, name): object} of everything the chart renders (NOTES.txt aside)."""
    objs = {}
    for path, text in chart.render(values, name="demo", namespace=NS).items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in objs, f"{key} rendered twice"
                objs[key] = doc
    return objs


def validate(objs):
    for obj in objs.values():
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == NS
            assert isinstance(obj["spec"], dict)
        else:
            kubernetes_validate.validate(obj, KUBE, strict=True)  # raises on any unknown or wrong field


def one(objs, kind, suffix):
    found = [o for (k, n), o in objs.items() if k == kind and n.endswith(suffix)]
    assert len(found) == 1, (kind, suffix, sorted(objs))
    return found[0]


def container(obj, name):
    (c,) = [c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


@pytest.mark.parametrize("values", [None, FULL, {"modelRepository": {"fromImage": True}, "openai": {"enabled": False},
                                                 "bench": {"enabled": True, "helmTest": True},
                                                 "triton": {"podAntiAffinity": "hard"}}],
                         ids=["defaults", "full", "from-image"])
def test_renders_and_validates(chart, values):
    objs = render(chart, values)
    assert {k for k, _ in objs} >= {"Deployment", "Service", "ServiceAccount"}
    validate(objs)
    report = lint(CHART, values, strict=True, kube_version=f"v{KUBE}.0")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_defaults(chart):
    objs = render(chart)
    kinds = sorted(k for k, _ in objs)
    assert kinds == ["Deployment", "Deployment", "Service", "Service", "ServiceAccount"]  # no HPA/CRDs/Job/Ingress
    triton = one(objs, "Deployment", "-triton")
    assert triton["spec"]["replicas"] == 1
    pod = triton["spec"]["template"]["spec"]
    assert not pod.get("hostNetwork") and all(s["spec"]["type"] == "ClusterIP" for (k, _), s in objs.items() if k == "Service")
    c = container(triton, "triton")
    assert c["image"] == "nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3"
    assert c["command"][:5] == ["tritonserver", "--model-repository=/models", "--http-port=8000", "--grpc-port=8001",
                                "--metrics-port=8002"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    repo = vols[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    eng = mounts["/engines/Qwen2.5-7B-Instruct-int4_awq-tp1"]
    assert repo == vols[eng["name"]]["persistentVolumeClaim"]["claimName"] == "trtqwen-models"
    assert eng["subPath"] == "Qwen2.5-7B-Instruct-int4_awq-tp1" and eng["readOnly"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_full(chart):
    objs = render(chart, FULL)
    triton = one(objs, "Deployment", "-triton")
    assert "replicas" not in triton["spec"]  # the HPA owns it
    assert render(chart, {**FULL, "autoscaling": {"enabled": False}})[("Deployment", triton["metadata"]["name"])][
        "spec"]["replicas"] == 4

    pod = triton["spec"]["template"]
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "8002",
                                              "prometheus.io/path": "/metrics"}
    c = container(triton, "triton")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"].get("requests", {}).get("nvidia.com/gpu", 1) == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in [("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live"),
                        ("startupProbe", "/v2/health/ready")]:
        get = c[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == 8000
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600  # engines load for minutes

    svc = one(objs, "Service", "-triton")
    sports = {p["port"]: p for p in svc["spec"]["ports"]}
    assert sorted(sports) == [8000, 8001, 8002]
    assert sports[8001]["name"] == "grpc" and sports[8001]["appProtocol"] == "grpc"
    assert all(ports[p["targetPort"]] == p["port"] for p in sports.values())
    labels = pod["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()

    sm = one(objs, "ServiceMonitor", "-triton")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"

    hpa = one(objs, "HorizontalPodAutoscaler", "-triton")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": triton["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    rule = one(objs, "PrometheusRule", "-triton")
    (recorded,) = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert metric["pods"]["metric"]["name"] == recorded["record"] == chart.values["autoscaling"]["metric"]["name"]
    assert "nv_inference_queue_duration_us" in recorded["expr"] and "nv_inference_compute_infer_duration_us" in recorded["expr"]
    assert f'namespace="{NS}"' in recorded["expr"] and "by (namespace, pod)" in recorded["expr"]
    renamed = render(chart, {**FULL, "autoscaling": {**FULL["autoscaling"], "metric": {"name": "trtqwen:queue:ratio"}}})
    assert one(renamed, "HorizontalPodAutoscaler", "-triton")["spec"]["metrics"][0]["pods"]["metric"]["name"] == \
        one(renamed, "PrometheusRule", "-triton")["spec"]["groups"][0]["rules"][0]["record"] == "trtqwen:queue:ratio"

    host = f"{svc['metadata']['name']}.{NS}.svc"
    oa = container(one(objs, "Deployment", "-openai"), "openai")
    cmd = oa["command"]
    assert cmd[:2] == ["trtqwen", "openai"] and cmd[cmd.index("--url") + 1] == f"{host}:8001"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "9000"
    assert cmd[cmd.index("--served-model-name") + 1] == "qwen2.5"
    assert oa["readinessProbe"]["httpGet"]["path"] == "/v1/models"
    assert one(objs, "Service", "-openai")["spec"]["ports"][0]["port"] == 9000

    job = one(objs, "Job", "-bench")
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    cmd = container(job, "bench")["command"]
    assert cmd[:2] == ["trtqwen", "bench"] and cmd[cmd.index("--url") + 1] == f"{host}:8001"
    assert cmd[cmd.index("--metrics-url") + 1] == f"{host}:8002" and cmd[cmd.index("--concurrency") + 1] == "1,8,32"
    assert cmd[cmd.index("--duration") + 1] == "30" and cmd[cmd.index("--out") + 1] == "/results"


def test_separate_engine_claim_and_from_image(chart):
    objs = render(chart, {"engines": {"existingClaim": "engines-pvc", "subPath": "", "mountPath": "/engines/b"}})
    pod = one(objs, "Deployment", "-triton")["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mount = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert claims[mount["/engines/b"]] == "engines-pvc" and claims[mount["/models"]] == "trtqwen-models"
    pod = one(render(chart, {"modelRepository": {"fromImage": True, "existingClaim": ""}}), "Deployment", "-triton")
    assert [v["name"] for v in pod["spec"]["template"]["spec"]["volumes"]] == ["dshm"]


@pytest.mark.parametrize("values, named", [
    ({"replicaCount": 0}, "replicaCount"),
    ({"modelRepository": {"existingClaim": ""}}, "modelRepository.existingClaim"),
    ({"triton": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}, "nvidia.com/gpu"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "autoscaling.minReplicas"),
    ({"engines": {"mountPath": "engines/b"}}, "engines.mountPath"),
    ({"bench": {"concurrency": "1, 8"}}, "bench/concurrency"),
])
def test_bad_values_refused(chart, values, named):
    with pytest.raises(helm_python.errors.HelmError) as e:
        chart.render(values, name="demo", namespace=NS)
    assert named in str(e.value)


def test_trtqwen_deploy_writes_validated_manifests_or_nothing(tmp_path):
    from typer.testing import CliRunner

    from trtqwen.cli import app

    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"replicaCount": 2, "bench": {"enabled": True}}))
    out = tmp_path / "manifests"
    r = CliRunner().invoke(app, ["deploy", "-f", str(values), "--set", "replicaCount=3", "--out", str(out),
                                 "--namespace", NS])
    assert r.exit_code == 0, r.output
    deployment = yaml.safe_load((out / "triton-deployment.yaml").read_text())
    assert deployment["spec"]["replicas"] == 3 and (out / "bench-job.yaml").is_file()  # --set wins over the file
    bad = CliRunner().invoke(app, ["deploy", "--set", "replicaCount=0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "replicaCount" in bad.output and not (tmp_path / "bad").exists()
