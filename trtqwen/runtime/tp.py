"""Tensor parallelism as TensorRT-LLM runs it: one process per rank, each holding only its rank{i}.safetensors.

Rank 0 lives in the caller's process and hands LLMEngine a `TPModel`, which looks like a Qwen2Model. Before
every forward it broadcasts a small command (op and arguments: tokens, positions, slots, the graph bucket's
inputs) over a CPU gloo group; then every rank runs the same forward on its shard, the collectives inside it
(all-reduce after the row-parallel o/down projections and the vocabulary-parallel embedding, all-gather of the
vocabulary-parallel logits) run over NCCL on GPUs, gloo on CPUs. Sampling stays on rank 0: the tokens it picks
reach the other ranks in the next command. Workers are `python -m trtqwen.runtime.tp` processes; a worker that
dies makes rank 0 raise TPError (watchdog + collective timeouts), never hang.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import importlib
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from trtqwen.errors import UserError
from trtqwen.runtime.cuda_graphs import GraphedDecode
from trtqwen.runtime.config import ModelConfig
from trtqwen.runtime.model import KVCache, Qwen2Model

INIT_TIMEOUT_S = 300  # loading a 7B shard and joining the group
COLLECTIVE_TIMEOUT_S = 600  # a first forward on GPU compiles for minutes; a dead peer is caught by the watchdog
IDLE_FOREVER = datetime.timedelta(days=365)  # workers wait this long for the next command (rank 0 may be idle)
STOP_TIMEOUT_S = 10


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


class TPError(RuntimeError):
    """A rank died or a collective failed: the TP model cannot serve any more."""


class RankModel(Qwen2Model):
    """One rank's shard: all-reduce after the row-parallel layers, vocabulary-parallel embedding and lm_head."""

    def bind(self, group, vocab_size: int) -> "RankModel":
        self.group, self.vocab_size = group, vocab_size
        self.tp_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.reduce = self._all_reduce
        self.vocab_start = self.rank * self.embed.shape[0]
        self.parallel_embed = self.embed.shape[0] < vocab_size  # else every rank holds the whole table
        return self

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.parallel_embed:
            return self.embed[tokens]
        local = tokens - self.vocab_start
        inside = (local >= 0) & (local < self.embed.shape[0])
        x = self.embed[local.clamp(0, self.embed.shape[0] - 1)] * inside.unsqueeze(-1).to(self.embed.dtype)
        return self._all_reduce(x)  # each token's row comes from the one rank that holds it

    def head(self, x: torch.Tensor) -> torch.Tensor:
        local = self.lm_head(x).contiguous()  # [..., V/tp]
        parts = torch.empty((self.tp_size * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
        _all_gather(parts, local, group=self.group)  # the ranks' logits one after another along dim 0
        full = torch.cat(parts.chunk(self.tp_size), dim=-1)
        return full[..., : self.vocab_size]  # TensorRT-LLM pads the vocabulary to a multiple of TP


@dataclass(frozen=True)
class CheckpointShards:
    """Rank i's weights: rank{i}.safetensors of a TensorRT-LLM checkpoint, and nothing else of it."""

    path: str

    def config(self) -> ModelConfig:
        from trtqwen.runtime.loader import _rank_files, _trtllm_config

        raw, cfg = _trtllm_config(Path(self.path))
        _rank_files(Path(self.path), raw)
        return cfg

    def load(self, rank: int, device: str, dtype: torch.dtype, max_positions: int | None) -> RankModel:
        from trtqwen.runtime.loader import load_rank

        return load_rank(Path(self.path), rank, max_positions, cls=RankModel)


@dataclass(frozen=True)
class RandomShards:
    """Rank i's shard of a random model (random_model.PRESETS), made on its device: benchmarks without a checkpoint."""

    preset: str
    tp: int

    def config(self) -> ModelConfig:
        from dataclasses import replace

        from trtqwen.runtime.random_model import PRESETS

        return replace(PRESETS[self.preset], tp_size=self.tp)

    def load(self, rank: int, device: str, dtype: torch.dtype, max_positions: int | None) -> RankModel:
        from trtqwen.runtime.random_model import random_model

        return random_model(self.config(), device=device, dtype=dtype, max_positions=max_positions or 4096, tp=self.tp,
                            rank=rank, cls=RankModel)


SOURCES = {"checkpoint": CheckpointShards, "random": RandomShards}


def _source_arg(source) -> str:
    kind = next(k for k, c in SOURCES.items() if isinstance(source, c))
    return json.dumps({"kind": kind, **asdict(source)})


def _source_from_arg(arg: str):
    d = json.loads(arg)
    return SOURCES[d.pop("kind")](**d)


class Rank:
    """What every rank does with a command; rank 0 runs it right after broadcasting it."""

    def __init__(self, model: RankModel):
        self.model = model
        self.cache: KVCache | None = None
        self.graphs: GraphedDecode | None = None

    def run(self, cmd: dict):
        op, m = cmd["op"], self.model
        dev = m.device
        if op == "new_cache":
            self.graphs, self.cache = None, None  # the old engine's memory goes before the new cache comes
            self.cache = m.new_cache(cmd["slots"], cmd["max_seq_len"])
            return self.cache
        if op == "graphs":
            self.graphs = GraphedDecode(m, self.cache, cmd["max_batch"], cmd["max_seq_len"])
            return self.graphs
        if op == "capture":
            return self.graphs.capture_all()
        if op == "graph_step":
            return self.graphs(torch.as_tensor(cmd["tokens"]), torch.as_tensor(cmd["positions"]))
        if op == "prefill":
            return m.prefill(torch.tensor(cmd["tokens"], device=dev), self.cache, cmd["slot"], cmd["start"],
                             cmd["all_logits"])
        if op == "prefill_fresh":
            return m.prefill_fresh([torch.tensor(p, device=dev) for p in cmd["prompts"]], self.cache, cmd["slots"])
        if op == "decode":
            return m.decode(torch.tensor(cmd["tokens"], device=dev), torch.tensor(cmd["positions"], device=dev),
                            self.cache, cmd["kv_len"])
        if op == "compile":
            return m.compile()
        if op == "call":  # a function run on every rank's shard at once (benchmarks: bench/tp_gpu.py)
            module, name = cmd["fn"].split(":")
            return getattr(importlib.import_module(module), name)(m, **cmd.get("kwargs", {}))
        raise ValueError(f"unknown TP command {op!r}")


# --- the command channel: one fixed-size broadcast per decode step, pickled objects for the rest --------------
STEP_ROWS = 512  # the largest decode batch one fixed-size step command carries
OBJECT, STEP = 0, 1


def send_command(cmd: dict, group) -> None:
    """Rank 0: a decode step goes as one int64 tensor [STEP, n, tokens, positions]; anything else is pickled."""
    header = torch.zeros(2 + 2 * STEP_ROWS, dtype=torch.long)
    n = len(cmd["tokens"]) if cmd["op"] == "graph_step" else STEP_ROWS + 1
    if n <= STEP_ROWS:
        header[:2] = torch.tensor([STEP, n])
        header[2 : 2 + n], header[2 + n : 2 + 2 * n] = cmd["tokens"], cmd["positions"]
        dist.broadcast(header, src=0, group=group)
        return
    dist.broadcast(header, src=0, group=group)  # header[0] == OBJECT
    dist.broadcast_object_list([cmd], src=0, group=group)


def receive_command(group) -> dict:
    header = torch.empty(2 + 2 * STEP_ROWS, dtype=torch.long)
    dist.broadcast(header, src=0, group=group)  # fails when rank 0 is gone: the worker then ends
    if header[0] == STEP:
        n = int(header[1])
        return {"op": "graph_step", "tokens": header[2 : 2 + n], "positions": header[2 + n : 2 + 2 * n]}
    box = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


# --- rank 0: the proxy LLMEngine drives ---------------------------------------------------------------------------
class TPModel:
    """Rank 0's stand-in for a Qwen2Model: each call is broadcast to the workers, then run on rank 0's shard."""

    def __init__(self, source: CheckpointShards | RandomShards, device: str = "cpu", gpu_ids: list[int] | None = None,
                 dtype: torch.dtype | None = None, max_positions: int | None = None, int4_kernels: bool | None = None):
        self.cfg = source.config()  # the full model's: LLMEngine checks token ids against its vocabulary
        self.tp = self.cfg.tp_size
        self.cfg.shard(self.tp)  # refuse a TP that does not divide the model before starting anything
        self.devices = _devices(device, gpu_ids, self.tp)
        self.procs: list[subprocess.Popen] = []
        self.failure: str | None = None
        self.closed = False
        on_gpu = self.devices[0].startswith("cuda")
        self.threads = torch.get_num_threads()  # given back at close
        if not on_gpu:  # ranks share the cores: oversubscribed threads made TP 2 on 2 cores 3.4x slower (measured)
            torch.set_num_threads(_threads_per_rank(self.tp))
        store = dist.TCPStore("127.0.0.1", 0, self.tp, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
        atexit.register(self.close)
        opts = dict(dtype=str(dtype).removeprefix("torch.") if dtype else "", max_positions=max_positions or "",
                    int4_kernels="" if int4_kernels is None else str(int(int4_kernels)))
        for r in range(1, self.tp):
            cmd = [_python(), "-m", "trtqwen.runtime.tp", _source_arg(source), "--rank", str(r), "--tp", str(self.tp),
                   "--port", str(store.port), "--device", self.devices[r]] + [
                   x for k, v in opts.items() if v != "" for x in (f"--{k.replace('_', '-')}", str(v))]
            self.procs.append(subprocess.Popen(cmd, env=_worker_env(on_gpu, self.tp)))
        try:
            self.rank = Rank(_load_rank(source, 0, self.devices[0], dtype, max_positions, int4_kernels))
            self._wait_loaded(store)
            self.group, self.commands = _join(store, 0, self.tp, self.devices[0])
            self.rank.model.bind(self.group, self.cfg.vocab_size)
        except BaseException:
            self.close()
            raise
        self.local: RankModel = self.rank.model  # rank 0's shard (its cfg has the per-rank dims)
        self.max_positions = self.local.max_positions
        self.watchdog = threading.Thread(target=self._watch, name="trtqwen-tp-watchdog", daemon=True)
        self.watchdog.start()

    # --- what LLMEngine uses --------------------------------------------------------------------------------------
    @property
    def device(self):
        return self.local.device

    @property
    def dtype(self):
        return self.local.dtype

    @property
    def tp_size(self) -> int:
        return self.tp

    def graphed_decode(self, cache: KVCache, max_batch: int, max_seq_len: int) -> "TPGraphedDecode":
        return TPGraphedDecode(self, cache, max_batch, max_seq_len)  # LLMEngine's CUDA graphs, on every rank

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        return self.call("new_cache", slots=num_slots, max_seq_len=max_seq_len)

    def prefill(self, tokens: torch.Tensor, cache: KVCache, slot: int, start: int = 0, all_logits: bool = False):
        self._check(cache)
        return self.call("prefill", tokens=tokens.tolist(), slot=slot, start=start, all_logits=all_logits)

    def prefill_fresh(self, prompts: list[torch.Tensor], cache: KVCache, slots: list[int]) -> torch.Tensor:
        self._check(cache)
        return self.call("prefill_fresh", prompts=[p.tolist() for p in prompts], slots=list(slots))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, kv_len: int | None = None):
        self._check(cache)
        return self.call("decode", tokens=tokens.tolist(), positions=positions.tolist(), kv_len=kv_len)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at every position of one sequence [T, V] (verification), in a cache of its own."""
        cache = self.new_cache(1, tokens.shape[0])
        return self.prefill(tokens, cache, 0, 0, all_logits=True)

    def compile(self) -> "TPModel":
        self.call("compile")
        return self

    def run_on_ranks(self, fn: str, **kwargs):
        """fn ("module:function", importable on every rank) called as fn(rank's RankModel, **kwargs) on all ranks
        at once (it may use collectives); rank 0's result."""
        return self.call("call", fn=fn, kwargs=kwargs)

    # --- the command channel --------------------------------------------------------------------------------------
    def call(self, op: str, **args):
        """Broadcast the command, run it here; a failure anywhere becomes TPError (the model is then dead)."""
        if self.failure or self.closed:
            raise TPError(self.failure or "the tensor-parallel model is closed")
        cmd = {"op": op, **args}
        try:
            send_command(cmd, self.commands)
            return self.rank.run(cmd)
        except Exception as e:  # noqa: BLE001 - a collective failed: find out whether a rank died, then fail
            dead = self._dead_rank(wait=2.0)
            self._fail(f"TP {op} failed" + (f": {dead}" if dead else "") + f" (rank 0: {e!r})")
            raise TPError(self.failure) from e

    def _check(self, cache: KVCache) -> None:
        if cache is not self.rank.cache:
            raise TPError("a tensor-parallel model serves the cache of its latest engine only: "
                          "make a new LLMEngine, or use the latest one")

    def _wait_loaded(self, store) -> None:
        """Until every worker has loaded its shard; a worker that fails or exits raises here, with its reason."""
        deadline = time.monotonic() + INIT_TIMEOUT_S
        while not store.check([f"loaded{r}" for r in range(1, self.tp)]):
            dead = self._dead_rank()
            if dead:
                errors = [store.get(f"error{r}").decode() for r in range(1, self.tp) if store.check([f"error{r}"])]
                raise TPError(dead + (f": {errors[0]}" if errors else ""))
            if time.monotonic() > deadline:
                raise TPError(f"TP workers did not load their shards within {INIT_TIMEOUT_S} s")
            time.sleep(0.05)

    def _dead_rank(self, wait: float = 0.0) -> str | None:
        deadline = time.monotonic() + wait
        while True:
            for r, p in enumerate(self.procs, 1):
                if p.poll() is not None:
                    return f"TP rank {r} (pid {p.pid}) exited with code {p.returncode}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _watch(self) -> None:
        """A worker that exits while rank 0 waits in a collective: record it and abort the group to wake rank 0."""
        while not self.closed and not self.failure:
            dead = self._dead_rank()
            if dead:
                self._fail(dead)
                if self.devices[0].startswith("cuda"):  # NCCL would wait for the dead peer until its timeout
                    try:
                        dist.distributed_c10d._abort_process_group(self.group)
                    except Exception:  # noqa: BLE001 - best effort: the collective timeout still ends the wait
                        pass
                return
            time.sleep(0.1)

    def _fail(self, message: str) -> None:
        if not self.failure:
            self.failure = message
            print(f"[trtqwen] tensor parallel: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """`shutdown` to the workers, wait a while, kill what is left (exiting ranks can hang: FACTS §3)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        torch.set_num_threads(self.threads)
        if not self.failure and hasattr(self, "commands"):
            try:
                send_command({"op": "shutdown"}, self.commands)
            except Exception:  # noqa: BLE001 - a worker is gone already: it is killed below
                pass
        else:  # a failed start or a dead rank: the others wait for something that will never come
            for p in self.procs:
                p.kill()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=STOP_TIMEOUT_S)
        if dist.is_initialized():  # in a thread: destroying a group can hang (FACTS §3), never the caller
            t = threading.Thread(target=dist.destroy_process_group, daemon=True)
            t.start()
            t.join(STOP_TIMEOUT_S)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TPGraphedDecode:
    """GraphedDecode on every rank at once: workers build, capture and replay the same (batch, KV) buckets."""

    def __init__(self, proxy: TPModel, cache: KVCache, max_batch: int, max_seq_len: int):
        proxy._check(cache)
        self.proxy = proxy
        self.local: GraphedDecode = proxy.call("graphs", max_batch=max_batch, max_seq_len=max_seq_len)
        self.batches, self.kv_lens = self.local.batches, self.local.kv_lens

    def padded(self, batch: int) -> int:
        return self.local.padded(batch)

    def capture_all(self) -> None:
        self.proxy.call("capture")  # same graphs, same order on every rank: their collectives pair up

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.proxy.call("graph_step", tokens=tokens, positions=positions)


def load_tp_model(path: Path, device: str = "cpu", gpu_ids: list[int] | None = None, dtype: torch.dtype | None = None,
                  max_positions: int | None = None, int4_kernels: bool | None = None) -> TPModel:
    """A TP checkpoint run as one process per rank, each loading only its rank file → rank 0's proxy (close() it).

    device "cpu" (gloo) or "cuda" (NCCL, GPUs gpu_ids or 0..tp-1); dtype and int4_kernels as for load_model.
    """
    return TPModel(CheckpointShards(str(Path(path).resolve())), device, gpu_ids, dtype, max_positions, int4_kernels)


# --- shared by rank 0 and the workers -----------------------------------------------------------------------------
def _devices(device: str, gpu_ids: list[int] | None, tp: int) -> list[str]:
    kind = torch.device(device).type
    if kind == "cpu":
        return ["cpu"] * tp
    if kind != "cuda":
        raise UserError(f"tensor parallel runs on cpu or cuda, not {device}")
    ids = list(gpu_ids) if gpu_ids is not None else list(range(tp))
    present = torch.cuda.device_count()
    if len(ids) != tp:
        raise UserError(f"the checkpoint has TP {tp} but {len(ids)} GPU id(s) were given ({ids})", f"give {tp} GPU ids")
    if len(set(ids)) != tp or any(not 0 <= i < present for i in ids):
        raise UserError(f"TP {tp} needs {tp} distinct GPUs among the {present} present, got ids {ids}",
                        "run on a machine with enough GPUs, or rebuild the checkpoint with a smaller --tp")
    return [f"cuda:{i}" for i in ids]


def _python() -> str:
    """This interpreter (inside Triton's python backend sys.executable is the stub: take the env's python)."""
    exe = Path(sys.executable)
    return str(exe) if exe.name.startswith("python") else str(Path(sys.prefix) / "bin" / "python3")


def _worker_env(on_gpu: bool, tp: int) -> dict:
    src = str(Path(__file__).resolve().parents[2])  # workers import this checkout's trtqwen, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [src, os.environ.get("PYTHONPATH", "")] if p)}
    if on_gpu:
        env["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (FACTS §3)
    else:
        env["OMP_NUM_THREADS"] = str(_threads_per_rank(tp))
    return env


def _threads_per_rank(tp: int) -> int:
    return max(1, (os.cpu_count() or 1) // tp)


def _load_rank(source, rank: int, device: str, dtype, max_positions, int4_kernels) -> RankModel:
    from trtqwen.runtime.loader import target_dtype

    dtype, int4_kernels = target_dtype(device, dtype, int4_kernels)
    model = source.load(rank, device, dtype, max_positions)
    return model.to(device=device, dtype=dtype, int4_kernels=int4_kernels)


def _join(store, rank: int, tp: int, device: str):
    """The TP group (NCCL on GPUs, gloo on CPUs) and a gloo group for commands that waits as long as needed."""
    kwargs = {}
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=store, rank=rank, world_size=tp,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S), **kwargs)
    commands = dist.new_group(backend="gloo", timeout=IDLE_FOREVER)
    return dist.group.WORLD, commands


def worker_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one tensor-parallel rank of trtqwen's runtime (started by rank 0)")
    ap.add_argument("source", help="where the rank's weights come from (JSON, written by rank 0)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--max-positions", type=int, default=None)
    ap.add_argument("--int4-kernels", type=int, default=None)
    a = ap.parse_args(argv)
    source = _source_from_arg(a.source)
    store = dist.TCPStore("127.0.0.1", a.port, a.tp, is_master=False, timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
    try:
        dtype = getattr(torch, a.dtype) if a.dtype else None
        int4 = None if a.int4_kernels is None else bool(a.int4_kernels)
        rank = Rank(_load_rank(source, a.rank, a.device, dtype, a.max_positions, int4))
    except BaseException as e:  # noqa: BLE001 - rank 0 reports it
        store.set(f"error{a.rank}", f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    store.set(f"loaded{a.rank}", "1")
    group, commands = _join(store, a.rank, a.tp, a.device)
    rank.model.bind(group, source.config().vocab_size)
    while True:
        cmd = receive_command(commands)
        if cmd["op"] == "shutdown":
            return 0
        rank.run(cmd)


if __name__ == "__main__":
    try:
        code = worker_main()
    except BaseException:  # noqa: BLE001 - rank 0 gone, or a failed forward: say why, then end
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: exiting ranks can hang in it (FACTS §3)
