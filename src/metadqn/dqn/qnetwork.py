"""The Q-network every method ends in, and its batched twin that trains K of them as one module."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]


def layer_sizes(obs_dim: int, n_actions: int, hidden_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(in, out) of every linear layer."""
    sizes = [obs_dim, *hidden_sizes, n_actions]
    return list(itertools.pairwise(sizes))


def init_state_dict(obs_dim: int, n_actions: int, hidden_sizes: Sequence[int], seed: int) -> StateDict:
    """A freshly initialised :class:`QNetwork` state_dict from its own seed (no global RNG).

    Same distribution as ``nn.Linear``'s default: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    gen = torch.Generator().manual_seed(int(seed))
    sd: StateDict = {}
    for i, (fan_in, fan_out) in enumerate(layer_sizes(obs_dim, n_actions, hidden_sizes)):
        bound = fan_in**-0.5
        sd[f"layers.{i}.weight"] = (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound
        sd[f"layers.{i}.bias"] = (torch.rand(fan_out, generator=gen) * 2 - 1) * bound
    return sd


class QNetwork(nn.Module):
    """An MLP from observations to one Q-value per action (ReLU between layers)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden_sizes: Sequence[int] = (64, 64)):
        super().__init__()
        self.obs_dim, self.n_actions, self.hidden_sizes = obs_dim, n_actions, list(hidden_sizes)
        self.layers = nn.ModuleList(
            nn.Linear(i, o) for i, o in layer_sizes(obs_dim, n_actions, hidden_sizes)
        )

    def forward(self, obs: Tensor) -> Tensor:
        x = obs
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """Greedy actions."""
        return self(obs).argmax(-1)


class BatchedQNetwork(nn.Module):
    """K independent Q-networks as one module: layer weights shaped [K, in, out], applied with bmm.

    Slot k is exactly ``QNetwork`` with ``slot_state_dict(k)``; training all K at once costs a few batched
    matrix products instead of K small ones, which is what makes many tasks affordable.
    """

    def __init__(self, n_slots: int, obs_dim: int, n_actions: int, hidden_sizes: Sequence[int]):
        super().__init__()
        self.n_slots, self.obs_dim, self.n_actions = n_slots, obs_dim, n_actions
        self.hidden_sizes = list(hidden_sizes)
        shapes = layer_sizes(obs_dim, n_actions, hidden_sizes)
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(n_slots, i, o)) for i, o in shapes)
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(n_slots, 1, o)) for _, o in shapes)

    def forward(self, obs: Tensor) -> Tensor:
        """obs [K, B, obs_dim] -> Q-values [K, B, n_actions]."""
        x = obs
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = torch.relu(x)
        return x

    @torch.no_grad()
    def act(self, obs: Tensor) -> Tensor:
        """Greedy actions [K, B] for observations [K, B, obs_dim]."""
        return self(obs).argmax(-1)

    @torch.no_grad()
    def load_slots(self, state_dicts: Sequence[Mapping[str, Tensor]], slots: Sequence[int] | None = None) -> None:
        """Copies QNetwork state_dicts into the given slots (default: slot i gets state_dicts[i])."""
        slots = range(len(state_dicts)) if slots is None else slots
        for k, sd in zip(slots, state_dicts, strict=True):
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                w[k].copy_(sd[f"layers.{i}.weight"].T)
                b[k, 0].copy_(sd[f"layers.{i}.bias"])

    @torch.no_grad()
    def slot_state_dict(self, k: int) -> StateDict:
        """Slot k as an ordinary :class:`QNetwork` state_dict (CPU tensors)."""
        sd: StateDict = {}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            sd[f"layers.{i}.weight"] = w[k].T.detach().to("cpu", copy=True).contiguous()
            sd[f"layers.{i}.bias"] = b[k, 0].detach().to("cpu", copy=True)
        return sd

    def state_dicts(self) -> list[StateDict]:
        return [self.slot_state_dict(k) for k in range(self.n_slots)]


def param_shapes(obs_dim: int, n_actions: int, hidden_sizes: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """(state_dict key, shape) of every QNetwork parameter, in state_dict order."""
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for i, (fan_in, fan_out) in enumerate(layer_sizes(obs_dim, n_actions, hidden_sizes)):
        shapes += [(f"layers.{i}.weight", (fan_out, fan_in)), (f"layers.{i}.bias", (fan_out,))]
    return shapes


def n_params(obs_dim: int, n_actions: int, hidden_sizes: Sequence[int]) -> int:
    return sum(math.prod(s) for _, s in param_shapes(obs_dim, n_actions, hidden_sizes))


def flatten_state_dict(sd: Mapping[str, Tensor], shapes: Sequence[tuple[str, tuple[int, ...]]]) -> Tensor:
    """A QNetwork state_dict as one flat vector (the layout hypernetworks generate)."""
    return torch.cat([sd[key].reshape(-1) for key, _ in shapes])


def unflatten_state_dict(flat: Tensor, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> StateDict:
    """The inverse of :func:`flatten_state_dict`: ``QNetwork.load_state_dict(unflatten(...))`` works."""
    out: StateDict = {}
    offset = 0
    for key, shape in shapes:
        size = math.prod(shape)
        out[key] = flat[offset:offset + size].reshape(shape)
        offset += size
    if offset != flat.shape[-1]:
        raise ValueError(f"flat parameter vector has {flat.shape[-1]} entries, QNetwork needs {offset}")
    return out


def functional_q(flat: Tensor, obs: Tensor, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> Tensor:
    """Q-values of T generated networks: flat [T, P] parameters, obs [T, B, obs_dim] -> [T, B, A].

    Exactly ``QNetwork`` with ``unflatten_state_dict(flat[t])`` applied to ``obs[t]``, differentiable in
    ``flat`` (a hypernetwork trains through it).
    """
    x = obs
    offset = 0
    n_layers = len(shapes) // 2
    for i in range(n_layers):
        (_, (out_f, in_f)), (_, (out_b,)) = shapes[2 * i], shapes[2 * i + 1]
        w = flat[:, offset:offset + out_f * in_f].view(-1, out_f, in_f)
        offset += out_f * in_f
        b = flat[:, offset:offset + out_b].unsqueeze(1)
        offset += out_b
        x = torch.baddbmm(b, x, w.transpose(1, 2))
        if i < n_layers - 1:
            x = torch.relu(x)
    return x
