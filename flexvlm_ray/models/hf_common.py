"""Small pieces that the adapter families on torch modules share (flexmoe, qwen3_vl_moe, molmo2,
molmo_remote): device and dtype checks, the model identity of the importance cache, parameter
counts, and the bookkeeping of one greedy decode step. What differs between families (stages,
decoder loops, knob targets) stays in the family's own module."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from flexvlm_ray.models.base import DecodeState
from flexvlm_ray.models.flexmoe_model import DTYPES


def device_and_dtype(*, device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``(torch.device, torch dtype)``; ValueError for a dtype outside ``DTYPES``, RuntimeError for a
    CUDA device where CUDA is not available."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' was requested but CUDA is not available")
    return torch.device(device), DTYPES[dtype]


def weights_source(*, seed: int, folder: Optional[Path]) -> str:
    """Where weights come from: ``random:seed=N`` (built from a seed) or ``path:<resolved folder>``."""
    return f"random:seed={seed}" if folder is None else f"path:{folder.resolve()}"


def model_identity(*, family: str, config: Any, dtype: torch.dtype, weights: str, **extra: Any) -> dict[str, Any]:
    """What determines a model's weights (the key of the importance cache): family, the config's
    ``to_dict()``, the dtype's name, where the weights come from, and ``extra`` keys."""
    return {"family": family, "config": config.to_dict(), "dtype": str(dtype).removeprefix("torch."),
            "weights": weights, **extra}


def numel(module: torch.nn.Module) -> int:
    """Parameters of ``module`` (works on the 'meta' device)."""
    return sum(p.numel() for p in module.parameters())


def check_blocks_unchanged(*, state: DecodeState, active: tuple[int, ...]) -> None:
    """RuntimeError when the blocks that ran at prefill (``state.extras['blocks']``) are not ``active``."""
    if state.extras.get("blocks") != active:
        raise RuntimeError(f"active blocks changed during decoding: prefill ran {state.extras.get('blocks')}, "
                           f"now {active}")


def record_token(*, state: DecodeState, token: int, logits: Any) -> int:
    """One decode step into ``state``: the token appended and next, the position advanced, the
    step's logits kept in ``extras['logits']``; returns ``token``."""
    state.tokens.append(token)
    state.next_token, state.position = token, state.position + 1
    state.extras["logits"] = logits
    return token
