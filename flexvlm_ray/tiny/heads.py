"""Training-only read-out heads of the tiny model (not saved) and the fixed patch-embedding init."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flexvlm_ray.data.shapes import BACKGROUNDS, COLORS, KINDS
from flexvlm_ray.tiny.examples import COMBOS, NUM_ATTRIBUTES, POS_WEIGHT, Example


def dct_patch_embedding(*, out_channels: int, patch: int) -> torch.Tensor:
    """(out_channels, 3, patch, patch) filters: the lowest-frequency 2-D cosine bases (u + v small
    first) of each colour channel in turn, each of unit norm times ``sqrt(out_channels / 3) / patch``
    scale so the outputs of CLIP-normalized pixels have a std near 1. Used as a fixed patch
    embedding: with random filters a 42-px patch keeps little of its colour and layout, and training
    the filters with Adam (every one of the 5292 weights moves by the learning rate) collapses them."""
    freqs = sorted(((u, v) for u in range(patch) for v in range(patch)), key=lambda f: (f[0] + f[1], f))
    grid = (torch.arange(patch, dtype=torch.float64) + 0.5) / patch
    weight = torch.zeros(out_channels, 3, patch, patch, dtype=torch.float64)
    for o in range(out_channels):
        u, v = freqs[o // 3]
        basis = torch.outer(torch.cos(math.pi * u * grid), torch.cos(math.pi * v * grid))
        weight[o, o % 3] = basis / basis.norm()
    return (weight * 4.0 / patch).float()



class GroundingHead(torch.nn.Module):
    """Linear read-out of the decoder's hidden state after ``GROUND_LAYER`` blocks at every colour or
    kind word of the prompt (training only, not saved): does the image show such a shape, how many,
    and which colour / kind do they have (``grounding_targets``)? Each word's own position asks the
    image about itself, one attention hop; without it the decoder learned the question priors and
    never started reading the image."""

    def __init__(self, hidden: int, *, extra: bool = True) -> None:
        super().__init__()
        self.extra = extra        # False: the shown/not-shown read-out only
        self.linear = torch.nn.Linear(hidden, 1)
        self.colour = torch.nn.Linear(hidden, len(COLORS))
        self.kind = torch.nn.Linear(hidden, len(KINDS))
        self.count = torch.nn.Linear(hidden, 10)

    def loss(self, *, hidden_states: torch.Tensor, examples: Sequence[Example]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(loss, presence accuracy) over the examples' grounding targets; None where there are none."""
        rows = [r for r, e in enumerate(examples) for _ in e.grounding]
        if not rows:
            return None
        device = hidden_states.device
        table = torch.tensor([g for e in examples for g in e.grounding], device=device, dtype=torch.float32)
        positions, targets = table[:, 0].long(), table[:, 1]
        colour, kind, count = table[:, 2].long(), table[:, 3].long(), table[:, 4].long()
        states = hidden_states[torch.tensor(rows, device=device), positions]
        x = states / states.norm(dim=-1, keepdim=True).clamp_min(1e-6) * math.sqrt(states.shape[-1])
        logits = self.linear(x).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        if self.extra:
            loss = loss + F.cross_entropy(self.count(x), count)
        for head, labels in ((self.colour, colour), (self.kind, kind)) if self.extra else ():
            if bool((labels >= 0).any()):
                loss = loss + F.cross_entropy(head(x), labels, ignore_index=-1)
        with torch.no_grad():
            acc = ((logits > 0) == (targets > 0.5)).float().mean()
        return loss, acc



class SummaryHead(torch.nn.Module):
    """Linear read-out of the decoder's hidden state at the last prompt position after
    ``SUMMARY_LAYER`` blocks (training only, not saved): which (colour, kind) pairs the image shows,
    its background colour and its number of shapes. It gives the decoder a question-independent
    gradient towards gathering the image tokens at the position that answers."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.presence = torch.nn.Linear(hidden, len(COMBOS))
        self.background = torch.nn.Linear(hidden, len(BACKGROUNDS))
        self.count = torch.nn.Linear(hidden, 10)

    def loss(self, *, states: torch.Tensor, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, presence accuracy) of ``states`` (one row per example)."""
        device = states.device
        x = states / states.norm(dim=-1, keepdim=True).clamp_min(1e-6) * math.sqrt(states.shape[-1])
        presence = torch.from_numpy(np.stack([e.presence for e in examples])).to(device)
        background = torch.tensor([e.background for e in examples], device=device)
        count = torch.tensor([e.num_shapes for e in examples], device=device)
        logits = self.presence(x)
        loss = (F.binary_cross_entropy_with_logits(logits, presence) * 3
                + F.cross_entropy(self.background(x), background) + F.cross_entropy(self.count(x), count))
        with torch.no_grad():
            acc = ((logits > 0) == (presence > 0.5)).float().mean()
        return loss, acc


class AttributeHead(torch.nn.Module):
    """Linear read-out of every projected image token (training only, not saved): the token's
    (size, colour, kind) attributes (multi-label) and the image's background colour."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.attributes = torch.nn.Linear(hidden, NUM_ATTRIBUTES)
        self.background = torch.nn.Linear(hidden, len(BACKGROUNDS))

    def loss(self, *, embeds: torch.Tensor, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, attribute accuracy over the entries that are positive or predicted positive)."""
        labels = torch.from_numpy(np.concatenate([e.token_labels for e in examples])).to(embeds.device)
        per_crop = embeds.shape[0] // sum(e.pixels.shape[0] for e in examples)
        background = torch.from_numpy(np.concatenate([np.full(e.pixels.shape[0] * per_crop, e.background)
                                                      for e in examples])).to(embeds.device)
        x = embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-6) * math.sqrt(embeds.shape[-1])
        logits = self.attributes(x)
        attr = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=torch.full_like(labels[0], POS_WEIGHT))
        bg = F.cross_entropy(self.background(x), background)
        with torch.no_grad():
            hit = (logits > 0) == (labels > 0.5)
            relevant = (logits > 0) | (labels > 0.5)
            acc = (hit & relevant).sum() / relevant.sum().clamp_min(1)
        return attr + bg, acc
