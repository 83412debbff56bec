"""Frozen settings for cores, placement, batching and the server, validated with clear messages.

A leaf module: parsed once at start-up (server.py, the CLI) and handed down the request path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from neuronserve.contract import STAGES
from neuronserve.errors import ConfigError
from neuronserve.connection_balance import BALANCES
from neuronserve.sched_policy import POLICIES
from neuronserve.thread_placement import MODES as LOOP_CPU_MODES


def read_json_object(path, what: str) -> dict[str, Any]:
    """A JSON object from a settings file; `what` names it in the one-line error ("--model-config x.json")."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"{what}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a JSON object of settings, got {type(data).__name__}")
    return data


VISIBLE_CORES_ENV = "NEURON_RT_VISIBLE_CORES"  # the Neuron runtime's core range of a process


@dataclass(frozen=True)
class CoreGroup:
    """A contiguous range of NeuronCores, written as NEURON_RT_VISIBLE_CORES does: "2" or "0-3"."""

    first: int
    count: int = 1

    def __post_init__(self) -> None:
        if self.first < 0 or self.count < 1:
            raise ConfigError(f"core group needs first >= 0 and count >= 1, got first={self.first} count={self.count}")

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    @property
    def cores(self) -> range:
        return range(self.first, self.first + self.count)

    def visible_cores(self) -> str:
        """The value for NEURON_RT_VISIBLE_CORES."""
        return str(self.first) if self.count == 1 else f"{self.first}-{self.last}"

    def overlaps(self, other: CoreGroup) -> bool:
        return self.first <= other.last and other.first <= self.last

    @classmethod
    def parse(cls, text: str) -> CoreGroup:
        text = text.strip()
        try:
            if "-" in text:
                lo, hi = (int(part) for part in text.split("-", 1))
            else:
                lo = hi = int(text)
        except ValueError:
            raise ConfigError(
                f"core group {text!r} is not a contiguous range: write it as NEURON_RT_VISIBLE_CORES does, e.g. '2' or '0-3'"
            ) from None
        if hi < lo:
            raise ConfigError(f"core group {text!r} runs backwards: write the lower core first, e.g. '0-3'")
        return cls(first=lo, count=hi - lo + 1)

    def __str__(self) -> str:
        return self.visible_cores()


def parse_visible_cores(text: str) -> CoreGroup:
    """NEURON_RT_VISIBLE_CORES as the runtime accepts it: "2", "0-3" or a contiguous list "3,4,5,6"."""
    parts = [CoreGroup.parse(part) for part in text.split(",")]
    for before, after in zip(parts, parts[1:], strict=False):
        if after.first != before.last + 1:
            raise ConfigError(
                f"{VISIBLE_CORES_ENV}={text!r} is not contiguous; the Neuron runtime needs a contiguous range such as '0-3'"
            )
    return CoreGroup(parts[0].first, parts[-1].last - parts[0].first + 1)


