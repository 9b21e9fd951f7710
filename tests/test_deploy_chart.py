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
KEY = {"openai": {"apiKeySecret": {"name": "trtqwen-openai"}}}  # required while openai.enabled (the default)
FULL = {"replicaCount": 4, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "bench": {"enabled": True}, **KEY}


def merge(a: dict, b: dict) -> dict:
    return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                    for k, v in b.items()}}


@pytest.fixture(scope="module")
def chart():
    with Chart.load(CHART) as c:
        yield c


def render(chart, values=None, key=True):
    """{(kind, name): object} of everything the chart renders (NOTES.txt aside); `key`: with openai.apiKeySecret."""
    objs = {}
    values = merge(KEY, values or {}) if key else values
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


@pytest.mark.parametrize("values", [KEY, FULL, {"modelRepository": {"fromImage": True}, "openai": {"enabled": False},
                                                 "bench": {"enabled": True, "helmTest": True},
                                                 "triton": {"podAntiAffinity": "hard"}}],
                         ids=["defaults", "full", "from-image"])
def test_renders_and_validates(chart, values):
    objs = render(chart, values, key=False)
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
    assert oa["readinessProbe"] == {"tcpSocket": {"port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5,
                                    "failureThreshold": 3}
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
    values.write_text(yaml.safe_dump({"replicaCount": 2, "bench": {"enabled": True}, **KEY}))
    out = tmp_path / "manifests"
    r = CliRunner().invoke(app, ["deploy", "-f", str(values), "--set", "replicaCount=3", "--out", str(out),
                                 "--namespace", NS])
    assert r.exit_code == 0, r.output
    deployment = yaml.safe_load((out / "triton-deployment.yaml").read_text())
    assert deployment["spec"]["replicas"] == 3 and (out / "bench-job.yaml").is_file()  # --set wins over the file
    bad = CliRunner().invoke(app, ["deploy", "--set", "replicaCount=0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "replicaCount" in bad.output and not (tmp_path / "bad").exists()
    keyless = CliRunner().invoke(app, ["deploy", "--out", str(tmp_path / "keyless")])  # the defaults: no Secret named
    assert keyless.exit_code == 2 and not (tmp_path / "keyless").exists()
    assert "openai.apiKeySecret.name" in keyless.output and "create secret generic" in keyless.output


# --- the OpenAI proxy: API key from a Secret, Host check, probes -----------------------------------------------

@pytest.mark.parametrize("values", [None, {"openai": {"apiKeySecret": {"name": ""}}},
                                    {"openai": {"apiKeySecret": {"key": "token"}}}])
def test_openai_refuses_to_render_without_the_key_secret(chart, values):
    with pytest.raises(helm_python.errors.HelmError) as e:
        chart.render(values, name="demo", namespace=NS)
    msg = str(e.value)
    assert "openai.apiKeySecret.name is required" in msg
    key = (values or {}).get("openai", {}).get("apiKeySecret", {}).get("key", "api-key")
    assert f"kubectl -n {NS} create secret generic trtqwen-openai --from-literal={key}=$(openssl rand -hex 32)" in msg
    assert "openai.apiKeySecret.name=trtqwen-openai" in msg and "openai.enabled=false" in msg
    render(chart, merge(values or {}, {"openai": {"enabled": False}}), key=False)  # no proxy, no key needed


@pytest.mark.parametrize("values, named", [
    ({"openai": {"apiKeySecret": {"name": "Not_A_Name"}}}, "apiKeySecret/name"),
    ({"openai": {"apiKeySecret": {"name": "k", "key": ""}}}, "apiKeySecret/key"),
    ({"openai": {"apiKeySecret": "trtqwen-openai"}}, "apiKeySecret"),
    ({"openai": {"apiKeySecrets": {"name": "k"}}}, "apiKeySecrets"),  # a typo is refused, not ignored
    ({"openai": {"allowedHosts": "*"}}, "allowedHosts"),
    ({"openai": {"allowedHosts": ["a b"]}}, "allowedHosts/0"),
    ({"openai": {"allowedOrigins": ["chat.example.com"]}}, "allowedOrigins/0"),
    ({"openai": {"extraArgs": ["--api-key=sk-123"]}}, "openai.extraArgs must not carry --api-key"),
    ({"openai": {"env": [{"name": "TRTQWEN_API_KEY", "value": "sk-123"}]}}, "openai.env must not set TRTQWEN_API_KEY"),
])
def test_openai_bad_values_refused(chart, values, named):
    with pytest.raises(helm_python.errors.HelmError) as e:
        chart.render(merge(KEY, values), name="demo", namespace=NS)
    assert named in str(e.value)


def test_openai_deployment_takes_the_key_from_the_secret(chart):
    dep = one(render(chart), "Deployment", "-openai")
    c = container(dep, "openai")
    assert c["env"] == [{"name": "TRTQWEN_API_KEY",
                         "valueFrom": {"secretKeyRef": {"name": "trtqwen-openai", "key": "api-key"}}}]
    cmd = c["command"]
    assert cmd[cmd.index("--allowed-host") + 1] == "*" and cmd.count("--allowed-host") == 1
    assert "--allowed-origin" not in cmd and not any(a.startswith("--api-key") for a in cmd)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert "httpGet" not in c[probe] and ports[c[probe]["tcpSocket"]["port"]] == 9000  # no key, no Host needed
    assert "startupProbe" not in c

    objs = render(chart, {"openai": {"apiKeySecret": {"name": "llm-key", "key": "token"},
                                     "allowedHosts": ["demo-trtqwen-openai.llm.svc", "demo-trtqwen-openai"],
                                     "allowedOrigins": ["https://chat.example.com"],
                                     "env": [{"name": "HF_HOME", "value": "/tmp/hf"}], "port": 9100}})
    validate(objs)
    c = container(one(objs, "Deployment", "-openai"), "openai")
    assert c["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "llm-key", "key": "token"}
    assert c["env"][1] == {"name": "HF_HOME", "value": "/tmp/hf"}
    cmd = c["command"]
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--allowed-host"] == ["demo-trtqwen-openai.llm.svc",
                                                                                 "demo-trtqwen-openai"]
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--allowed-origin"] == ["https://chat.example.com"]
    assert c["readinessProbe"]["tcpSocket"]["port"] == "http" and c["ports"][0]["containerPort"] == 9100
    c = container(one(render(chart, {"openai": {"allowedHosts": []}}), "Deployment", "-openai"), "openai")
    assert "--allowed-host" not in c["command"]


def test_nothing_else_calls_the_openai_api(chart):
    """The bench Job (and its wait-for-triton init container) talk to Triton directly, never to the keyed proxy."""
    objs = render(chart, {**FULL, "bench": {"enabled": True, "helmTest": True}})
    proxy = one(objs, "Service", "-openai")["metadata"]["name"]
    for (kind, name), obj in objs.items():
        if name == proxy:
            continue
        assert proxy not in yaml.safe_dump(obj), (kind, name)
    job = one(objs, "Job", "-bench")["spec"]["template"]["spec"]
    for c in job["initContainers"] + job["containers"]:
        assert "-triton." in " ".join(c["command"]) and "/v1/" not in " ".join(c["command"])


def test_openai_args_are_the_cli_s_and_let_in_cluster_clients_in(chart, monkeypatch):
    """The rendered command, run through the real `trtqwen openai` (uvicorn.run stubbed: no server), with the env
    the Secret provides: it starts on 0.0.0.0, and a client using the Service name gets in with the key only."""
    import uvicorn
    from starlette.testclient import TestClient
    from typer.testing import CliRunner

    from trtqwen.cli import app

    objs = render(chart, {"openai": {"allowedOrigins": ["https://chat.example.com"], "model": "ensemble"}})
    c = container(one(objs, "Deployment", "-openai"), "openai")
    cmd = c["command"]
    assert cmd[:2] == ["trtqwen", "openai"]
    (env,) = c["env"]
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app_, host, port, **kw: started.append((app_, host, port)))
    monkeypatch.delenv("TRTQWEN_API_KEY", raising=False)
    keyless = CliRunner().invoke(app, cmd[1:])  # without the Secret's env the CLI refuses, as the chart's fail says
    assert keyless.exit_code == 2 and "API key" in keyless.output and started == []
    r = CliRunner().invoke(app, cmd[1:], env={env["name"]: "sk-test"})
    assert r.exit_code == 0, r.output
    ((api, host, port),) = started
    assert (host, port) == ("0.0.0.0", c["ports"][0]["containerPort"])

    svc = one(objs, "Service", "-openai")["metadata"]["name"]
    auth = {"Authorization": "Bearer sk-test"}
    for base in (f"http://{svc}.{NS}.svc:9000", f"http://{svc}:9000", "http://10.1.2.3:9000",
                 "http://localhost:9000"):  # Service FQDN, short name, pod IP, port-forward
        client = TestClient(api, base_url=base)
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/v1/models", headers=auth)
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "qwen2.5"
    client = TestClient(api, base_url=f"http://{svc}:9000")
    assert client.get("/v1/models", headers={**auth, "Origin": "https://chat.example.com"}).status_code == 200
    assert client.get("/v1/models", headers={**auth, "Origin": "https://evil.example"}).status_code == 403

    # a restricted allowedHosts list: the names listed get in, any other Host is refused
    started.clear()
    listed = f"{svc}.{NS}.svc"
    cmd = container(one(render(chart, {"openai": {"allowedHosts": [listed]}}), "Deployment", "-openai"),
                    "openai")["command"]
    assert CliRunner().invoke(app, cmd[1:], env={env["name"]: "sk-test"}).exit_code == 0
    api = started[-1][0]
    assert TestClient(api, base_url=f"http://{listed}:9000").get("/v1/models", headers=auth).status_code == 200
    assert TestClient(api, base_url="http://rebound.example:9000").get("/v1/models", headers=auth).status_code == 403


def test_openai_options_exist_in_the_cli(chart):
    """Every option the chart can render is one `trtqwen openai` declares, and the key's env var is the CLI's."""
    import typer.main

    from trtqwen.cli import app

    cmd = typer.main.get_command(app).commands["openai"]
    opts = {o for p in cmd.params for o in p.opts}
    (api_key,) = [p for p in cmd.params if p.name == "api_key"]
    everything = {"openai": {"model": "tensorrt_llm_bls", "tokenizer": "/tok", "allowedOrigins": ["*"],
                             "allowedHosts": ["a", "b"]}}
    c = container(one(render(chart, everything), "Deployment", "-openai"), "openai")
    rendered = {a for a in c["command"][2:] if a.startswith("--")}
    assert rendered == {"--url", "--host", "--port", "--served-model-name", "--model", "--tokenizer",
                        "--allowed-host", "--allowed-origin"} and rendered <= opts
    assert api_key.envvar == c["env"][0]["name"] == "TRTQWEN_API_KEY"
    ctx = cmd.make_context("openai", list(c["command"][2:]))  # parses (types included) without running it
    assert ctx.params["allowed_host"] == ["a", "b"] and ctx.params["port"] == 9000
