"""The matching tick's direction graph (neuron artifacts): one graph per label space at the fixed block
contract.TICK_BLOCK, traced for NeuronCores and checked against its eager module. The runtime runs it
per (row block, column tile) and does the selection on the host (docs/tick.md, "On NeuronCores").
"""

from __future__ import annotations

from pathlib import Path

import torch

from neuronserve.artifact import ModelConfig, sha256_file
from neuronserve.compile.graphs import PARITY_TOLERANCE, UNCHECKED, _parity, trace
from neuronserve.contract import TICK_BLOCK, TICK_GRAPH_FILES
from neuronserve.errors import ArtifactError


class TickDirection(torch.nn.Module):
    """values[r, c] = sum_k w_k * f(<left[r, k], right[c, k]> + b_k); f = sigmoid or the identity."""

    def __init__(self, probability: bool) -> None:
        super().__init__()
        self.probability = probability

    def forward(self, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor, weights: torch.Tensor):
        logits = torch.bmm(left.transpose(0, 1), right.permute(1, 2, 0)) + bias[:, None, None]  # [K, R, C]
        if self.probability:
            logits = torch.sigmoid(logits)
        return (logits * weights[:, None, None]).sum(0)


def tick_inputs(config: ModelConfig, block: tuple[int, int], generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random left [R, K, D], right [C, K, D], bias [K] and weights [K] at `block` = (R, C)."""
    k, d = config.num_labels, config.label_dim
    return (
        torch.randn(block[0], k, d, generator=generator) / d**0.5,
        torch.randn(block[1], k, d, generator=generator),
        torch.randn(k, generator=generator),
        torch.rand(k, generator=generator),
    )


def compile_tick(
    work: Path, config: ModelConfig, target: str, fast_math: str | None, files: dict[str, str], bar
) -> dict[str, str]:
    """Each label space's graph at TICK_BLOCK into `work` (hashed in `files`); {label space: file}."""
    generator = torch.Generator().manual_seed(2468)
    graphs: dict[str, str] = {}
    for space, file_name in TICK_GRAPH_FILES.items():
        bar.set_postfix_str(f"tick {space} {TICK_BLOCK[0]}x{TICK_BLOCK[1]}")
        module = TickDirection(space == "probability")
        with torch.no_grad():
            traced, _ = trace(module, tick_inputs(config, TICK_BLOCK, generator), target, 1, fast_math)
        torch.jit.save(traced, str(work / file_name))
        files[file_name] = sha256_file(work / file_name)
        error = _parity(traced, module, tick_inputs(config, TICK_BLOCK, generator), f"tick {space}", target)
        if error is not UNCHECKED and not error <= PARITY_TOLERANCE[target]:
            raise ArtifactError(
                f"parity check failed: the tick's {space} graph differs from its eager module by {error:.2e}"
            )
        graphs[space] = file_name
        bar.update(1)
    return graphs
