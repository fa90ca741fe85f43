"""Small built-in models (`zoo:NAME`) for the quickstart, the tests and the benchmarks.

Each entry carries its default inputs and loss, so `model: {source: zoo:mlp}` is a complete spec.
Sizes are set by kwargs; weights are random (memory and speed do not depend on them).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from batchprobe.sources.base import BuiltModel, DefaultLoss, InputDefaults, Source, call_factory
from batchprobe.spec import Spec


class _Checkpointable(nn.Module):
    """Runs `self.blocks` one after another, recomputing each in backward when enabled."""

    blocks: nn.ModuleList

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class MLP(_Checkpointable):
    """Fully connected classifier: in_features -> depth x (Linear, GELU) -> num_classes."""

    def __init__(
        self, in_features: int = 784, hidden: int = 1024, depth: int = 3, num_classes: int = 10
    ) -> None:
        super().__init__()
        dims = [in_features] + [hidden] * depth
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.GELU()) for a, b in itertools.pairwise(dims)
        )
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.run_blocks(x.flatten(1)))


class CNN(_Checkpointable):
    """Conv-BatchNorm-ReLU stages, each halving the resolution, then pooling and a linear head."""

    def __init__(
        self, in_channels: int = 3, width: int = 32, depth: int = 3, num_classes: int = 10
    ) -> None:
        super().__init__()
        blocks = []
        channels = in_channels
        for i in range(depth):
            out = width * 2**i
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(out, out, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                )
            )
            channels = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_blocks(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_2(x))


class GPT(_Checkpointable):
    """A small decoder-only transformer (GPT-2 layout, pre-norm, tied embeddings)."""

    def __init__(
        self,
        vocab_size: int = 4096,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(_Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        return self.lm_head(self.ln_f(self.run_blocks(x)))


class LSTMClassifier(nn.Module):
    """Recurrent sequence classifier: token embedding -> stacked LSTM -> the last step's state
    -> num_classes. On the CPU its LSTM runs oneDNN's kernel, whose workspace a fake-tensor trace
    does not see: the model on which a trace is most wrong."""

    def __init__(
        self,
        vocab_size: int = 1000,
        embed: int = 128,
        hidden: int = 256,
        num_layers: int = 2,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


class Encoder(nn.Module):
    """A Transformer encoder sequence classifier, torch's own layers (`nn.TransformerEncoder`:
    post-norm, ReLU, dropout): token and position embeddings -> n_layer layers -> the mean over
    positions -> num_classes."""

    def __init__(
        self,
        vocab_size: int = 8000,
        seq_len: int = 128,
        d_model: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_head, dim_feedforward, dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds seq_len {self.seq_len}")
        x = self.embed(ids) + self.pos(torch.arange(t, device=ids.device))
        return self.head(self.encoder(x).mean(1))


class LinearRegression(nn.Module):
    """y = w.x: the model of the noise-scale example (its gradient noise is known exactly)."""

    def __init__(self, in_features: int = 32) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


@dataclass(frozen=True)
class ZooEntry:
    factory: Callable[..., nn.Module]
    inputs: Callable[[Mapping[str, Any]], InputDefaults]
    loss: DefaultLoss
    summary: str


def _kw(kwargs: Mapping[str, Any], cls: type, name: str) -> Any:
    default = inspect.signature(cls).parameters[name].default
    return kwargs.get(name, default)


ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(
        MLP,
        lambda kw: InputDefaults(
            kind="tensor",
            shape=(_kw(kw, MLP, "in_features"),),
            num_classes=_kw(kw, MLP, "num_classes"),
        ),
        "cross_entropy",
        "fully connected classifier (in_features, hidden, depth, num_classes)",
    ),
    "cnn": ZooEntry(
        CNN,
        lambda kw: InputDefaults(
            kind="image",
            shape=(_kw(kw, CNN, "in_channels"), 32, 32),
            num_classes=_kw(kw, CNN, "num_classes"),
        ),
        "cross_entropy",
        "conv + BatchNorm image classifier, 32x32 inputs (in_channels, width, depth, num_classes)",
    ),
    "gpt": ZooEntry(
        GPT,
        lambda kw: InputDefaults(
            kind="tokens",
            seq_len=_kw(kw, GPT, "block_size"),
            vocab_size=_kw(kw, GPT, "vocab_size"),
            max_seq_len=_kw(kw, GPT, "block_size"),
        ),
        "cross_entropy",
        "decoder-only transformer (vocab_size, block_size, n_layer, n_head, n_embd, dropout)",
    ),
    "lstm": ZooEntry(
        LSTMClassifier,
        lambda kw: InputDefaults(
            kind="tokens",
            seq_len=128,
            vocab_size=_kw(kw, LSTMClassifier, "vocab_size"),
            num_classes=_kw(kw, LSTMClassifier, "num_classes"),
        ),
        "cross_entropy",
        "LSTM sequence classifier, 128 tokens (vocab_size, embed, hidden, num_layers, num_classes)",
    ),
    "encoder": ZooEntry(
        Encoder,
        lambda kw: InputDefaults(
            kind="tokens",
            seq_len=_kw(kw, Encoder, "seq_len"),
            vocab_size=_kw(kw, Encoder, "vocab_size"),
            num_classes=_kw(kw, Encoder, "num_classes"),
            max_seq_len=_kw(kw, Encoder, "seq_len"),
        ),
        "cross_entropy",
        "Transformer encoder sequence classifier (vocab_size, seq_len, d_model, n_layer, n_head, "
        "dim_feedforward, dropout, num_classes)",
    ),
    "linreg": ZooEntry(
        LinearRegression,
        lambda kw: InputDefaults(
            kind="tensor",
            shape=(_kw(kw, LinearRegression, "in_features"),),
            target_shape=(),
        ),
        "mse",
        "linear regression y = w.x (in_features); the noise-scale example",
    ),
}


def build(name: str, kwargs: Mapping[str, Any], spec: Spec) -> BuiltModel:
    from batchprobe.sources.base import unknown_name

    entry = ZOO.get(name)
    if entry is None:
        raise unknown_name("the zoo", name, list(ZOO), prefix="zoo:")
    module = call_factory(entry.factory, kwargs, f"zoo:{name}")
    enable = getattr(module, "set_gradient_checkpointing", None)
    return BuiltModel(module, entry.inputs(kwargs), entry.loss, enable)


SOURCE = Source("zoo", "built-in models: " + ", ".join(ZOO), build)
