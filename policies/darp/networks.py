"""DARP's sub-networks, one class each (method.md, "Phase 2"; the decomposition follows the
recurrent attention model: glimpse network, core RNN, action network, locator).

Shapes use N for any leading batch dimensions (B or B x T), k patches of g x g pixels, D the
embedding size (64), H the core size (256), K the number of locator heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sketch_env.render import N_LEVELS


class ConvRetina(nn.Module):
    """A convolutional "what" for sharp glimpses: retina (N, k, g, g) -> (N, hidden).

    The k patches are the channels of a small CNN (two conv3x3-ReLU-maxpool2 blocks, 16 and 32
    channels) and a linear layer: shapes in a sharp fovea (g = 16 on a 128 x 128 render) are what a
    single linear layer over the pixels (the recurrent attention model's "what") reads poorly.
    """

    def __init__(self, retina_shape: tuple[int, int, int], hidden: int):
        super().__init__()
        k, g, _ = retina_shape
        if g < 4:
            raise ValueError(f"a conv retina needs patches of at least 4 x 4 pixels, got {g}")
        self.net = nn.Sequential(
            nn.Conv2d(k, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (g // 4) ** 2, hidden),
        )

    def forward(self, glimpse):
        lead = glimpse.shape[:-3]
        return self.net(glimpse.reshape(-1, *glimpse.shape[-3:])).reshape(*lead, -1)


class GlimpseNetwork(nn.Module):
    """What + where (+ when) -> g_t.

    Input:  glimpse (N, k, g, g) in [0, 1], location (N, 2) in [-1, 1], level (N,) long in [0, 17),
            sketch_embedding (N, D) (used only when `use_sketch_embedding`).
    Output: g_t (N, hidden).

    `use_sketch_embedding` adds the phase-1 embedding of the current partial sketch to every step's
    input (our extension; the paper uses it only to initialise h0). The level is always given: it tells
    the core how complete the sketch it is looking at is.

    `encoder`: "linear" reads the retina with one linear layer (the recurrent attention model),
    "conv" with `ConvRetina`.

    `attention=False` drops what and where (glimpse and location are ignored): g_t then depends on
    the partial sketch's phase-1 embedding and level only (the no-attention ablation and the
    policies of the vanilla-RL and PPO baselines).

    `local_size` > 0 (local match, issue 23): the "what" also reads `local` (N, local_size), the local
    descriptor at the glimpse's cell and the ink share of every cell (sketch_env.env's observation).
    """

    def __init__(self, retina_shape: tuple[int, int, int], embed_dim: int, hidden: int = 128,
                 use_sketch_embedding: bool = True, attention: bool = True, encoder: str = "linear",
                 local_size: int = 0):
        super().__init__()
        if not attention and not use_sketch_embedding:
            raise ValueError("a glimpse network without attention needs use_sketch_embedding=True (it would see the level only)")
        if encoder not in ("linear", "conv"):
            raise ValueError(f"retina encoder must be 'linear' or 'conv', got {encoder!r}")
        self.attention = attention
        self.flat_retina = encoder == "linear"
        retina_size = retina_shape[0] * retina_shape[1] * retina_shape[2]
        what = nn.Linear(retina_size, hidden) if encoder == "linear" else ConvRetina(tuple(retina_shape), hidden)
        self.what = what if attention else None
        self.where = nn.Linear(2, hidden) if attention else None
        self.when = nn.Embedding(N_LEVELS, hidden)
        self.sketch = nn.Linear(embed_dim, hidden) if use_sketch_embedding else None
        self.combine_what = nn.Linear(hidden, hidden) if attention else None
        self.combine_where = nn.Linear(hidden, hidden) if attention else None
        self.local = nn.Linear(local_size, hidden) if attention and local_size else None

    def forward(self, glimpse, location, level, sketch_embedding, local=None):
        context = self.when(level.long().clamp(0, N_LEVELS - 1))
        if self.sketch is not None:
            context = context + self.sketch(sketch_embedding)
        if not self.attention:
            return F.relu(context)
        what = self.what(glimpse.flatten(start_dim=-3) if self.flat_retina else glimpse)
        if self.local is not None:
            what = what + self.local(local)
        what = F.relu(what)
        where = F.relu(self.where(location))
        return F.relu(self.combine_what(what) + self.combine_where(where) + context)


class CoreNetwork(nn.Module):
    """h_t = RNN(h_{t-1}, g_t) over a (B, T) sequence.

    Input:  g (B, T, in_size), state {"h": (B, H)} (+ "c" for the LSTM), starts (B,) bool: the first
            step of the sequence is an episode start, so h0 is initialised from `init_embedding`
            (B, D) through a linear layer (method.md: h0 from the phase-1 sketch embedding), or zeros.
    Output: h (B, T, H), new state.
    """

    def __init__(self, in_size: int, embed_dim: int, hidden: int = 256, cell: str = "gru",
                 h0_init: str = "sketch"):
        super().__init__()
        if cell not in ("gru", "lstm"):
            raise ValueError(f"core cell must be 'gru' or 'lstm', got {cell!r}")
        if h0_init not in ("sketch", "zeros"):
            raise ValueError(f"h0_init must be 'sketch' or 'zeros', got {h0_init!r}")
        self.cell = cell
        self.hidden = hidden
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(in_size, hidden, batch_first=True)
        self.init = nn.Linear(embed_dim, hidden) if h0_init == "sketch" else None

    def initial_state(self) -> dict[str, torch.Tensor]:
        state = {"h": torch.zeros(self.hidden)}
        if self.cell == "lstm":
            state["c"] = torch.zeros(self.hidden)
        return state

    def forward(self, g, state, starts, init_embedding):
        h0 = state["h"]
        fresh = torch.tanh(self.init(init_embedding)) if self.init is not None else torch.zeros_like(h0)
        h0 = torch.where(starts[:, None], fresh, h0)
        if self.cell == "gru":
            out, h = self.rnn(g, h0.unsqueeze(0).contiguous())
            return out, {"h": h.squeeze(0)}
        c0 = torch.where(starts[:, None], torch.zeros_like(state["c"]), state["c"])
        out, (h, c) = self.rnn(g, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()))
        return out, {"h": h.squeeze(0), "c": c.squeeze(0)}


class ActionNetwork(nn.Module):
    """a_t = ACTN(h_t): the predicted final sketch embedding, L2-normalised like the gallery.

    Input: h (N, H), optionally base (N, D): then a_t = normalize(base + ACTN(h_t)), a correction of
    a given query. Output: (N, D) with unit norm (so every component lies in [-1, 1]).
    `zero_init` starts the last layer at zero, so an untrained network returns normalize(base)
    (the vanilla-RL and PPO baselines start from the phase-1 query and refine it).
    `dropout` drops units of h_t when `train=True` (the learner's forward only; sampling and
    evaluation never drop): the supervised term sees a few hundred photos, and the correction it
    learns overfits them within a few thousand updates without it.
    """

    def __init__(self, hidden: int, embed_dim: int, zero_init: bool = False, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))
        if zero_init:
            nn.init.zeros_(self.fc[-1].weight)
            nn.init.zeros_(self.fc[-1].bias)

    def forward(self, h, base=None, train: bool = False):
        if train and self.dropout:
            h = F.dropout(h, self.dropout, training=True)
        out = self.fc(h)
        return F.normalize(out if base is None else base + out, dim=-1)


class LocatorHeads(nn.Module):
    """K bootstrapped heads, each the mean of a Gaussian over the next location.

    Input: h (N, H), detached by the caller (the locator learns from the policy gradient only).
    Output: means (N, K, 2) in [-1, 1].
    """

    def __init__(self, hidden: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.fc = nn.Linear(hidden, 2 * n_heads)

    def forward(self, h):
        return torch.tanh(self.fc(h)).unflatten(-1, (self.n_heads, 2))


class ValueHead(nn.Module):
    """b_t, the value baseline of REINFORCE: expected return from h_t (detached), to cut the variance
    of the policy gradient. (N, H) -> (N,). (Not to be confused with policies.baselines.feature_policies, the comparison models.)"""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 1)

    def forward(self, h):
        return self.fc(h).squeeze(-1)
