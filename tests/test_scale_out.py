"""Replicas: the two layouts `package --replicas` writes, and three real tritonservers behind a real nginx (CPU, the
tiny model) taking 200 streams, losing one replica mid-run and taking it back; a replica that hangs while it says
it is ready is found, killed and started again."""

import json
import os
import re
import signal
import threading
import time
import urllib.request

import pytest
from conftest import free_ports

from trtqwen.serve.process import http_status
from trtqwen.clients.client import GenerationParams, TritonLLMClient
from trtqwen.errors import UserError
from trtqwen.serve import fleet, server, supervisor
from trtqwen.serve.balancer import Upstream, find_nginx, nginx_conf
from trtqwen.serve.repo import generate_repo, read_record
from trtqwen.serve.repo.settings import gpu_groups


# --- layouts (no server) ---------------------------------------------------------------------------------------------
def test_gpu_groups_from_the_gpu_list():
    assert gpu_groups(4, 1) == ((0,), (1,), (2,), (3,))
    assert gpu_groups(2, 2, "2,3,0,1") == ((2, 3), (0, 1))
    assert gpu_groups(2, 1, "0,0") == ((0,), (0,))  # two copies on one GPU: allowed, the user asked for it
    with pytest.raises(UserError, match="need 4 GPU ids") as e:
        gpu_groups(2, 2, "0,1")
    assert "--gpus" in e.value.hint
    with pytest.raises(UserError, match="2 different GPUs"):
        gpu_groups(1, 2, "1,1")
    with pytest.raises(UserError, match="not a list of GPU ids"):
        gpu_groups(2, 1, "0;1")
    with pytest.raises(UserError, match="at least 1"):
        gpu_groups(0, 1)


@pytest.fixture(scope="module")
def bf16_build(tiny_dir, module_tmp):
    from trtqwen.build.pipeline import run_build
    from trtqwen.build.spec import BuildSpec

    out = module_tmp("scale") / "build"
    run_build(BuildSpec.request(str(tiny_dir), precision="bf16"), out=out, until="checkpoint")
    return out


def tensorrt_llm_config(repo):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    return text_format.Parse((repo / "tensorrt_llm" / "config.pbtxt").read_text(), mc.ModelConfig())


def test_instances_layout_puts_one_instance_per_gpu_group_in_one_server(bf16_build, tmp_path):
    repo = generate_repo(bf16_build, tmp_path / "repo", replicas=2, gpus="0,0", layout="instances")
    cfg = tensorrt_llm_config(repo)
    assert cfg.instance_group[0].count == 2 and cfg.parameters["gpu_device_ids"].string_value == "0;0"
    assert read_record(repo)["serve"]["servers"] == [{"gpus": [0]}]  # one tritonserver


def test_servers_layout_is_one_server_per_replica_each_seeing_its_own_gpu(bf16_build, tmp_path):
    repo = generate_repo(bf16_build, tmp_path / "repo", replicas=3, gpus="1,2,3", layout="servers")
    cfg = tensorrt_llm_config(repo)
    assert cfg.instance_group[0].count == 1 and cfg.parameters["gpu_device_ids"].string_value == "0"
    assert read_record(repo)["serve"]["servers"] == [{"gpus": [1]}, {"gpus": [2]}, {"gpus": [3]}]
    with pytest.raises(UserError, match="unknown layout"):
        generate_repo(bf16_build, tmp_path / "r2", replicas=2, layout="pods")


