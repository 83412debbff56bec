"""Each subsystem's stats as metric samples, read when Prometheus scrapes: batchers, core groups and
stages, the simulated cores, the embedding cache, and this process (prometheus-client's ProcessCollector)."""

from __future__ import annotations

from prometheus_client import ProcessCollector

from neuronserve.metric_families import FAMILIES, Labels, Sample


def batcher_samples(model: str, version: str, stats) -> list[Sample]:
    """From a batcher.BatcherStats of the batcher in front of `model`."""
    mv: Labels = (("model", model), ("version", version))
    return [
        Sample("nv_inference_queue_duration_us", mv, stats.queue_s_total * 1e6),
        Sample("nv_inference_pending_request_count", mv, stats.queued_requests),
        Sample("neuronserve_queue_rows", mv, stats.queued_rows),
        Sample("neuronserve_in_flight_batches", mv, stats.in_flight_batches),
        Sample("neuronserve_rejected_total", mv + (("reason", "overload"),), stats.rejected_overload),
        Sample("neuronserve_rejected_total", mv + (("reason", "deadline"),), stats.rejected_deadline),
        Sample("neuronserve_cancelled_total", mv, stats.cancelled),
        Sample("neuronserve_batch_failed_total", mv, stats.failed),
    ]


def pipeline_samples(stats) -> list[Sample]:
    """From a pipeline.PipelineStats: per core group and per stage."""
    out: list[Sample] = []
    for g in stats.groups:
        labels: Labels = (("cores", g.cores), ("stages", ",".join(g.stages)))
        out += [
            Sample("neuronserve_core_group_busy_seconds_total", labels, g.busy_s),
            Sample("neuronserve_core_group_executions_total", labels, g.executions),
            Sample("neuronserve_core_group_inline_executions_total", labels, g.inline_executions),
            Sample("neuronserve_core_group_faults_total", labels, g.faults),
            Sample("neuronserve_core_group_healthy", labels, 1 if g.healthy else 0),
        ]
    for stage, s in stats.stages.items():
        labels = (("stage", stage),)
        out += [
            Sample("neuronserve_stage_executions_total", labels, s.executions),
            Sample("neuronserve_stage_rows_total", labels, s.rows),
            Sample("neuronserve_stage_padded_rows_total", labels, s.padded_rows),
        ]
    return out


def sim_samples(stats) -> list[Sample]:
    """From a backends.sim.SimStats: per simulated core, the device seconds it ran (latency_scale
    applied: wall seconds of device time), so busy fraction = its rate of increase."""
    return [
        Sample("neuronserve_sim_core_device_seconds_total", (("core", str(c.core)),), c.busy_s * stats.latency_scale)
        for c in stats.cores
    ]


def cache_samples(stats) -> list[Sample]:
    """From an embeddings.CacheStats."""
    version: Labels = (("version", stats.model_version),)
    return [
        Sample("neuronserve_cache_rows", version + (("kind", "user"),), stats.user_rows),
        Sample("neuronserve_cache_rows", version + (("kind", "peer"),), stats.peer_rows),
        Sample("neuronserve_cache_max_rows", version, stats.max_rows),
        Sample("neuronserve_cache_bytes", version, stats.bytes),
        Sample("neuronserve_cache_hits_total", version, stats.hits),
        Sample("neuronserve_cache_misses_total", version, stats.misses),
        Sample("neuronserve_cache_evictions_total", version, stats.evictions),
    ]


_PROCESS = ProcessCollector(registry=None)  # process_cpu_seconds_total, _resident_memory_bytes, ... (Linux /proc)


def process_samples(children: bool = True) -> list[Sample]:
    """This process's figures: prometheus-client's ProcessCollector (psutil where it has no /proc),
    process_threads (every OS thread, gRPC's too) and, with `children`, neuronserve_child_cpu_seconds_total
    (a pool's supervisor leaves it out: its children are the workers, whose CPU each reports itself)."""
    import psutil

    process = psutil.Process()
    out = [
        Sample(s.name, tuple(s.labels.items()), s.value)
        for family in _PROCESS.collect()
        for s in family.samples
        if s.name in FAMILIES
    ]
    if not out:  # no /proc: the two figures the benchmark reads
        cpu = process.cpu_times()
        out = [
            Sample("process_cpu_seconds_total", (), cpu.user + cpu.system),
            Sample("process_resident_memory_bytes", (), process.memory_info().rss),
        ]
    out.append(Sample("process_threads", (), process.num_threads()))
    if children:
        out.append(Sample("neuronserve_child_cpu_seconds_total", (), _children_cpu_s(process)))
    return out


def _children_cpu_s(process) -> float:
    """CPU seconds of the live children plus those already reaped (the model processes)."""
    import psutil

    own = process.cpu_times()
    total = own.children_user + own.children_system
    for child in process.children():
        try:
            times = child.cpu_times()
        except psutil.Error:  # exited meanwhile: counted once reaped
            continue
        total += times.user + times.system
    return total