@dataclass(frozen=True)
class Placement:
    """Which core groups run each stage. Several groups for one stage = data parallel replicas."""

    groups: dict[str, tuple[CoreGroup, ...]]

    @classmethod
    def data_parallel(cls, num_cores: int, group_size: int = 1, first: int = 0) -> Placement:
        """Default: every stage on every group of cores first..first+num_cores-1 (each group runs
        whichever stage comes next)."""
        if num_cores < 1:
            raise ConfigError(f"--cores must be at least 1, got {num_cores}")
        if group_size < 1 or num_cores % group_size:
            raise ConfigError(f"{num_cores} cores cannot be split into groups of {group_size} (pipeline cores)")
        groups = tuple(CoreGroup(core, group_size) for core in range(first, first + num_cores, group_size))
        return cls({stage: groups for stage in STAGES})

    @classmethod
    def parse(cls, text: str, num_cores: int, first: int = 0) -> Placement:
        """Parse "user_tower=0,peer_tower=1-2,pair_scorer=3" (a stage may repeat: replicas).

        Stages placed on distinct groups must not overlap; every group must lie inside the cores
        first..first+num_cores-1 (absolute core numbers, as in NEURON_RT_VISIBLE_CORES).
        """
        groups: dict[str, tuple[CoreGroup, ...]] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            stage, sep, group_text = item.partition("=")
            stage = stage.strip()
            if not sep or stage not in STAGES:
                raise ConfigError(f"placement item {item!r} must be STAGE=CORES with STAGE one of {', '.join(STAGES)}")
            group = CoreGroup.parse(group_text)
            if group in groups.get(stage, ()):
                raise ConfigError(f"placement lists {stage}={group} twice; list each replica once")
            groups[stage] = groups.get(stage, ()) + (group,)
        missing = [stage for stage in STAGES if stage not in groups]
        if missing:
            raise ConfigError(f"placement {text!r} places no core group for {', '.join(missing)}")
        placement = cls(groups)
        placement.validate(num_cores, first)
        return placement

    def validate(self, num_cores: int, first: int = 0) -> None:
        seen: list = []
        span = CoreGroup(first, num_cores)
        for stage, stage_groups in self.groups.items():
            for group in stage_groups:
                if group.first < span.first or group.last > span.last:
                    raise ConfigError(
                        f"placement puts {stage} on cores {group}, but this server has only cores {span} ({num_cores} cores)"
                    )
                for other_stage, other in seen:
                    if group != other and group.overlaps(other):
                        raise ConfigError(
                            f"placement overlaps: {stage} on cores {group} and {other_stage} on cores {other}"
                        )
                seen.append((stage, group))

    def all_groups(self) -> tuple[CoreGroup, ...]:
        """Distinct core groups, in core order."""
        return tuple(sorted({g for gs in self.groups.values() for g in gs}, key=lambda g: g.first))

    def __str__(self) -> str:
        return ",".join(f"{stage}={group}" for stage in STAGES for group in self.groups.get(stage, ()))


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching knobs (Triton's names where they exist)."""

    max_queue_delay_ms: float = 2.0
    max_queue_rows: int = 65536  # a memory bound; the latency bound is max_queue_wait_ms
    # refuse (RESOURCE_EXHAUSTED) a request whose queue ahead needs longer to drain: the matching tick
    # (~0.5 s) is lost by then anyway; a request with a deadline is held to its deadline instead
    max_queue_wait_ms: float = 500.0
    max_batch_rows: int | None = None  # None: the largest compiled bucket
    max_in_flight_batches: int | None = None  # None: one per core-group executor slot

    def __post_init__(self) -> None:
        if self.max_queue_delay_ms < 0:
            raise ConfigError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if not self.max_queue_wait_ms > 0:
            raise ConfigError(f"max_queue_wait_ms must be > 0, got {self.max_queue_wait_ms}")
        if self.max_queue_rows < 1:
            raise ConfigError(f"max_queue_rows must be >= 1, got {self.max_queue_rows}")
        if self.max_batch_rows is not None and self.max_batch_rows < 1:
            raise ConfigError(f"max_batch_rows must be >= 1, got {self.max_batch_rows}")
        if self.max_in_flight_batches is not None and self.max_in_flight_batches < 1:
            raise ConfigError(f"max_in_flight_batches must be >= 1, got {self.max_in_flight_batches}")


MAX_SIM_LATENCY_SCALE = 1e6  # beyond it the modelled times overflow the sim's arithmetic
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
MAX_PENDING_RPCS = 2**31 - 2  # N + 1, gRPC's hard bound, is one of its 32-bit integer options
MAX_GRPC_DURATION_S = (2**31 - 1) // 1000  # gRPC's millisecond options are 32-bit integers


@dataclass(frozen=True)
class SimConfig:
    """Settings of the simulated NeuronCores (the `sim` backend)."""

    num_cores: int = 4  # one Inferentia chip: inf1.xlarge / inf1.2xlarge
    latency_scale: float = 1.0  # multiplies the latency model (0 = as fast as the CPU runs)
    core_timeout_s: float = 5.0  # an execution past this is a hung core
    reset_s: float = 0.5  # a failed core is back in rotation after this

    def __post_init__(self) -> None:
        if self.num_cores < 1:
            raise ConfigError(f"sim num_cores must be >= 1, got {self.num_cores}")
        if not 0 <= self.latency_scale <= MAX_SIM_LATENCY_SCALE:
            raise ConfigError(
                f"sim latency_scale must be >= 0 and <= {MAX_SIM_LATENCY_SCALE:g}, got {self.latency_scale}"
            )
        if self.core_timeout_s <= 0 or self.reset_s < 0:
            raise ConfigError("sim core_timeout_s must be > 0 and reset_s >= 0")


# --inline-below's default for one serving process. A pool's workers default to 0 (never inline): each
# worker's event loop shares the CPUs with the others', so its own CPU time reads below the switch while
# it is already the bottleneck, and every batch ran on it (docs/benchmarks.md, 2026-12-05).
INLINE_BELOW = 0.75


@dataclass(frozen=True)
class ServerConfig:
    """Everything `neuronserve serve` needs; flags > config file > NEURONSERVE_* env > defaults."""

    artifact: str | None = None  # None: compile the demo model into the cache on first run
    backend: str = "auto"  # auto | cpu | sim | neuron
    cores: int | None = None  # None: the backend's default (backends.default_cores)
    placement: str | None = None  # None: data parallel over all cores
    workers: int | None = None  # serving processes sharing the port (1: no supervisor); None: backends.default_workers
    cpu_affinity: str = "none"  # none | split (each worker pinned to an even share of the usable CPUs)
    sched_policy: str = "batch"  # batch | normal: the serving threads' scheduling policy (sched_policy.py)
    loop_cpu: str = "auto"  # auto | off: one cpu process's loop and gRPC's poller on one CPU (thread_placement.py)
    connection_balance: str = "round-robin"  # round-robin | hash: a pool's new connections (connection_balance.py)
    worker_timeout_s: float = 10.0  # a worker whose event loop has not ticked for this long is replaced
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int | None = 8002
    max_peers: int = 4096
    max_tick_ids: int = 20_000  # ScoreTick: a pool's people (or users, or peers); docs/tick.md
    # RPCs in the server at once, gRPC's own limit: more are RESOURCE_EXHAUSTED before their body is read.
    # A bound on memory and on the work queued; near the in-flight need it also sheds overload (docs)
    max_concurrent_rpcs: int = 256
    # Calls queued inside gRPC's core that the event loop has not picked up yet: with N waiting, gRPC refuses
    # every new call at once (CANCELLED). None: gRPC's own bound (1,000, then some refused up to 3,000),
    # under which overload waits out its deadlines there. 64: a closed-loop client's 64 in flight
    # (perf_analyzer's) never refused, about 50 ms of the loop's calls at this host's capacity (README)
    max_pending_rpcs: int | None = 64
    # gRPC's send and receive limit; None: derived at start-up from the model and the limits above, the largest
    # legitimate request plus 25% (memory_budget.message_bytes; docs/memory.md)
    max_message_bytes: int | None = None
    # ScoreMatrix, ScoreMatrixStream and ScoreTick's working memory at once; a call that does not fit is
    # RESOURCE_EXHAUSTED at once. None: the largest legitimate call's (memory_budget.scoring_bytes)
    max_scoring_bytes: int | None = None
    grace_period_s: float = 10.0
    drain_delay_s: float = 0.0  # SIGTERM: health NOT_SERVING at once, requests still served this long, then the drain
    max_connection_age_s: float | None = None  # None: connections are never aged (GOAWAY after ~this long)
    tls_cert: str | None = None  # PEM certificate (chain): gRPC over TLS (tls.py checks the files at start-up)
    tls_key: str | None = None  # its PEM private key
    tls_client_ca: str | None = None  # mTLS: client certificates required, verified against these CAs
    admin_token_file: str | None = None  # the model repository RPCs need this file's bearer token (admin_auth.py)
    trusted_key: str | None = (
        None  # PEM public key(s): the artifact must be signed by one (artifact.load_manifest checks)
    )
    reflection: bool = True  # gRPC server reflection
    model_process: bool = False  # cpu backend: the fused graph in a process per core group (model_process.py)
    # cpu backend: a batch runs on the event loop while the loop, the graph on it, is busy less than this
    # share of the time (torch_launch.py, docs/pipeline.md); 0: always on torch's inter-op thread; None:
    # INLINE_BELOW for one process, 0 for a pool's workers (inline_share)
    inline_below: float | None = None
    # the interpreter's thread switch interval (sys.setswitchinterval; Python's default 5 ms): a model thread
    # retaking the GIL behind the busy event loop waits at most this long each time (docs/benchmarks.md)
    gil_switch_ms: float = 0.1
    cache_max_rows: int = 1_000_000
    embedding_store: str = (
        "embedded"  # or redis://HOST:PORT/DB: the fleet's shared store (fleet.py), checked by settings
    )
    model_repository: str | None = None  # DIR/<model>/<version>/ (repository.py); None: --artifact as one version
    model_control: str = "none"  # none | explicit (RepositoryModelLoad/Unload) | poll (rescan every repository_poll_s)
    version_policy: str = "latest:1"  # latest[:N] | all | specific:V1,V2 (repository.VersionPolicy.parse)
    repository_poll_s: float = 5.0  # --model-control poll: seconds between rescans
    experiment: str | None = None  # JSON spec of an A/B or switch-back between two versions (experiments.py)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    sim: SimConfig = field(default_factory=SimConfig)

    def __post_init__(self) -> None:
        self._check_process()
        self._check_limits()
        self._check_security()
        self._check_repository()

    def inline_share(self) -> float:
        """--inline-below as set, else INLINE_BELOW (a pool's supervisor sets 0 for its workers)."""
        return INLINE_BELOW if self.inline_below is None else self.inline_below

    def _check_process(self) -> None:
        _require(
            self.backend in ("auto", "cpu", "sim", "neuron"),
            f"backend must be one of auto, cpu, sim, neuron; got {self.backend!r}",
        )
        _require(0 <= self.port <= 65535, f"port must be 0-65535, got {self.port}")
        _require(
            self.metrics_port is None or 0 <= self.metrics_port <= 65535,
            f"metrics_port must be 0-65535, got {self.metrics_port}",
        )
        _require(self.cores is None or self.cores >= 1, f"cores must be >= 1, got {self.cores}")
        _require(self.workers is None or self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        _require(
            self.cpu_affinity in ("none", "split"), f"cpu_affinity must be none or split, got {self.cpu_affinity!r}"
        )
        _require(self.sched_policy in POLICIES, f"sched_policy must be batch or normal, got {self.sched_policy!r}")
        _require(self.loop_cpu in LOOP_CPU_MODES, f"loop_cpu must be auto or off, got {self.loop_cpu!r}")
        _require(
            self.connection_balance in BALANCES,
            f"connection_balance must be round-robin or hash, got {self.connection_balance!r}",
        )
        _require(self.worker_timeout_s > 0, f"worker_timeout_s must be > 0, got {self.worker_timeout_s}")
        _require(
            self.inline_below is None or 0 <= self.inline_below < 1,
            f"inline_below must be >= 0 and < 1, got {self.inline_below}",
        )
        _require(0 < self.gil_switch_ms <= 100, f"gil_switch_ms must be > 0 and <= 100, got {self.gil_switch_ms}")
        _require(
            self.placement is None or (self.workers or 1) == 1,
            "placement and workers > 1 do not combine: each worker serves its cores data parallel; drop one",
        )
        _require(isinstance(self.reflection, bool), f"reflection must be on or off, got {self.reflection!r}")

    def _check_limits(self) -> None:
        _require(self.max_peers >= 1, f"max_peers must be >= 1, got {self.max_peers}")
        _require(self.max_tick_ids >= 1, f"max_tick_ids must be >= 1, got {self.max_tick_ids}")
        _require(self.max_concurrent_rpcs >= 1, f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        _require(
            self.max_pending_rpcs is None or 1 <= self.max_pending_rpcs <= MAX_PENDING_RPCS,
            f"max_pending_rpcs must be >= 1 and <= {MAX_PENDING_RPCS}, or unset (gRPC's own bound); got {self.max_pending_rpcs}",
        )
        _require(
            self.max_message_bytes is None or 1024 <= self.max_message_bytes <= MAX_GRPC_MESSAGE_BYTES,
            f"max_message_bytes must be >= 1024 and <= {MAX_GRPC_MESSAGE_BYTES} (gRPC's limit), or unset; "
            f"got {self.max_message_bytes}",
        )
        _require(
            self.max_scoring_bytes is None or self.max_scoring_bytes >= 1,
            f"max_scoring_bytes must be >= 1, or unset; got {self.max_scoring_bytes}",
        )
        _require(self.grace_period_s >= 0, f"grace_period_s must be >= 0, got {self.grace_period_s}")
        _require(self.cache_max_rows >= 1, f"cache_max_rows must be >= 1, got {self.cache_max_rows}")
        _require(self.drain_delay_s >= 0, f"drain_delay_s must be >= 0, got {self.drain_delay_s}")
        age_s = self.max_connection_age_s
        _require(
            age_s is None or 0.001 <= age_s <= MAX_GRPC_DURATION_S,
            f"max_connection_age_s must be >= 0.001 and <= {MAX_GRPC_DURATION_S} (gRPC's limit), or off; got {age_s}",
        )

    def _check_security(self) -> None:
        # the files must be readable too: checked at start-up (tls.load_tls, load_manifest, admin_auth)
        for name in ("tls_cert", "tls_key", "tls_client_ca", "trusted_key", "admin_token_file"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, str) and bool(value.strip())),
                f"{name} must be a file path, got {value!r}",
            )
        loopback = self.host in ("localhost", "::1") or self.host.startswith("127.")
        guarded = loopback or self.admin_token_file is not None or self.tls_client_ca is not None
        _require(
            self.model_control == "none" or guarded,
            f"model_control {self.model_control} on {self.host} would let anyone who can connect load and unload "
            "models: pass --admin-token-file FILE (or --tls-client-ca for mTLS), or listen on loopback",
        )

    def _check_repository(self) -> None:
        from neuronserve.repository import VersionPolicy

        _require(
            self.model_control in ("none", "explicit", "poll"),
            f"model_control must be none, explicit or poll, got {self.model_control!r}",
        )
        _require(
            self.model_control == "none" or self.model_repository is not None,
            "model_control explicit or poll needs a model repository: pass --model-repository DIR",
        )
        _require(
            self.model_repository is None or self.artifact is None,
            "artifact and model_repository do not combine: serve one artifact or a repository of versions",
        )
        _require(
            self.model_repository is None or self.embedding_store == "embedded",
            "model_repository keeps a cache per version in this server's memory; the fleet store holds one "
            "model version: use embedding_store embedded with a repository",
        )
        VersionPolicy.parse(self.version_policy)
        _require(
            self.experiment is None or self.model_repository is not None,
            "experiment needs a model repository serving both of its versions: pass --model-repository DIR",
        )
        _require(self.repository_poll_s > 0, f"repository_poll_s must be > 0, got {self.repository_poll_s}")


def _require(ok: bool, message: str) -> None:
    """A ConfigError with `message` unless `ok`."""
    if not ok:
        raise ConfigError(message)
