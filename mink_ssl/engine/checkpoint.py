"""Training checkpoints: self-describing, plain containers only (``weights_only=True`` loads).

Every task's checkpoint holds its format tag (:mod:`mink_ssl.formats.model_files`), library
versions, the resolved config as plain data, optimizer, scheduler, the trainer state (iteration,
rank 0's samples consumed and the task's tallies), ``ranks``: one entry per rank (process) of
the run, ``{"rng": ..., "samples": ...}``, with that rank's RNG states (torch, CUDA, numpy,
python, and every :class:`~mink_ssl.seeding.SeededGenerator` of the module, e.g. objectives')
and its sampler position (samples it consumed, skipped batches included), and the task's own
parts (weights and the constructor arguments that rebuild them), which the task names when it
saves and restores.

Ranks draw different amounts of randomness (their batches differ), so each rank saves and
restores its own states: :func:`gather_rank_states` (a collective every rank calls) brings them
to rank 0, which writes them; a resumed rank r takes entry r. Checkpoints written before
``ranks`` existed hold one ``rng`` (rank 0's), which every rank then takes.
"""
from __future__ import annotations

import io
import random
import re
from pathlib import Path

import numpy as np
import torch

from mink_ssl.engine.trainer import TrainState
from mink_ssl.formats.model_files import load_tagged
from mink_ssl.io import atomic_torch_save, library_versions
from mink_ssl.seeding import SeededGenerator


def unwrap(module):
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if hasattr(module, "module") else module


def _seeded_generators(module) -> dict:
    found = {}
    for name, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, SeededGenerator):
                found[f"{name}.{attr}"] = value
    return found


def rng_state(module) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
        "generators": {k: g._generator.get_state() for k, g in _seeded_generators(module).items()
                       if g._generator is not None},
    }


def set_rng_state(state: dict, module) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    gens = _seeded_generators(module)
    for key, gstate in state["generators"].items():
        gens[key](gstate.device if hasattr(gstate, "device") else "cpu")  # create it
        gens[key]._generator.set_state(gstate)


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in the initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_state(trainer) -> dict:
    """What this rank alone knows and a resume needs: its RNG states and its sampler position
    (samples consumed, skipped batches included, so ranks may differ)."""
    return {"rng": rng_state(unwrap(trainer.module)), "samples": int(trainer.state.samples)}


def gather_rank_states(trainer) -> list[dict] | None:
    """Every rank's :func:`rank_state`, in rank order, on rank 0 (None on the other ranks).

    A collective: every rank must call it at the same point. The states travel as
    ``torch.save`` bytes and are read back with ``weights_only=True`` (plain containers and
    tensors; nothing is unpickled as code)."""
    import torch.distributed as dist

    rank, world = process_rank()
    mine = rank_state(trainer)
    if world == 1:
        return [mine]
    buf = io.BytesIO()
    torch.save(mine, buf)
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    payload = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s.item()) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    padded = padded.to(device)
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    if rank != 0:
        return None
    return [torch.load(io.BytesIO(chunk[: int(n.item())].cpu().numpy().tobytes()),
                       weights_only=True) for chunk, n in zip(chunks, sizes)]


def save_checkpoint(path: Path, trainer, config: dict, fmt: str, parts: dict) -> Path:
    """Everything to resume ``trainer`` exactly, tagged ``fmt``; ``parts``: the task's weights
    and constructor arguments (plain containers), stored as top-level entries. The per-rank
    states are ``trainer.rank_states`` (gathered from every rank by the checkpoint hook) or,
    without them, this process's alone."""
    ranks = getattr(trainer, "rank_states", None) or [rank_state(trainer)]
    return atomic_torch_save({
        "format": fmt, "versions": library_versions(), "config": config, **parts,
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "state": trainer.state.to_dict(), "ranks": ranks,
    }, path)


def saved_world_size(ckpt: dict) -> int | None:
    """The number of ranks that wrote ``ckpt`` (None: written before per-rank states)."""
    ranks = ckpt.get("ranks") if isinstance(ckpt, dict) else None
    return len(ranks) if isinstance(ranks, list) else None


def load_checkpoint(path: Path, fmt: str, what: str) -> dict:
    """The checkpoint in ``path``; its format must be ``fmt`` (``what`` names it in the error)."""
    return load_tagged(path, [fmt], what)


def restore_training(ckpt: dict, trainer) -> TrainState:
    """Optimizer, scheduler, trainer state, and this rank's RNG states and sampler position from
    ``ckpt`` (the task restores its weights first); the sampler restarts from ``samples``.

    Rank r takes the checkpoint's entry r. A run on another number of ranks (allowed only with
    ``resume_override``, see :class:`~mink_ssl.engine.rundir.RunDir`) takes entry r where there
    is one and rank 0's otherwise: it continues, but not as the saved run would have."""
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    trainer.state = TrainState.from_dict(ckpt["state"])
    rank, _ = process_rank()
    ranks = ckpt.get("ranks")
    own = ((ranks[rank] if rank < len(ranks) else ranks[0]) if ranks
           else {"rng": ckpt["rng"], "samples": trainer.state.samples})
    set_rng_state(own["rng"], unwrap(trainer.module))
    trainer.state.samples = int(own["samples"])
    return trainer.state


# ------------------------------------------------------------------- checkpoint file names
#: a training checkpoint's file name, ``checkpoint_<iteration>.pth``: written, parsed and listed
#: only through the three functions below
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)\.pth")


def checkpoint_path(directory: Path, iteration: int) -> Path:
    """Where the checkpoint of ``iteration`` lives in the run directory ``directory``."""
    return Path(directory) / f"checkpoint_{int(iteration)}.pth"


def checkpoint_iteration(path) -> int | None:
    """``.../checkpoint_<it>.pth`` -> it; None for any other name (``checkpoint_4.pth.damaged``,
    ``checkpoint_best.pth``, ``model.pth``)."""
    m = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: Path) -> list[Path]:
    """The checkpoints in ``directory``, lowest iteration first (other files are not listed)."""
    found = [(it, p) for p in Path(directory).glob("checkpoint_*.pth")
             if (it := checkpoint_iteration(p)) is not None]
    return [p for _, p in sorted(found)]
