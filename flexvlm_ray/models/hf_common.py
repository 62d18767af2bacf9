"""Small pieces that the adapter families on torch modules share (flexmoe, qwen3_vl_moe, molmo2,
molmo_remote): the config of a transformers family (preset or local checkpoint; qwen3_vl_moe,
molmo2), device and dtype checks, the max_crops and image checks of ``prepare``, the model
identity of the importance cache, parameter counts (all, and active per token), and the
bookkeeping of greedy decoding (the state prefill starts, one decode step). What differs between
families (stages, decoder loops, knob targets) stays in the family's own module."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from flexvlm_ray.models.base import DecodeState
from flexvlm_ray.models.flexmoe.model import DTYPES


def resolve_hf_config(*, family: str, preset: Optional[str], path: Optional[str],
                      presets: dict[str, Callable[[], Any]]) -> tuple[Any, Optional[Path]]:
    """(config, checkpoint folder) of a transformers family: a local folder's ``config.json`` through
    ``AutoConfig`` (local files only; FileNotFoundError without it), else the preset's config (default
    ``tiny``) and None (random weights); an unknown preset raises ValueError listing ``presets``."""
    if path is not None:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"family '{family}': no checkpoint at '{path}' (expected a folder with config.json)")
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False), folder
    name = preset or "tiny"
    if name not in presets:
        raise ValueError(f"Unknown preset '{name}' for family '{family}'. Available: {', '.join(presets)}")
    return presets[name](), None


def device_and_dtype(*, device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``(torch.device, torch dtype)``; ValueError for a dtype outside ``DTYPES``, RuntimeError for a
    CUDA device where CUDA is not available."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' was requested but CUDA is not available")
    return torch.device(device), DTYPES[dtype]


def check_max_crops(*, max_crops: Optional[int], limit: int) -> None:
    """ValueError when ``max_crops`` is set and outside ``1 .. limit``."""
    if max_crops is not None and not 1 <= max_crops <= limit:
        raise ValueError(f"max_crops={max_crops} is out of range: allowed 1..{limit}")


def max_crops_for(*, knobs: Any, default: int, limit: int) -> int:
    """The max_crops a sample is prepared with: ``knobs.max_crops``, or ``default`` when it is None;
    ValueError outside ``1 .. limit``."""
    max_crops = default if knobs.max_crops is None else knobs.max_crops
    check_max_crops(max_crops=max_crops, limit=limit)
    return max_crops


def check_has_image(*, sample: Any) -> None:
    """ValueError naming the sample when it has no image (it failed to load)."""
    if sample.image is None:
        raise ValueError(f"sample '{getattr(sample, 'sample_id', '?')}' has no image")


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


def greedy_token(logits: torch.Tensor) -> int:
    """The greedy choice: index of the largest logit."""
    return int(torch.argmax(logits).item())


def prefill_state(*, logits: torch.Tensor, cache: Any, position: int, blocks: tuple[int, ...],
                  **extras: Any) -> DecodeState:
    """The decode state after prefill: the greedy first token, the KV cache, the sequence length,
    and in ``extras`` the blocks that ran, the logits and the family's own ``extras``."""
    token = greedy_token(logits)
    return DecodeState(next_token=token, tokens=[token], cache=cache, position=position,
                       extras={"blocks": blocks, "logits": logits, **extras})


def active_llm_params(*, llm: int, blocks: Sequence[torch.nn.Module], active: Sequence[int], num_experts: int,
                      top_k: int, expert_params: Callable[[torch.nn.Module], int]) -> int:
    """What one token touches of the ``llm`` parameters: skipped blocks left out and, in each block
    that runs, all but ``top_k`` of its ``num_experts`` experts (``expert_params(block)``: the
    block's expert parameters; 0 for a dense block; ``num_experts`` 0: a dense decoder)."""
    for index, block in enumerate(blocks):
        if index not in active:
            llm -= numel(block)
        elif num_experts:
            experts = expert_params(block)
            llm -= experts - experts // num_experts * top_k
    return llm


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
