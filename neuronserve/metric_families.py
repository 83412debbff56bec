"""Every metric family neuronserve exports: name -> (type, help), and the one record a collector yields.

A leaf module. Triton's names and semantics where they exist (cumulative counters, per model and version; `model` is
twotower (Score, OIP twotower), user_tower / peer_tower (UpsertEmbeddings, OIP towers) or
twotower_cached (ScoreByIds, ScoreMatrix: cached tower outputs); `version` is the artifact's version,
the content hash unless compile named one):
  nv_inference_request_success / nv_inference_request_failure{reason}  requests answered OK / not;
      reason is the gRPC status name (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, CANCELLED, ...)
  nv_inference_count            inferences (rows: peers scored, tower rows) in executed batches
  nv_inference_exec_count       executions (batches; a cached-embedding request is one execution)
  nv_inference_request_duration_us       summed over successful requests, in the server
  nv_inference_queue_duration_us         summed over requests: batch start - arrival (the batcher's)
  nv_inference_compute_input_duration_us / _infer_ / _output_   summed over requests: the time the batch
      each was in spent preparing inputs / running / extracting outputs (every request of a batch is
      charged its batch's times, as Triton charges the requests of a dynamic batch)
  nv_inference_pending_request_count     requests queued now (gauge)
Triton's counters have no `_total` (prometheus-cpp's text); prometheus-client appends `_total` to every
counter's HELP/TYPE lines, so render_samples puts Triton's names back on those two lines.
neuronserve_* for the rest (`_total` = counter), among them neuronserve_request_duration_seconds: a
histogram per model of successful requests' time in the server (LATENCY_BUCKETS_S, 0.5 ms .. 1 s around
a 100 ms budget), so P99 is histogram_quantile(0.99, ...) server-side. process_* are prometheus-client's
ProcessCollector's (Linux /proc) plus process_threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]

# Upper bounds of neuronserve_request_duration_seconds, seconds: fine below 10 ms (the unloaded P50 is a
# few ms), exact at the 100 ms budget (le="0.1": the fraction within budget), up to 1 s.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
)

# Every metric family: name -> (type, help).
FAMILIES: dict[str, tuple[str, str]] = {
    "nv_inference_request_success": ("counter", "Successful inference requests"),
    "nv_inference_request_failure": ("counter", "Failed inference requests, by gRPC status"),
    "nv_inference_count": ("counter", "Inferences performed (rows in executed batches)"),
    "nv_inference_exec_count": ("counter", "Model executions (batches) performed"),
    "nv_inference_request_duration_us": (
        "counter",
        "Cumulative successful request duration in the server, microseconds",
    ),
    "nv_inference_queue_duration_us": ("counter", "Cumulative queue duration over requests, microseconds"),
    "nv_inference_compute_input_duration_us": (
        "counter",
        "Cumulative compute input duration over requests, microseconds",
    ),
    "nv_inference_compute_infer_duration_us": ("counter", "Cumulative compute duration over requests, microseconds"),
    "nv_inference_compute_output_duration_us": (
        "counter",
        "Cumulative compute output duration over requests, microseconds",
    ),
    "nv_inference_pending_request_count": ("gauge", "Requests queued, not yet in a batch"),
    "neuronserve_request_duration_seconds": ("histogram", "Successful requests' time in the server, seconds"),
    "neuronserve_requests_total": (
        "counter",
        "Requests routed to a version, by model, integer version, arm (default, control, candidate, explicit) and status",
    ),
    "neuronserve_batch_rows": ("histogram", "Rows per executed batch"),
    "neuronserve_queue_rows": ("gauge", "Rows queued, not yet in a batch"),
    "neuronserve_in_flight_batches": ("gauge", "Batches running now"),
    "neuronserve_rejected_total": ("counter", "Requests the batcher refused, by reason"),
    "neuronserve_cancelled_total": ("counter", "Queued requests dropped because their caller went away"),
    "neuronserve_batch_failed_total": ("counter", "Requests failed by an error in their batch"),
    "neuronserve_core_group_busy_seconds_total": ("counter", "Seconds a core group spent running executions"),
    "neuronserve_core_group_executions_total": ("counter", "Executions completed on a core group"),
    "neuronserve_core_group_inline_executions_total": (
        "counter",
        "Of a core group's executions, those run on the event loop (the cpu backend at low load)",
    ),
    "neuronserve_sim_core_device_seconds_total": (
        "counter",
        "sim backend: seconds of (simulated) device time a core ran",
    ),
    "neuronserve_core_group_faults_total": ("counter", "Core faults on a core group"),
    "neuronserve_core_group_healthy": ("gauge", "1 while the core group is in rotation"),
    "neuronserve_stage_executions_total": ("counter", "Executions of a stage (each at one compiled bucket)"),
    "neuronserve_stage_rows_total": ("counter", "Caller rows run by a stage"),
    "neuronserve_stage_padded_rows_total": ("counter", "Padding rows added to reach compiled buckets"),
    "neuronserve_cache_rows": ("gauge", "Cached tower outputs, by kind"),
    "neuronserve_cache_max_rows": ("gauge", "Cache bound per kind (rows)"),
    "neuronserve_cache_bytes": ("gauge", "Bytes held by the embedding cache"),
    "neuronserve_cache_hits_total": ("counter", "Looked-up ids found in the cache"),
    "neuronserve_cache_misses_total": ("counter", "Looked-up ids not in the cache"),
    "neuronserve_cache_evictions_total": ("counter", "Rows evicted to stay within the bound"),
    "neuronserve_embedding_store_up": (
        "gauge",
        "--embedding-store: 1 while this host's copy follows the shared store, 0 while the store is unreachable (the copy is stale)",
    ),
    "neuronserve_embedding_store_stale_seconds": (
        "gauge",
        "--embedding-store: seconds since the local copy was last known current (0 while following)",
    ),
    "neuronserve_embedding_store_last_contact_timestamp_seconds": (
        "gauge",
        "--embedding-store: unix time the store last answered (stale since then while it is down)",
    ),
    "neuronserve_embedding_store_loading": (
        "gauge",
        "--embedding-store: 1 while the rows are being loaded (warm start or reload)",
    ),
    "neuronserve_embedding_store_rows_loaded": ("gauge", "--embedding-store: rows applied by the current or last load"),
    "neuronserve_embedding_store_load_seconds": (
        "gauge",
        "--embedding-store: duration of the last load (so far, while loading)",
    ),
    "neuronserve_embedding_store_changes_applied_total": (
        "counter",
        "--embedding-store: change-stream entries (upserts) applied to the local copy",
    ),
    "neuronserve_embedding_store_reloads_total": (
        "counter",
        "--embedding-store: full reloads after missed changes or a reset store",
    ),
    "neuronserve_metrics_renders_total": (
        "counter",
        "/metrics pages rendered (this one included); concurrent scrapes share one",
    ),
    "neuronserve_metrics_scrapes_total": (
        "counter",
        "/metrics scrapes by result: rendered (started a render), shared (joined one), rejected (503)",
    ),
    "process_cpu_seconds_total": ("counter", "Total user and system CPU time spent in seconds."),
    "process_resident_memory_bytes": ("gauge", "Resident memory size in bytes."),
    "process_virtual_memory_bytes": ("gauge", "Virtual memory size in bytes."),
    "process_start_time_seconds": ("gauge", "Start time of the process since unix epoch in seconds."),
    "process_open_fds": ("gauge", "Number of open file descriptors."),
    "process_max_fds": ("gauge", "Maximum number of open file descriptors."),
    "process_threads": ("gauge", "Threads of the server process"),
    "neuronserve_child_cpu_seconds_total": (
        "counter",
        "User and system CPU time of the server's child processes (--model-process), live and exited",
    ),
    "neuronserve_model_loads_total": (
        "counter",
        "Model repository: version loads by outcome (loaded, failed) and versions unloaded",
    ),
    "neuronserve_model_version_served": (
        "gauge",
        "Model repository: 1 for each integer version served, by version and whether it is the default (current)",
    ),
    "neuronserve_worker_up": ("gauge", "workers: 1 while the worker serves (ready and alive)"),
    "neuronserve_worker_restarts_total": ("counter", "workers: times the worker was restarted"),
    "neuronserve_worker_requests_total": (
        "counter",
        "workers: requests the worker answered (any status), since it last started",
    ),
}


@dataclass(frozen=True)
class Sample:
    """One line of the exposition: a family in FAMILIES, its labels and value."""

    name: str
    labels: Labels
    value: float
    suffix: str = ""  # "_bucket", "_sum", "_count" for histogram lines


Collector = Callable[[], Iterable[Sample]]
