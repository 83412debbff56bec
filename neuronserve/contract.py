"""The two-tower contract: stage, model and tensor names, written once.

A leaf module (imports nothing of ours). The compiler writes artifacts with these names, the
artifact loader checks them, the pipeline runs them, the servicers answer to them and the bench
sends them; any other spelling of them is a bug. Shapes (F_u, F_p, D, K from the manifest):
  user_tower  [B, F_u] -> [B, K, D]   (label weights folded in)
  peer_tower  [B, F_p] -> [B, K, D]
  pair_scorer [B, K, D] x 2 -> [B, K]  (sum over D, plus the label bias)
  tick graph  left [R, K, D], right [C, K, D], bias [K], weights [K] -> values [R, C]
              (one direction of the matching tick at a fixed block: docs/tick.md, "On NeuronCores")
"""

from __future__ import annotations

USER_TOWER = "user_tower"
PEER_TOWER = "peer_tower"
PAIR_SCORER = "pair_scorer"
STAGES: tuple[str, ...] = (USER_TOWER, PEER_TOWER, PAIR_SCORER)  # the pipelining stages, in order
TOWERS: tuple[str, ...] = (USER_TOWER, PEER_TOWER)  # UpsertEmbeddings and the OIP tower models

FUSED_STAGE = "twotower"  # the three stages as one graph (data parallelism), and the OIP model name
TWOTOWER = FUSED_STAGE
# The stages each OIP model runs (any one of them without a healthy core group: the model is not ready).
MODEL_STAGES: dict[str, frozenset[str]] = {
    TWOTOWER: frozenset(STAGES + (FUSED_STAGE,)),
    USER_TOWER: frozenset((USER_TOWER,)),
    PEER_TOWER: frozenset((PEER_TOWER,)),
}

# The tick's direction graph (neuron artifacts), one file per label space, at one fixed block shape:
# values[r, c] = sum_k w_k * f(<left[r, k], right[c, k]> + b_k), f = sigmoid (probability) or identity (logit).
TICK_GRAPH = "tick"
TICK_GRAPH_FILES: dict[str, str] = {"probability": "tick_probability.pt", "logit": "tick_logit.pt"}
TICK_BLOCK: tuple[int, int] = (512, 1024)  # (rows R, columns C) per execution; chosen in docs/tick.md

USER_FEATURES = "USER_FEATURES"  # OIP input  [1, F_u] float32
PEER_FEATURES = "PEER_FEATURES"  # OIP input  [M, F_p] float32
SCORES = "SCORES"  # OIP output [M, K] float32
