"""The human-readable summary of an artifact: `neuronserve inspect` and the compile report."""

from __future__ import annotations

from neuronserve.artifact import BucketEntry, Manifest, StageSpec, worst_error
from neuronserve.contract import FUSED_STAGE, STAGES


def summary_lines(manifest: Manifest) -> list[str]:
    """Human-readable summary, for `neuronserve inspect` and the compile report."""
    cfg = manifest.model_config
    lines = [
        f"artifact   {manifest.directory}",
        f"model      {manifest.model_name} version {manifest.model_version} (schema {manifest.schema_version})",
        f"target     {manifest.target}  pipeline_cores={manifest.pipeline_cores}  compiler_args={' '.join(manifest.compiler_args) or '-'}",
        f"torch      {manifest.torch_version}"
        + (f"  torch-neuron {manifest.torch_neuron_version}" if manifest.torch_neuron_version else ""),
        f"config     F_u={cfg.user_features} F_p={cfg.peer_features} hidden={list(cfg.hidden_sizes)} E={cfg.embedding_dim} K={cfg.num_labels} D={cfg.label_dim}",
        f"labels     {', '.join(manifest.label_names)}",
    ]
    for name in STAGES:
        spec = manifest.stages[name]
        lines.append(f"stage      {name}: {_signature(spec)}")
        for b in spec.buckets:
            lines.append(f"             batch {b.batch_size:>5}  {b.file}  parity max|err|={b.parity_max_abs_err:.2e}")
    if manifest.has_fused_stage:
        spec = manifest.stages[FUSED_STAGE]
        lines.append(f"stage      {FUSED_STAGE} (fused, U user rows): {_signature(spec)}")
        files: dict[tuple[int, str], list[BucketEntry]] = {}
        for b in spec.buckets:  # one line per B and file: its user batches (a cpu file serves them all)
            files.setdefault((b.batch_size, b.file), []).append(b)
        for (batch, file), entries in files.items():
            users = ",".join(str(b.user_batch_size) for b in entries)
            worst = worst_error(b.parity_max_abs_err for b in entries)
            lines.append(
                f"             batch {batch:>5}  users {users:<{_users_width(spec)}}  {file}  parity max|err|={worst:.2e}"
            )
    else:
        lines.append(
            f"stage      {FUSED_STAGE}: not in this artifact (compiled before the fused graph); served as three stages"
        )
    lines.append(f"parity     max |err| {manifest.max_parity_error():.2e} (tolerance {manifest.parity_tolerance:.0e})")
    lines.append(f"files      {len(manifest.files) + 1} verified by sha256")
    if manifest.signature is not None:
        lines.append(f"signature  {manifest.signature.describe()}")
    return lines


def _signature(spec: StageSpec) -> str:
    ins = ", ".join(f"{t.name}{list(t.shape)}" for t in spec.inputs)
    outs = ", ".join(f"{t.name}{list(t.shape)}" for t in spec.outputs)
    return f"({ins}) -> ({outs})"


def _users_width(spec: StageSpec) -> int:
    return max(len(",".join(map(str, spec.user_batch_sizes(b)))) for b in spec.batch_sizes)
