"""The wire between the ranks: the TP group, collectives helpers and the command broadcast rank 0 drives them with."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

INIT_TIMEOUT_S = 300  # loading a 7B shard and joining the group
COLLECTIVE_TIMEOUT_S = 600  # a first forward on GPU compiles for minutes; a dead peer is caught by the watchdog
IDLE_FOREVER = datetime.timedelta(days=365)  # workers wait this long for the next command (rank 0 may be idle)

all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13


class TPError(RuntimeError):
    """A rank died or a collective failed: the TP model cannot serve any more."""


def join(store, rank: int, tp: int, device: str):
    """The TP group (NCCL on GPUs, gloo on CPUs) and a gloo group for commands that waits as long as needed."""
    kwargs = {}
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=store, rank=rank, world_size=tp,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S), **kwargs)
    commands = dist.new_group(backend="gloo", timeout=IDLE_FOREVER)
    return dist.group.WORLD, commands


# one fixed-size broadcast per decode step, pickled objects for the rest
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


