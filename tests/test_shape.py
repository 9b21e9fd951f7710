"""One TP rule (trtqwen/shape.py), asked by every stage: a shape that cannot be split is refused with the same
words by plan, build, package, verify, serve and the runtime — including a checkpoint edited by hand after it was
built, whose config.json claims a split its shape cannot have."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from trtqwen.build.pipeline import run_build
from trtqwen.build.spec import BuildSpec
from trtqwen.checkpoint import read_checkpoint
from trtqwen.cli import app
from trtqwen.errors import UserError
from trtqwen.precision import PRECISIONS, Precision
from trtqwen.serve.repo import generate_repo
from trtqwen.shape import QWEN25_7B, ModelShape, check_tp, tp_refusal

# The tiny model: 4 query heads, 2 KV heads, hidden 128 (head_dim 32), MLP 384.
TINY = ModelShape(vocab_size=151936, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                  intermediate_size=384, max_position_embeddings=4096)
CASES = {  # (precision, tp): what must be said, besides being the same everywhere
    (Precision.INT8_SQ, 4): ["TP 4", "2 KV heads", "SmoothQuant cannot duplicate KV heads", "--tp 1 or 2"],
    (Precision.BF16, 3): ["tensor parallel size 3 is not supported", "--tp 1, 2 or 4"],
    (Precision.INT4_AWQ, 2): ["INT4-AWQ at TP 2", "64 input channels per rank", "group size 128", "--tp 1"],
}


def flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def refusal(precision, tp) -> str:
    e = tp_refusal(TINY, tp, precision)
    return flat(f"{e.message} → {e.hint}")


def said(result) -> str:
    """The error `trtqwen` printed, as 'message → hint'."""
    assert result.exit_code == 2, result.output
    return flat(result.output.replace("error:", "", 1))


@pytest.mark.parametrize("precision,tp", CASES)
def test_the_rule_itself(precision, tp):
    text = refusal(precision, tp)
    assert all(needle in text for needle in CASES[precision, tp]), text
    for t in (1, 2, 4):  # Qwen2.5-7B (28 query / 4 KV heads) splits every supported way in every precision
        for p in Precision:
            check_tp(QWEN25_7B, t, p)
    with pytest.raises(UserError) as e:
        TINY.shard(tp, precision)  # the runtime's split asks the same rule
    assert flat(f"{e.value.message} → {e.value.hint}") == text


def test_awq_groups_must_divide_every_ranks_inputs():
    from dataclasses import replace

    for tp in (1, 2, 4):  # Qwen2.5-7B: 3584 / 4 = 7 × 128, 18944 / 4 = 37 × 128
        check_tp(QWEN25_7B, tp, Precision.INT4_AWQ)
    check_tp(TINY, 1, Precision.INT4_AWQ)
    odd_hidden = replace(TINY, hidden_size=384, num_kv_heads=4, head_dim=128, intermediate_size=1536)
    with pytest.raises(UserError, match="column-parallel.*192 input channels"):  # ModelOpt checks hidden / TP there too
        check_tp(odd_hidden, 2, Precision.INT4_AWQ)
    assert "an AWQ group size of 64" in refusal(Precision.INT4_AWQ, 2)  # 64 inputs per rank fit groups of 64
    check_tp(TINY, 2, Precision.INT4_AWQ, awq_group=64)
    with pytest.raises(UserError, match="group size 32 is not supported"):
        check_tp(TINY, 1, Precision.INT4_AWQ, awq_group=32)


def test_kv_heads_fewer_than_ranks_are_copied_except_for_smoothquant():
    for precision in (Precision.BF16, Precision.FP8, Precision.INT4_WO):  # ModelOpt duplicates KV heads
        check_tp(TINY, 4, precision)
        assert TINY.shard(4, precision).num_kv_heads == 1
    assert "--tp 1 or 2" in refusal(Precision.INT8_SQ, 4)


@pytest.fixture(scope="module")
def good_build(tiny_dir, module_tmp):
    """A bf16 TP 1 build of the tiny model, and a repository packaged from it while it was still good."""
    root = module_tmp("rule")
    run_build(BuildSpec.request(str(tiny_dir), precision="bf16"), out=root / "build", until="checkpoint")
    return root / "build", generate_repo(root / "build", root / "repo", runtime="torch")


def hand_edit(build, precision, tp, dst):
    """The build's checkpoint with config.json (and rank files) claiming `precision` at `tp` ranks."""
    shutil.copytree(build, dst)
    cfg_path = dst / "checkpoint" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mapping"].update(world_size=tp, tp_size=tp)
    cfg["quantization"].update(quant_algo=PRECISIONS[precision].quant_algo, group_size=128)
    cfg_path.write_text(json.dumps(cfg))
    for r in range(1, tp):
        shutil.copy(dst / "checkpoint" / "rank0.safetensors", dst / "checkpoint" / f"rank{r}.safetensors")
    return dst


@pytest.mark.parametrize("precision,tp", CASES)
def test_every_entry_point_refuses_with_the_same_words(precision, tp, tiny_dir, good_build, tmp_path, monkeypatch):
    from trtqwen.runtime import load_model

    want = refusal(precision, tp)
    cli = CliRunner()
    p, t = ["--precision", precision.value], ["--tp", str(tp)]
    seen = {
        "plan": said(cli.invoke(app, ["plan", "--model", str(tiny_dir), *p, *t])),
        "build": said(cli.invoke(app, ["build", "--model", str(tiny_dir), *p, *t, "--out", str(tmp_path / "b")])),
    }
    assert not (tmp_path / "b").exists()  # refused before anything was written
    build, repo = good_build
    edited = hand_edit(build, precision, tp, tmp_path / "edited")
    seen["package"] = said(cli.invoke(app, ["package", str(edited), "--out", str(tmp_path / "repo")]))
    seen["verify"] = said(cli.invoke(app, ["verify", str(edited / "checkpoint")]))
    with pytest.raises(UserError) as e:
        load_model(edited / "checkpoint", device="cpu")
    seen["runtime"] = flat(f"{e.value.message} → {e.value.hint}")
    # serve: the repository packaged from the good checkpoint, whose checkpoint was then edited in place
    served_repo = tmp_path / "served"
    shutil.copytree(repo, served_repo)
    record = json.loads((served_repo / "trtqwen_repo.json").read_text())
    record["settings"]["model_dir"] = str(edited / "checkpoint")
    (served_repo / "trtqwen_repo.json").write_text(json.dumps(record))
    monkeypatch.setattr("trtqwen.serve.server.start", lambda *a, **k: pytest.fail("a server was started"))
    seen["serve"] = said(cli.invoke(app, ["serve", str(served_repo), "--background"]))
    for stage, text in seen.items():
        assert want in text, f"{stage} said: {text}"
    assert not (tmp_path / "repo").exists()
    assert read_checkpoint(build / "checkpoint").tp == 1  # the good build is untouched
