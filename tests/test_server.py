"""tritonserver launching: the mpirun layout for TP ranks, refusals, and the log shown when a server fails."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import free_ports

from trtqwen.serve import server
from trtqwen.errors import UserError

INSTALL = server.TritonInstall("system", Path("/opt/tritonserver"))


def test_single_process_binds_localhost():
    cmd = server.server_command(INSTALL, Path("/r"), "127.0.0.1", 8000, 8001, 8002)
    assert cmd[0] == "/opt/tritonserver/bin/tritonserver"
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"} <= set(cmd)


def test_tp_ranks_under_mpirun_like_the_backend_launcher():
    cmd = server.server_command(INSTALL, Path("/r"), "127.0.0.1", 8000, 8001, 8002, world_size=2)
    assert cmd[:2] == ["mpirun", "--allow-run-as-root"] and cmd.count("-n") == 2 and cmd.count(":") == 1
    rank0, rank1 = " ".join(cmd).split(" : ")
    assert "shm-region-prefix-name=prefix0_" in rank0 and "shm-region-prefix-name=prefix1_" in rank1
    assert "--load-model=tensorrt_llm" in rank1 and "--model-control-mode=explicit" in rank1
    assert "--load-model" not in rank0  # rank 0 serves every model


def test_one_process_loads_every_model_under_explicit_control():
    """Explicit model control lets the supervisor load a model again when its stub dies."""
    cmd = server.server_command(INSTALL, Path("/r"), "127.0.0.1", 8000, 8001, 8002)
    assert "--model-control-mode=explicit" in cmd and "--load-model=*" in cmd


def test_admin_apis_are_restricted_with_the_flags_the_bundled_tritonserver_knows():
    """Every process of the command (TP ranks too) restricts the admin APIs to the key; the flag names and the API
    names are those `tritonserver --help` lists (the real 2.51 binary of the nvidia-pytriton wheel)."""
    from trtqwen.serve import admin

    for world in (1, 2):
        cmd = server.server_command(INSTALL, Path("/r"), "127.0.0.1", 8000, 8001, 8002, world_size=world, key="K")
        apis = ",".join(admin.RESTRICTED)
        assert cmd.count(f"--http-restricted-api={apis}:{admin.HEADER}=K") == world
        assert cmd.count(f"--grpc-restricted-protocol={apis}:{admin.HEADER}=K") == world
    install = server.find_tritonserver()
    run = subprocess.run([str(install.binary), "--help"], capture_output=True, text=True,
                         env={**os.environ, **install.env})
    help_text = run.stdout + run.stderr  # the usage goes to stderr
    assert "--http-restricted-api" in help_text and "--grpc-restricted-protocol" in help_text
    allowed = help_text.split("Allowed APIs:")[1].split("\n\n")[0]
    assert all(api in allowed for api in admin.RESTRICTED), allowed
    assert admin.redact(cmd, "K") == [c.replace("K", "<admin key>") for c in cmd]


def test_a_bind_beyond_this_machine_warns_and_needs_a_key_for_the_openai_api():
    assert server.exposure_warnings("127.0.0.1", 9000, None) == []
    assert "no authentication" in server.exposure_warnings("0.0.0.0", None, None)[0]
    with pytest.raises(UserError, match="--api-key"):
        server.exposure_warnings("0.0.0.0", 9000, None)
    assert server.exposure_warnings("0.0.0.0", 9000, "k")


def test_port_in_use_is_refused(tmp_path):
    (tmp_path / "repo").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is already in use"):
            server.start(tmp_path / "repo", [], http_port=port, grpc_port=port + 1, metrics_port=port + 2)


def test_missing_repository_is_refused(tmp_path):
    with pytest.raises(UserError, match="no model repository"):
        server.start(tmp_path / "nope", [])


@pytest.mark.slow
def test_a_failing_model_shows_the_log_and_leaves_no_server(tmp_path):
    ports = free_ports(3)
    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
                                        'input [{ name: "x" data_type: TYPE_STRING dims: [1] }]\n'
                                        'output [{ name: "y" data_type: TYPE_STRING dims: [1] }]\n')
    (model / "1" / "model.py").write_text("raise RuntimeError('this model is broken on purpose')\n")
    with pytest.raises(UserError) as e:
        server.start(tmp_path / "repo", ["broken"], "127.0.0.1", *ports, timeout=120)
    assert "broken on purpose" in str(e.value)
    assert server.port_free("127.0.0.1", ports[0]) and not (tmp_path / "repo" / server.STATE_FILE).exists()


def test_cli_print_command_and_stop(served_tiny):
    from typer.testing import CliRunner

    from trtqwen.cli import app

    repo = served_tiny[2]
    r = CliRunner().invoke(app, ["serve", str(repo), "--print-command", "--http-port", "9100"])
    assert r.exit_code == 0 and "tritonserver" in r.output and "--http-port=9100" in r.output
    assert "trtqwen-admin-key=$TRTQWEN_ADMIN_KEY" in r.output
    r = CliRunner().invoke(app, ["serve", str(repo.parent / "not-a-repo")])
    assert r.exit_code == 2 and "trtqwen package" in r.output


def test_a_stale_record_never_signals_the_process_that_now_has_its_pid(tmp_path):
    """The state file names a pid that is now another process (here: a sleep in its own session): left alone."""
    repo = tmp_path / "repo"
    repo.mkdir()
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (repo / server.STATE_FILE).write_text(json.dumps({"pid": other.pid, "started": 1, "http_port": 1,
                                                          "grpc_port": 2}))
        assert server.stop(repo) is None and other.poll() is None  # not ours: not signalled
        assert not (repo / server.STATE_FILE).exists()  # and the stale record is gone
    finally:
        other.kill()


def test_a_second_server_on_a_served_repository_is_refused(served_tiny):
    repo = served_tiny[2]
    before = (repo / "tritonserver.log").stat().st_size
    with pytest.raises(UserError, match="already served by tritonserver pid"):
        server.start(repo, [], "127.0.0.1", *free_ports(3))
    assert (repo / "tritonserver.log").stat().st_size >= before  # the running server's log was not truncated
