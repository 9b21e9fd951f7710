"""A tensor-parallel rank's process (`python -m trtqwen.runtime.tp.worker`, started by rank 0)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist

from trtqwen.runtime.tp.channel import INIT_TIMEOUT_S, join, receive_command
from trtqwen.runtime.tp.shards import Rank, load_shard, source_from_arg


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
    source = source_from_arg(a.source)
    store = dist.TCPStore("127.0.0.1", a.port, a.tp, is_master=False, timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
    try:
        dtype = getattr(torch, a.dtype) if a.dtype else None
        int4 = None if a.int4_kernels is None else bool(a.int4_kernels)
        rank = Rank(load_shard(source, a.rank, a.device, dtype, a.max_positions, int4))
    except BaseException as e:  # noqa: BLE001 - rank 0 reports it
        store.set(f"error{a.rank}", f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    store.set(f"loaded{a.rank}", "1")
    group, commands = join(store, a.rank, a.tp, a.device)
    rank.model.bind(group, source.config()[0].vocab_size)
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
