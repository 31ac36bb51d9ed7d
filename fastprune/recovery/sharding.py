"""Recovery on many processes: FSDP2 (``fully_shard``) wrapping, sharded checkpoints, and the plain model back.

Under torch.distributed (torchrun) every decoder layer and then the whole model are wrapped with ``fully_shard``:
each process keeps 1/N of the weights, gradients and optimizer state, and gathers a layer's weights only while
it runs. Each optimizer step's windows are split evenly over the processes and FSDP averages the gradients, so
N processes take the steps one process takes at the same global batch. Checkpoints are written with
torch.distributed.checkpoint (each process its shard; a run may resume on another number of processes), and the
trained weights are gathered on rank 0 into a plain model of the original class.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastprune.adapters import Adapter
from fastprune.distributed import barrier, current
from fastprune.errors import ConfigError
from fastprune.io import publish_dir

logger = logging.getLogger("fastprune")

SHARDED_DIR = "sharded"
STATE_FILE = "state.pt"


def sharding() -> bool:
    """True when recovery runs under a torch.distributed process group (then it shards with FSDP2)."""
    return dist.is_available() and dist.is_initialized()


def shard_model(adapter: Adapter) -> None:
    """Wrap every decoder layer, then the whole model, with FSDP2's ``fully_shard`` (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fastprune.distributed import device

    mesh = init_device_mesh(device().type, (current().world,))
    for layer in adapter.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(adapter.model, mesh=mesh)


def local_share(ids: torch.Tensor) -> torch.Tensor:
    """This process's share of one batch of windows (all of it in one process)."""
    ranks = current()
    if not sharding() or ranks.world == 1:
        return ids
    if len(ids) % ranks.world:
        raise ConfigError(
            f"a batch of {len(ids)} windows cannot be split evenly over {ranks.world} processes; use a recovery "
            f"batch size that is a multiple of {ranks.world}"
        )
    return ids.chunk(ranks.world)[ranks.rank]


def plain_copy(model: nn.Module, cls: type[nn.Module]) -> nn.Module | None:
    """Rank 0: a plain ``cls`` model holding the sharded model's full weights; other ranks: None."""
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not current().is_main:
        return None
    with init_empty_weights(include_buffers=False):
        plain = cls(model.config)
    plain.load_state_dict(full, assign=True, strict=False)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"gathering the sharded model left parameters without values: {missing[:3]}")
    return plain.eval()


def save_sharded(directory: Path, model, optimizer, best: dict, state: dict, rng: dict) -> Path:
    """Write a checkpoint: every process its shard of the weights, optimizer state and best weights
    (torch.distributed.checkpoint), rank 0 the plain-data ``state``, every process its RNG state. The new
    checkpoint replaces the previous one only once complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    final, tmp = directory / SHARDED_DIR, directory / f".{SHARDED_DIR}.partial"
    ranks = current()
    if ranks.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "best": best}, checkpoint_id=tmp)
    torch.save(rng, tmp / f"rng-rank{ranks.rank:03d}.pt")
    barrier()
    if ranks.is_main:
        torch.save({**state, "has_best": bool(best)}, tmp / STATE_FILE)
        publish_dir(tmp, final, overwrite=True)
    barrier()
    return final


def read_state(directory: Path) -> dict | None:
    """The plain-data state of the sharded checkpoint in ``directory`` (None when there is none)."""
    path = Path(directory) / SHARDED_DIR
    if not (path / STATE_FILE).is_file():
        return None
    try:
        return torch.load(path / STATE_FILE, weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot resume: sharded recovery checkpoint {path} is unreadable ({e})") from e


def load_sharded(directory: Path, state: dict, model, optimizer, params: dict) -> tuple[dict, dict]:
    """Load the shards of a checkpoint written by ``save_sharded`` (on any number of processes) into ``model`` and
    ``optimizer``; return (sharded copies of the best weights or {}, this process's RNG state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(directory) / SHARDED_DIR
    model_state, optim_state = get_state_dict(model, optimizer)
    best = {n: p.detach().clone() for n, p in params.items()} if state["has_best"] else {}
    target = {"model": model_state, "optim": optim_state, "best": best}
    dcp.load(target, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    rng_file = path / f"rng-rank{current().rank:03d}.pt"
    if not rng_file.is_file():  # resumed on more processes than saved: the extra ones start from rank 0's
        rng_file = path / "rng-rank000.pt"
    return target["best"], torch.load(rng_file, weights_only=True)


def agree_any(flag: bool) -> bool:
    """True on every process when it is true on any (so all processes stop at the same step)."""
    if not sharding():
        return flag
    from fastprune.distributed import device

    t = torch.tensor([float(flag)], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
