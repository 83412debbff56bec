"""The two-tower scorer: the only place the architecture lives (compile side; the runtime never imports it).

    user features [B, F_u] -> MLP -> u [B, E] -> K projections -> u_k [B, K, D]
    peer features [B, F_p] -> MLP -> p [B, E] -> K projections -> p_k [B, K, D]
    score_k = w_k * <u_k, p_k> + b_k            probability_k = sigmoid(score_k)

`stages()` splits a model into the three graphs model pipelining needs: user_tower (w_k folded into
u_k, so scoring is a plain dot product), peer_tower and pair_scorer (sum(u * p, -1) + b). `fused()`
is the same three as one graph for data parallelism: U user rows, B peer rows and a user index [B]
in, scores [B, K] out, so the user vectors are gathered on the device, not copied per peer on the host.
"""

from __future__ import annotations


import torch
from torch import nn

from neuronserve.artifact import ModelConfig
from neuronserve.contract import PAIR_SCORER, PEER_TOWER, USER_TOWER


class Tower(nn.Module):
    """MLP over dense float32 features, then K linear projections of size D (one Linear of K*D outputs)."""

    def __init__(self, in_features: int, config: ModelConfig) -> None:
        super().__init__()
        layers = []
        width = in_features
        for hidden in config.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, config.embedding_dim))
        self.mlp = nn.Sequential(*layers)
        self.projections = nn.Linear(config.embedding_dim, config.num_labels * config.label_dim)
        self.num_labels = config.num_labels
        self.label_dim = config.label_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        projected = self.projections(self.mlp(features))
        return projected.reshape(features.shape[0], self.num_labels, self.label_dim)


class TwoTowerScorer(nn.Module):
    """The trained model as a checkpoint holds it: two towers plus per-label weight w and bias b."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.user_tower = Tower(config.user_features, config)
        self.peer_tower = Tower(config.peer_features, config)
        self.label_weight = nn.Parameter(torch.ones(config.num_labels))
        self.label_bias = nn.Parameter(torch.zeros(config.num_labels))

    def forward(self, user_features: torch.Tensor, peer_features: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] for B (user, peer) pairs."""
        u = self.user_tower(user_features)
        p = self.peer_tower(peer_features)
        return self.label_weight * (u * p).sum(-1) + self.label_bias

    def stages(self) -> dict[str, nn.Module]:
        return {
            USER_TOWER: _ScaledTower(self.user_tower, self.label_weight),
            PEER_TOWER: self.peer_tower,
            PAIR_SCORER: PairScorer(self.label_bias),
        }

    def fused(self) -> FusedScorer:
        """The artifact's fused stage: the three stages of `stages()` composed, the gather included."""
        stages = self.stages()
        return FusedScorer(stages[USER_TOWER], stages[PEER_TOWER], stages[PAIR_SCORER])


class _ScaledTower(nn.Module):
    """The user tower with w_k folded in: u_k * w_k."""

    def __init__(self, tower: Tower, label_weight: nn.Parameter) -> None:
        super().__init__()
        self.tower = tower
        self.label_weight = label_weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.tower(features) * self.label_weight.unsqueeze(-1)


class PairScorer(nn.Module):
    """([B, K, D], [B, K, D]) -> [B, K]: per-label dot product plus bias (w_k is already in u_k)."""

    def __init__(self, label_bias: nn.Parameter) -> None:
        super().__init__()
        self.label_bias = label_bias

    def forward(self, user: torch.Tensor, peer: torch.Tensor) -> torch.Tensor:
        return (user * peer).sum(-1) + self.label_bias


class FusedScorer(nn.Module):
    """(users [U, F_u], peers [B, F_p], user_index [B] int64) -> logits [B, K]: user_tower ->
    index_select(user_index) -> pair_scorer against peer_tower, in one graph. index_select (which
    torch-neuron compiles for the NeuronCore) gathers each peer's user vector on the device."""

    def __init__(self, user_tower: nn.Module, peer_tower: nn.Module, pair_scorer: nn.Module) -> None:
        super().__init__()
        self.user_tower = user_tower
        self.peer_tower = peer_tower
        self.pair_scorer = pair_scorer

    def forward(
        self, user_features: torch.Tensor, peer_features: torch.Tensor, user_index: torch.Tensor
    ) -> torch.Tensor:
        user = self.user_tower(user_features).index_select(0, user_index)
        return self.pair_scorer(user, self.peer_tower(peer_features))


def random_model(config: ModelConfig, seed: int) -> TwoTowerScorer:
    """A randomly initialised model (demos and tests); label weights and biases random too, so they matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TwoTowerScorer(config)
    with torch.no_grad():
        model.label_weight.copy_(torch.rand(config.num_labels, generator=generator) + 0.5)
        model.label_bias.copy_(torch.randn(config.num_labels, generator=generator) * 0.1)
    return model.eval()
