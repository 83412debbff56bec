"""Shared fixtures: artifacts compiled once per test session (CPU target)."""

from __future__ import annotations

import pytest

from neuronserve.artifact import ModelConfig

SMALL_CONFIG = ModelConfig(
    user_features=16, peer_features=16, hidden_sizes=(32,), embedding_dim=32, num_labels=3, label_dim=16, label_names=("like", "chat", "match")
)
SMALL_BUCKETS = (1, 4, 16)


@pytest.fixture(scope="session")
def small_artifact(tmp_path_factory):
    """A small model (F=16, hidden 32, E=32, K=3, D=16) at buckets 1, 4, 16: cheap to split and pad."""
    from neuronserve.compile import compile_artifact

    return compile_artifact(tmp_path_factory.mktemp("small") / "artifact", config=SMALL_CONFIG, batch_sizes=SMALL_BUCKETS, seed=7)


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory):
    """The default demo model (F=64, hidden 256, E=128, K=4, D=64) at the default buckets."""
    from neuronserve.compile import compile_artifact

    return compile_artifact(tmp_path_factory.mktemp("demo") / "artifact", seed=0)
