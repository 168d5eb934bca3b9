"""A run's checkpoints: adapter, steer weights, optimiser, schedule, RNG and trainer state; no pickle.

``adapter/`` loads with ``peft.PeftModel.from_pretrained``; ``steer.safetensors`` holds the
steer weights; ``optimizer.pt`` / ``scheduler.pt`` are state dicts of tensors and numbers
that ``torch.load(weights_only=True)`` accepts; RNG states go to ``rng.safetensors`` and
``trainer_state.json``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TRAINER_STATE = "trainer_state.json"


def unwrap(model):
    """The peft model under an optional DistributedDataParallel wrapper."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_checkpoint(directory: Path, model, steer, optimizer, scheduler, state: dict) -> Path:
    """Writes everything a resumed run needs into ``directory`` and returns it.

    Args:
        model: the peft student (DDP-wrapped or not).
        steer: the steer adapter or None.
        state: trainer state (``step``, ``evaluations``); RNG states are added.
    """
    directory.mkdir(parents=True, exist_ok=True)
    unwrap(model).save_pretrained(directory / "adapter")
    if steer is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in steer.state_dict().items()},
                  directory / "steer.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, directory / "rng.safetensors")
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        **state,
        "python_rng": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    (directory / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    return directory


def load_checkpoint(directory: Path, model, steer, optimizer, scheduler) -> dict:
    """Restores everything :func:`save_checkpoint` wrote; returns the trainer state."""
    from peft import set_peft_model_state_dict

    weights = load_file(directory / "adapter" / "adapter_model.safetensors")
    set_peft_model_state_dict(unwrap(model), weights)
    if steer is not None:
        steer.load_state_dict(load_file(directory / "steer.safetensors"))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    state = json.loads((directory / TRAINER_STATE).read_text())
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


def checkpoint_step(folder: Path | None) -> int:
    """The step a checkpoint folder was written at (-1 when it has no readable trainer state)."""
    if folder is None:
        return -1
    try:
        return int(json.loads((Path(folder) / TRAINER_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint with the highest step anywhere under a run directory.

    Raises:
        FileNotFoundError: no checkpoint there.
    """
    found = [(checkpoint_step(state.parent), state.parent) for state in Path(run_dir).glob(f"**/{TRAINER_STATE}")]
    found = [pair for pair in found if pair[0] >= 0]
    if not found:
        raise FileNotFoundError(f"no checkpoint ({TRAINER_STATE}) under {run_dir}; is it a `medalign train` run dir?")
    return max(found, key=lambda pair: pair[0])[1]