def test_nginx_takes_the_configuration_and_marks_down_who_is_not_ready(tmp_path):
    ups = [Upstream("127.0.0.1", 9100, 9101, True), Upstream("127.0.0.1", 9103, 9104, False)]
    conf = nginx_conf(tmp_path, "127.0.0.1", 9000, 9001, ups)
    assert "server 127.0.0.1:9101 max_fails=1 fail_timeout=2s;" in conf
    assert "server 127.0.0.1:9104 max_fails=1 fail_timeout=2s down;" in conf
    assert conf.count("least_conn;") == 2 and "grpc_pass grpc://triton_grpc;" in conf and "proxy_buffering off;" in conf
    import subprocess

    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "tmp" / d).mkdir(parents=True)
    (tmp_path / "nginx.conf").write_text(conf)
    check = subprocess.run([find_nginx(), "-t", "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "e.log")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr  # the real nginx accepts it


# --- three tritonservers behind nginx --------------------------------------------------------------------------------
def serving_fleet(build, where, n: int, **kw):
    """n replicas of build behind nginx for the test's duration; afterwards nothing of them is left."""
    repo = generate_repo(build, where / "repo", replicas=n, layout="servers")
    ports = free_ports(2 + 3 * n)
    state = fleet.start(repo, read_record(repo)["serve"], "127.0.0.1", ports[0], ports[1],
                        [tuple(ports[2 + 3 * i:5 + 3 * i]) for i in range(n)], timeout=240, **kw)
    try:
        yield repo, state
    finally:
        server.stop(repo)
        assert fleet.running_fleet(repo) is None and all(server.port_free("127.0.0.1", p) for p in ports)


@pytest.fixture(scope="module")
def three(bf16_build, module_tmp):
    yield from serving_fleet(bf16_build, module_tmp("fleet"), 3)


def replica(repo, name: str) -> dict:
    return next(r for r in fleet.running_fleet(repo)["replicas"] if r["name"] == name)


def wait_all_up(repo, replaced: dict, timeout: float = 180) -> None:
    """Until the replica `replaced` names runs as a new process and every replica is back in rotation."""
    deadline = time.time() + timeout
    while not (all(r["up"] for r in fleet.running_fleet(repo)["replicas"])
               and replica(repo, replaced["name"])["pid"] != replaced["pid"]):
        assert time.time() < deadline, (repo / "fleet.log").read_text()
        time.sleep(0.5)


def served(replica: dict) -> int:
    """Requests the replica's ensemble has answered, from its own Prometheus metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{replica['metrics_port']}/metrics", timeout=5) as r:
        m = re.search(r'nv_inference_request_success\{model="ensemble",version="1"\} (\d+)', r.read().decode())
    return int(m.group(1))


def run_streams(url: str, n: int, tokens: int, started: threading.Barrier | None = None) -> list:
    """n concurrent streams through the front; each ends as ("ok", tokens) or ("error", message)."""
    out: list = [None] * n
    client = TritonLLMClient(url)  # checked once; each stream opens its own connection

    def user(i):
        got = 0
        try:
            for _, timing in client.stream("Tell me a story.", GenerationParams(
                    max_tokens=tokens, min_tokens=tokens, stop_words=[])):
                if got == 0 and started is not None:
                    started.wait(60)
                got = timing.output_tokens
            out[i] = ("ok", got)
        except UserError as e:
            out[i] = ("error", e.message)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    return out


def test_200_streams_spread_over_three_replicas_one_killed_and_taken_back(three):
    repo, state = three
    url = f"127.0.0.1:{state['grpc_port']}"
    replicas = state["replicas"]

    before = [served(r) for r in replicas]
    results = run_streams(url, 200, 12)
    assert results == [("ok", 12)] * 200  # nothing lost
    shares = [served(r) - b for r, b in zip(replicas, before)]
    assert sum(shares) == 200 and min(shares) >= 20, shares  # least-conn spread them over all three

    # one replica dies with streams in flight: those fail clearly, the rest finish, nothing hangs
    started = threading.Barrier(61)
    box = {}
    th = threading.Thread(target=lambda: box.update(r=run_streams(url, 60, 300, started)))
    th.start()
    started.wait(120)  # every stream has its first token
    victim = replica(repo, "r1")
    os.killpg(victim["pid"], signal.SIGKILL)
    th.join(300)
    failed = [m for kind, m in box["r"] if kind == "error"]
    assert 0 < len(failed) < 60 and all(k == "ok" and n == 300 for k, n in box["r"] if k == "ok")
    assert all("went away in the middle of this answer" in m for m in failed), failed[:3]

    # taken out of rotation; new requests go to the others
    assert "r1: not ready: out of rotation" in (repo / "fleet.log").read_text()
    assert run_streams(url, 30, 8) == [("ok", 8)] * 30

    # the manager starts it again and nginx takes it back
    wait_all_up(repo, victim)
    r1 = replica(repo, "r1")
    first = served(r1)
    assert run_streams(url, 30, 8) == [("ok", 8)] * 30
    assert served(r1) > first, "the restarted replica got none of the new requests"
    log = (repo / "fleet.log").read_text()
    assert "r1: tritonserver is gone; starting it again" in log and "r1: ready: back in rotation" in log


def test_http_streaming_passes_through_nginx(three):
    _, state = three
    req = urllib.request.Request(f"http://127.0.0.1:{state['http_port']}/v2/models/ensemble/generate_stream",
                                 data=json.dumps({"text_input": "Hello", "max_tokens": 6, "min_tokens": 6, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.read().decode().splitlines() if line.startswith("data:")]
    assert len(events) >= 2 and all("text_output" in e for e in events)  # SSE events, one per token, unbuffered


@pytest.fixture
def two_quick(bf16_build, tmp_path):  # its own fleet: a 4 s hang timeout would misjudge the loaded one above
    yield from serving_fleet(bf16_build, tmp_path, 2, hang_timeout=4)


def test_a_replica_that_hangs_while_it_says_ready_is_killed_and_started_again(two_quick):
    repo, state = two_quick
    victim = replica(repo, "r1")
    stuck = supervisor.stubs(repo, victim["pid"])["tensorrt_llm"]
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)  # the model process freezes; tritonserver itself is fine
    assert http_status(f"http://127.0.0.1:{victim['http_port']}/v2/health/ready") == 200  # Triton cannot tell

    deadline = time.time() + 60
    while "r1: hung" not in (repo / "fleet.log").read_text():
        assert time.time() < deadline, (repo / "fleet.log").read_text()
        time.sleep(0.5)
    assert "r0: hung" not in (repo / "fleet.log").read_text()
    wait_all_up(repo, victim)
    assert not any(supervisor.alive(pid) for pid in stuck)  # killed with its server, not left frozen
    url = f"127.0.0.1:{replica(repo, 'r1')['grpc_port']}"  # the new r1 answers, straight and through nginx
    assert TritonLLMClient(url).generate("Hi", GenerationParams(max_tokens=3, min_tokens=3)).timing.output_tokens == 3
    assert run_streams(f"127.0.0.1:{state['grpc_port']}", 10, 4) == [("ok", 4)] * 10


def test_a_killed_manager_leaves_the_fleet_serving_and_serve_stop_ends_all_of_it(two_quick):
    repo, state = two_quick
    os.kill(state["pid"], signal.SIGKILL)
    time.sleep(1)
    assert fleet.running_fleet(repo) is None
    assert run_streams(f"127.0.0.1:{state['grpc_port']}", 6, 4) == [("ok", 4)] * 6  # no outage: nginx and replicas go on
    record = fleet.fleet_record(repo)
    with pytest.raises(UserError, match="already served"):  # a second fleet would collide with the orphans
        server.start(repo, [], "127.0.0.1", *free_ports(3))

    assert server.stop(repo)["pid"] == state["pid"]
    assert not fleet.serving(repo) and fleet.fleet_record(repo) is None
    pids = [r["pid"] for r in record["replicas"]] + [record["nginx_pid"]["pid"]]
    assert not any(supervisor.alive(pid) for pid in pids)
    ports = [state["http_port"], state["grpc_port"]] + [p for r in record["replicas"]
                                                        for p in (r["http_port"], r["grpc_port"], r["metrics_port"])]
    assert all(server.port_free("127.0.0.1", p) for p in ports)


# --- which layout for the box (plan --gpus) --------------------------------------------------------------------------
def box(gpus, precision="int4_awq", gpu="rtx4090d", latency=False, **custom):
    from trtqwen.build import box_plan
    from trtqwen.build.plan import shape_and_gpu
    from trtqwen.build.spec import BuildSpec

    shape, profile = shape_and_gpu(None, gpu, **custom)
    spec = BuildSpec(model="Qwen/Qwen2.5-7B-Instruct", precision=precision, tp=1, gpu=gpu, max_seq_len=4096,
                     max_batch_size=32, max_input_len=2048, max_num_tokens=8192)
    layouts = box_plan.box_layouts(shape, profile, spec, gpus)
    return layouts, box_plan.recommend(layouts, latency), box_plan.commands(box_plan.recommend(layouts, latency) or
                                                                            layouts[0], gpus, spec)


def test_plan_recommends_one_replica_per_card_when_the_model_fits_one():
    layouts, best, cmds = box(4)
    assert [(lay.replicas, lay.tp) for lay in layouts] == [(4, 1), (2, 2), (1, 4)]
    assert (best.replicas, best.tp) == (4, 1)
    assert best.total_tok_s > 2 * max(lay.total_tok_s for lay in layouts if lay.tp > 1)  # no all-reduce over PCIe
    assert "--tp 1" in cmds[0] and "--replicas 4 --gpus 0,1,2,3 --layout servers" in cmds[1]
    one, _, one_cmds = box(1)
    assert best.total_tok_s == pytest.approx(4 * one[0].total_tok_s) and "--replicas" not in one_cmds[1]
    _, fastest, _ = box(4, latency=True)  # single-stream latency: TP wins that
    assert fastest.tp == 4 and fastest.single_stream_tok_s > best.single_stream_tok_s


def test_plan_takes_tp_only_when_one_card_cannot_hold_the_model():
    layouts, best, cmds = box(2, precision="bf16", gpu="custom", memory_gib=12, bandwidth_gbs=900, tflops=150)
    assert not layouts[0].fits and "exceed" in layouts[0].why_not  # 15 GB of bf16 weights on a 12 GiB card
    assert (best.replicas, best.tp) == (1, 2) and "--tp 2" in cmds[0] and "--replicas" not in cmds[1]


def test_plan_cli_prints_the_box_as_json():
    from typer.testing import CliRunner

    from trtqwen.cli import app

    r = CliRunner().invoke(app, ["plan", "--precision", "int4", "--gpus", "2", "--target", "engine", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["plan"]["tp"] == 1 and out["box"]["recommended"]["replicas"] == 2
    assert out["box"]["recommended"]["commands"][1].endswith("--replicas 2 --gpus 0,1 --layout servers")


def test_nginx_front_refuses_browsers_and_the_admin_apis(three):
    """CSRF and DNS rebinding through the balancer: any Origin, a foreign Host and the admin APIs answer 403 at
    nginx (each replica would refuse the admin APIs without its key too); plain inference still passes."""
    _, state = three
    base = f"http://127.0.0.1:{state['http_port']}"
    load = base + "/v2/repository/models/evil/load"
    assert http_status(load, data=b"{}", headers={"Content-Type": "text/plain", "Origin": "http://evil.example"}) == 403
    assert http_status(load, data=b"{}", headers={"Content-Type": "application/json"}) == 403
    assert http_status(base + "/v2/models/stats") == 403
    assert http_status(base + "/v2/health/ready", headers={"Host": "evil.example"}) == 403
    assert http_status(base + "/v2/health/ready") == 200
    body = json.dumps({"text_input": "Hi", "max_tokens": 2}).encode()
    assert http_status(base + "/v2/models/tensorrt_llm_bls/generate", data=body,
                       headers={"Origin": "http://evil.example"}) == 403
