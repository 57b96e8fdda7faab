"""GRU and LSTM sequence autoencoders over sliding windows.

Both kinds share one config and one forward contract::

    x (B, W, F) --encoder RNN--> h_W (B, H) --linear--> z (B, L)
    z repeated W times (B, W, L) --decoder RNN (h0 = tanh(linear(z)))--> (B, W, H) --linear--> x_hat (B, W, F)

The gate equations are PyTorch's ``nn.GRU`` / ``nn.LSTM``. ``model_cost`` counts parameters and
multiply-accumulates per window so the two kinds can be compared (a GRU has 3 gate blocks, an LSTM 4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

__all__ = [
    "MODEL_KINDS",
    "ModelConfig",
    "ModelCost",
    "SequenceAutoencoder",
    "GRUAutoencoder",
    "LSTMAutoencoder",
    "build_model",
    "model_cost",
]

MODEL_KINDS = ("gru", "lstm")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint."""

    kind: str = "gru"  # "gru" | "lstm"
    n_features: int = 1  # F
    window: int = 64  # W
    hidden_size: int = 64  # H
    num_layers: int = 1
    latent_size: int = 16  # L
    dropout: float = 0.0  # between stacked RNN layers (only when num_layers > 1)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        for name in ("n_features", "window", "hidden_size", "num_layers", "latent_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        drop = self.dropout
        if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0.0 <= drop < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"ModelConfig must be a dict of fields, got {d!r:.80}")
        known = {f.name for f in fields(cls)}
        unknown, missing = set(d) - known, known - set(d)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
        if missing:  # a default would stand in silently: the window, which no weight's shape shows, say
            raise ValueError(f"ModelConfig keys missing: {sorted(missing)}")
        return cls(**d)


@dataclass(frozen=True)
class ModelCost:
    params: int
    macs_per_window: int

    @property
    def flops_per_window(self) -> int:
        return 2 * self.macs_per_window


class SequenceAutoencoder(nn.Module):
    """Encoder RNN -> latent -> decoder RNN -> linear; subclasses pick the RNN cell."""

    rnn_class: type[nn.RNNBase] = nn.GRU

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        drop = cfg.dropout if cfg.num_layers > 1 else 0.0
        H, L = cfg.hidden_size, cfg.latent_size
        self.encoder = self.rnn_class(cfg.n_features, H, cfg.num_layers, batch_first=True, dropout=drop)
        self.to_latent = nn.Linear(H, L)
        self.from_latent = nn.Linear(L, H * cfg.num_layers)
        self.decoder = self.rnn_class(L, H, cfg.num_layers, batch_first=True, dropout=drop)
        self.output = nn.Linear(H, cfg.n_features)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, F) -> latent (B, L)."""
        _, state = self.encoder(x)
        h = state[0] if isinstance(state, tuple) else state  # (layers, B, H)
        return self.to_latent(h[-1])  # (B, L)

    def decode(self, z: torch.Tensor, window: int) -> torch.Tensor:
        """latent (B, L) -> reconstruction (B, W, F)."""
        B = z.shape[0]
        layers, H = self.cfg.num_layers, self.cfg.hidden_size
        h0 = torch.tanh(self.from_latent(z)).view(B, layers, H).transpose(0, 1).contiguous()  # (layers, B, H)
        state = (h0, torch.zeros_like(h0)) if self.rnn_class is nn.LSTM else h0
        inputs = z.unsqueeze(1).expand(B, window, z.shape[1])  # (B, W, L)
        out, _ = self.decoder(inputs, state)  # (B, W, H)
        return self.output(out)  # (B, W, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x.shape[1])


class GRUAutoencoder(SequenceAutoencoder):
    rnn_class = nn.GRU


class LSTMAutoencoder(SequenceAutoencoder):
    rnn_class = nn.LSTM


_CLASSES: dict[str, type[SequenceAutoencoder]] = {"gru": GRUAutoencoder, "lstm": LSTMAutoencoder}
_GATES = {"gru": 3, "lstm": 4}


def build_model(cfg: ModelConfig) -> SequenceAutoencoder:
    """The one factory: a model of ``cfg.kind`` built from ``cfg``."""
    return _CLASSES[cfg.kind](cfg)


def model_cost(cfg: ModelConfig) -> ModelCost:
    """Parameter count and multiply-accumulates per window (matmuls only; gate nonlinearities not counted)."""
    G, H, W = _GATES[cfg.kind], cfg.hidden_size, cfg.window
    F, L, layers = cfg.n_features, cfg.latent_size, cfg.num_layers

    def rnn_macs(n_in: int) -> int:  # per time step, all layers
        return G * H * (n_in + H) + (layers - 1) * G * H * (H + H)

    macs = W * rnn_macs(F)  # encoder
    macs += H * L + L * H * layers  # to_latent, from_latent
    macs += W * rnn_macs(L)  # decoder
    macs += W * H * F  # output projection
    params = sum(p.numel() for p in build_model(cfg).parameters())
    return ModelCost(params=params, macs_per_window=macs)
