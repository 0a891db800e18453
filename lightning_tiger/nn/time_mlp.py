"""Default network of the diffusion / flow modules on vector data: a residual MLP conditioned on time."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_tiger.nn.time_embedding import TimeEmbedding


class _ResidualBlock(nn.Module):
    """h + W2·SiLU(W1·SiLU(LN(h)) + Wt·temb): pre-norm residual block with an additive time shift."""

    def __init__(self, hidden_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, hidden_dim)
        self.time = nn.Linear(cond_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        z = self.fc1(self.act(self.norm(h))) + self.time(cond)
        return h + self.fc2(self.act(z))


class TimeMLP(nn.Module):
    """``forward(x [batch, data_dim], t [batch]) -> [batch, data_dim]``: residual MLP with a time embedding.

    x → Linear(data_dim, hidden) → ``depth`` pre-LayerNorm residual blocks, each shifted by a projection of
    MLP(TimeEmbedding(t)) → Linear(hidden, data_dim). The output layer starts at zero so an untrained model
    predicts zero noise / velocity (a stable start, as in DDPM/EDM implementations). There is deliberately no
    final normalisation: the residual stream stays linear in x far from the data (block outputs are bounded),
    so noise / velocity predictions can grow like the exact ones (ε̂ ≈ x at t ≈ 1) for prior draws in the
    tails. A final LayerNorm caps the output and sent ≈ 1% of probability-flow ODE samples (|x_T| > 3) off to
    |x| ≈ 40 on moons.

    Args:
        data_dim: d, default 2.
        hidden_dim: width, default 256.
        depth: number of residual blocks, default 3.
        time_dim: sinusoidal time features, default 64.
    """

    def __init__(self, data_dim: int = 2, hidden_dim: int = 256, depth: int = 3, time_dim: int = 64) -> None:
        super().__init__()
        for name, value, low in (("data_dim", data_dim, 1), ("hidden_dim", hidden_dim, 1), ("depth", depth, 1),
                                 ("time_dim", time_dim, 2)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.data_dim = data_dim
        self.time_embedding = TimeEmbedding(time_dim)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.input = nn.Linear(data_dim, hidden_dim)
        self.blocks = nn.ModuleList(_ResidualBlock(hidden_dim, hidden_dim) for _ in range(depth))
        self.output = nn.Linear(hidden_dim, data_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x ``[batch, data_dim]``, t ``[batch]`` (or 0-d, broadcast) → ``[batch, data_dim]``."""
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"x must have shape [batch, {self.data_dim}], got {tuple(x.shape)}")
        cond = self.time_mlp(self.time_embedding.conditioning(t, x.shape[0], self.input.weight.dtype))
        h = self.input(x)
        for block in self.blocks:
            h = block(h, cond)
        return self.output(h)
