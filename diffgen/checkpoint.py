"""Checkpoints in safetensors: weights, EMA weights and configs as metadata; no pickle.

A checkpoint folder holds ``model.safetensors`` (``params.*`` and ``ema.*`` tensors; metadata
with the model, schedule and training configs and the step) and, for resuming,
``train_state.safetensors`` (optimizer moments, loss-scaler state, step). Every file is written
to a temporary name and renamed into place, so a crash mid-write never replaces a good file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from diffgen.errors import DiffgenError
from diffgen.files import atomic_write

FORMAT = "diffgen-1"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
KIND_UNET = "unet"  # a diffusion model, ε_θ(x_t, t, y)
KIND_CLASSIFIER = "classifier"  # a noisy classifier, p_φ(y | x_t, t)


@dataclass
class Checkpoint:
    """What a model file holds: configs (as dicts), the step, and the two weight sets."""

    model_config: dict
    schedule_config: dict
    train_config: dict
    step: int
    params: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    kind: str = KIND_UNET


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write a safetensors file under a temporary name in the same folder, then rename it."""
    # clone: safetensors refuses tensors sharing storage, and the caller's stay untouched.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as err:  # e.g. a full disk; reported like any OSError
            raise OSError(str(err)) from None

    atomic_write(path, write)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DiffgenError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DiffgenError(f"{path} is not a readable safetensors file ({err})") from None
    return tensors, metadata


def save_model(path: Path, ckpt: Checkpoint) -> None:
    tensors = {f"params.{k}": v for k, v in ckpt.params.items()}
    tensors.update({f"ema.{k}": v for k, v in ckpt.ema.items()})
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(ckpt.model_config),
        "schedule_config": json.dumps(ckpt.schedule_config),
        "train_config": json.dumps(ckpt.train_config),
        "step": str(ckpt.step),
        "kind": ckpt.kind,
    }
    atomic_save(tensors, metadata, path)


def load_model(path: Path) -> Checkpoint:
    """Read a model file; raise DiffgenError if it is not a diffgen checkpoint."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise DiffgenError(f"{path} is not a diffgen model file (no {FORMAT!r} metadata)")
    try:
        configs = {k: json.loads(metadata[k])
                   for k in ("model_config", "schedule_config", "train_config")}
        step = int(metadata["step"])
    except (KeyError, ValueError) as err:
        raise DiffgenError(f"{path} has broken metadata ({err})") from None
    params = {k[7:]: v for k, v in tensors.items() if k.startswith("params.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return Checkpoint(configs["model_config"], configs["schedule_config"],
                      configs["train_config"], step, params, ema,
                      metadata.get("kind", KIND_UNET))


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str
                      ) -> None:
    """Load tensors into a model, failing on the first missing, unexpected or mis-shaped one."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in weights:
            raise DiffgenError(f"{source}: tensor {name!r} is missing; the config does not match")
        if weights[name].shape != tensor.shape:
            raise DiffgenError(
                f"{source}: tensor {name!r} has shape {tuple(weights[name].shape)}, the model "
                f"expects {tuple(tensor.shape)}; the config does not match"
            )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise DiffgenError(f"{source}: unexpected tensor {unexpected[0]!r}; "
                           "the config does not match")
    result = model.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def save_train_state(path: Path, step: int, optimizer: torch.optim.Optimizer,
                     scaler_state: dict) -> None:
    """Optimizer moments as tensors, scalars as JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "param_groups": json.dumps(state["param_groups"]),
        "scalars": json.dumps(scalars),
        "scaler": json.dumps(scaler_state),
    }
    atomic_save(tensors, metadata, path)


def load_train_state(path: Path, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore the optimizer in place; return (step, loss-scaler state)."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise DiffgenError(f"{path} is not a diffgen training state file")
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, entry in json.loads(metadata["scalars"]).items():
        state.setdefault(int(index), {}).update(entry)
    try:
        optimizer.load_state_dict({"state": state,
                                   "param_groups": json.loads(metadata["param_groups"])})
    except (ValueError, KeyError) as err:
        raise DiffgenError(f"{path} does not match this model's optimizer ({err})") from None
    return int(metadata["step"]), json.loads(metadata["scaler"])
