"""The learned policy's network: a small MLP from the request's feature vector (with the budget)
to one logit per configuration of the space, trained supervised on oracle labels.

The network carries its input normalization (training mean and std) as buffers, so a saved
state dict and its feature schema (the names of the input vector, ``Featurizer.vector_names``) are
all a policy needs to decide again. ``train_policy_net`` is deterministic for a seed on the CPU.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from torch import nn


class PolicyNet(nn.Module):
    def __init__(self, *, num_inputs: int, num_configs: int, hidden: int = 64) -> None:
        super().__init__()
        self.num_inputs, self.num_configs, self.hidden = num_inputs, num_configs, hidden
        self.register_buffer("mean", torch.zeros(num_inputs))
        self.register_buffer("std", torch.ones(num_inputs))
        self.mlp = nn.Sequential(nn.Linear(num_inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_configs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp((x - self.mean) / self.std)

    @torch.no_grad()
    def logits(self, x: np.ndarray) -> np.ndarray:
        return self(torch.as_tensor(x, dtype=torch.float32).reshape(1, -1))[0].numpy()

    def numpy_forward(self) -> "NumpyMLP":
        """The same network as float32 numpy arrays: one decision without torch's per-op overhead."""
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        return NumpyMLP(mean=self.mean.numpy().copy(), std=self.std.numpy().copy(),
                        layers=[(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in linears])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- save / load -----------------------------------------------------------------------
    def to_bytes(self, *, schema: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        torch.save({"state_dict": self.state_dict(), "schema": schema,
                    "shape": {"num_inputs": self.num_inputs, "num_configs": self.num_configs, "hidden": self.hidden}},
                   buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple["PolicyNet", dict[str, Any]]:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        net = cls(**saved["shape"])
        net.load_state_dict(saved["state_dict"])
        net.eval()
        return net, saved["schema"]


def train_policy_net(*, x: np.ndarray, y: np.ndarray, num_configs: int, hidden: int = 64, epochs: int = 300,
                     lr: float = 3e-3, weight_decay: float = 1e-4, seed: int = 0) -> tuple[PolicyNet, dict[str, float]]:
    """Full-batch Adam on cross-entropy against the oracle labels; (net, {final_loss, train_accuracy})."""
    if len(x) == 0:
        raise ValueError("no training examples for the learned policy")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    net = PolicyNet(num_inputs=x.shape[1], num_configs=num_configs, hidden=hidden)
    with torch.no_grad():
        net.mean.copy_(xt.mean(0))
        net.std.copy_(xt.std(0).clamp_min(1e-6))
        for layer in net.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=5 ** 0.5, generator=generator)
                nn.init.zeros_(layer.bias)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn(net(xt), yt)
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        logits = net(xt)
        final = float(loss_fn(logits, yt))
        accuracy = float((logits.argmax(1) == yt).float().mean())
    return net, {"final_loss": final, "train_accuracy": accuracy, "examples": int(len(x)),
                 "parameters": net.num_parameters()}


class NumpyMLP:
    """PolicyNet's forward pass in numpy (ReLU between the linear layers)."""

    def __init__(self, *, mean: np.ndarray, std: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.mean, self.std, self.layers = mean, std, layers

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = (np.asarray(x, np.float32) - self.mean) / self.std
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                np.maximum(h, 0.0, out=h)
        return h
