"""Rank 0: the TPModel LLMEngine drives, which starts the worker processes, broadcasts and watches them."""

from __future__ import annotations

import atexit
import datetime
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trtqwen.errors import UserError
from trtqwen.runtime.engine.model_runner import GraphedDecode
from trtqwen.runtime.models.qwen2 import KVCache
from trtqwen.runtime.subprocesses import child_env, python_executable
from trtqwen.runtime.tp.channel import INIT_TIMEOUT_S, TPError, join, send_command
from trtqwen.checkpoint import is_trtllm_checkpoint
from trtqwen.runtime.tp.shards import CheckpointShards, HfShards, Rank, RandomShards, RankModel, load_shard, source_arg

STOP_TIMEOUT_S = 10


class TPModel:
    """Rank 0's stand-in for a Qwen2Model: each call is broadcast to the workers, then run on rank 0's shard."""

    def __init__(self, source: CheckpointShards | HfShards | RandomShards, device: str = "cpu", gpu_ids: list[int] | None = None,
                 dtype: torch.dtype | None = None, max_positions: int | None = None, int4_kernels: bool | None = None):
        # the full model's shape (LLMEngine checks token ids against its vocabulary); refuses a TP that does not divide it
        self.cfg, self.tp = source.config()
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
            cmd = [python_executable(), "-m", "trtqwen.runtime.tp.worker", source_arg(source), "--rank", str(r), "--tp", str(self.tp),
                   "--port", str(store.port), "--device", self.devices[r]] + [
                   x for k, v in opts.items() if v != "" for x in (f"--{k.replace('_', '-')}", str(v))]
            self.procs.append(subprocess.Popen(cmd, env=_worker_env(on_gpu, self.tp)))
        try:
            self.rank = Rank(load_shard(source, 0, self.devices[0], dtype, max_positions, int4_kernels))
            self._wait_loaded(store)
            self.group, self.commands = join(store, 0, self.tp, self.devices[0])
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
                  max_positions: int | None = None, int4_kernels: bool | None = None, tp: int = 1) -> TPModel:
    """A TP checkpoint run as one process per rank, each loading only its rank file (an HF checkpoint: each its
    slice of it, at `tp`) → rank 0's proxy (close() it).

    device "cpu" (gloo) or "cuda" (NCCL, GPUs gpu_ids or 0..tp-1); dtype and int4_kernels as for load_model.
    """
    path = str(Path(path).resolve())
    source = CheckpointShards(path) if is_trtllm_checkpoint(Path(path)) else HfShards(path, tp)
    return TPModel(source, device, gpu_ids, dtype, max_positions, int4_kernels)


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


def _worker_env(on_gpu: bool, tp: int) -> dict:
    if on_gpu:
        return child_env(NCCL_NVLS_ENABLE="0")  # NVLink multicast off (FACTS §3)
    return child_env(OMP_NUM_THREADS=str(_threads_per_rank(tp)))


def _threads_per_rank(tp: int) -> int:
    return max(1, (os.cpu_count() or 1) // tp)


