"""The smoke suite as pytest: against `--url` when given (content judged with --content), else a local tiny server.

    pytest tests/test_smoke.py --url 127.0.0.1:8001 --content     # a real deployment, e.g. on the 4090D box
"""

import pytest
from typer.testing import CliRunner

from trtqwen.cli import app
from trtqwen.errors import UserError
from trtqwen.clients.smoke import run_smoke

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target(request):
    url = request.config.getoption("--url")
    if url:
        return url, request.config.getoption("--model"), request.config.getoption("--content")
    return request.getfixturevalue("served_tiny")[0], "ensemble", False


@pytest.fixture(scope="module")
def checks(target):
    return {c.name: c for c in run_smoke(*target)}


@pytest.mark.parametrize("name", ["server and model ready", "one answer", "streaming", "stop words",
                                  "max_tokens honoured", "5 concurrent users", "bad requests"])
def test_check(checks, name):
    assert checks[name].passed, checks[name].detail


@pytest.mark.parametrize("name", ["English", "Chinese", "Japanese", "JSON output", "arithmetic"])
def test_wording_is_judged_only_when_asked(checks, target, name):
    """With --content each wording check must pass; without (a random model) it is not run rather than reduced to
    "some text came back"."""
    if target[2]:
        assert checks[name].passed, checks[name].detail
    else:
        assert name not in checks


def test_cli_table_and_exit_code(target):
    url, model, content = target
    r = CliRunner().invoke(app, ["smoke", "--url", url, "--model", "tensorrt_llm_bls", "--no-content"])
    assert r.exit_code == 0, r.output
    assert "mechanics only" in r.output and "5 concurrent users" in r.output and "FAIL" not in r.output


def test_unreachable_url_and_wrong_model(target):
    with pytest.raises(UserError, match="cannot reach"):
        run_smoke("127.0.0.1:1")
    r = CliRunner().invoke(app, ["smoke", "--url", target[0], "--model", "nope"])
    assert r.exit_code == 2 and "not served" in r.output
