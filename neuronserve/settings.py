"""Settings for `neuronserve serve`: flags > --config FILE.json > NEURONSERVE_* environment variables >
the dataclass defaults (config.ServerConfig). Every setting is declared once in SETTINGS (flag, file key,
variable, parser, help); a bad value is a ConfigError naming where it came from.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Mapping

from neuronserve.config import BatchingConfig, ServerConfig, SimConfig, read_json_object
from neuronserve.errors import ConfigError

log = logging.getLogger(__name__)

ENV_PREFIX = "NEURONSERVE_"
# NEURONSERVE_* variables that are not settings (KERNELS: native.py, the compiled kernels on or off)
OTHER_ENV = ("CONFIG", "CACHE_DIR", "VENV", "KERNELS", "TOOLS", "PINS_VENV")  # run.sh's, the kernels', the tests'
_DISABLED = ("", "none", "off", "-", "disabled")


def _integer(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {value!r}") from None


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


_ON = ("on", "true", "yes", "1")
_OFF = ("off", "false", "no", "0")


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _ON + _OFF:
        return value.strip().lower() in _ON
    raise ValueError(f"expected on or off, got {value!r}")


def _store_url(value: Any) -> str:
    from neuronserve.fleet_store import parse_store_url

    return parse_store_url(_text(value))


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in _DISABLED):
            return None
        return parse(value)

    return parse_optional


@dataclass(frozen=True)
class _Setting:
    """One setting: config-file key `key`, flag --key-with-dashes, environment NEURONSERVE_KEY. It sets
    SimConfig.<key without sim_> for sim_* keys, BatchingConfig.<key> for its fields, else ServerConfig.<key>."""

    key: str
    parse: Callable[[Any], Any]
    metavar: str
    help: str

    @property
    def section(self) -> str:
        if self.key.startswith("sim_"):
            return "sim"
        return "batching" if self.key in BatchingConfig.__dataclass_fields__ else "server"

    @property
    def field(self) -> str:
        return self.key[len("sim_") :] if self.section == "sim" else self.key

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()


SETTINGS: tuple[_Setting, ...] = (
    _Setting(
        "artifact",
        _optional(_text),
        "DIR",
        "compiled artifact directory (default: the demo model, compiled for the CPU on first run)",
    ),
    _Setting(
        "backend",
        _text,
        "NAME",
        "auto | cpu | sim | neuron (auto: neuron when torch-neuron and a NeuronCore are here and the artifact was compiled for neuron, else cpu)",
    ),
    _Setting(
        "cores",
        _integer,
        "N",
        "NeuronCores to use, over all workers (neuron: the NEURON_RT_VISIBLE_CORES range when set, else 4, one Inferentia chip; sim: cores simulated, default 4; cpu: executor threads, default one per usable CPU less one per worker for its event loop)",
    ),
    _Setting(
        "workers",
        _optional(_integer),
        "N",
        "serving processes sharing the gRPC port, each owning an even share of the cores (1: one process, no supervisor; default: cpu 1, neuron and sim one per 4 cores while each keeps 4 host CPUs)",
    ),
    _Setting(
        "cpu_affinity",
        _text,
        "MODE",
        "workers: 'split' pins each worker to an even share of the usable CPUs; 'none' leaves them unpinned",
    ),
    _Setting(
        "sched_policy",
        _text,
        "POLICY",
        "'batch' (default) runs the serving threads under Linux SCHED_BATCH, so a thread woken in a busy server does not preempt the running one at once (torch's threads keep the default); 'normal' keeps the kernel's default policy everywhere (docs/workers.md)",
    ),
    _Setting(
        "loop_cpu",
        _text,
        "MODE",
        "'auto' (default) puts one serving process's event loop and gRPC's poller thread on one CPU (the highest usable one) on the cpu backend with 2 or more CPUs, so the poller's wake-ups of the loop do not cross CPUs; the other threads keep every CPU; 'off' leaves them unpinned; pool workers are not pinned (docs/workers.md)",
    ),
    _Setting(
        "connection_balance",
        _text,
        "MODE",
        "workers: 'round-robin' (default) deals new connections to the workers in turn, by an eBPF program on the shared port (needs CAP_BPF or root; else a warning and the kernel's hash); 'hash' leaves the choice to the kernel's hash of the connection's addresses (docs/workers.md)",
    ),
    _Setting(
        "worker_timeout_s",
        _number,
        "S",
        "an event loop that has not turned for this long: a pool's worker is killed and replaced, a single process exits 3 (watchdog.py)",
    ),
    _Setting(
        "placement",
        _text,
        "SPEC",
        "stage placement, e.g. user_tower=0,peer_tower=1-2,pair_scorer=3 (default: data parallel)",
    ),
    _Setting("host", _text, "HOST", "address to listen on"),
    _Setting("port", _integer, "PORT", "gRPC port, 0 = any free port"),
    _Setting("metrics_port", _optional(_integer), "PORT", "Prometheus /metrics port, 0 = any, 'off' = none"),
    _Setting("max_peers", _integer, "M", "most peers (and users) per scoring request"),
    _Setting("max_tick_ids", _integer, "N", "most people in a ScoreTick pool (or users, or peers)"),
    _Setting(
        "max_concurrent_rpcs",
        _integer,
        "N",
        "RPCs in the server at once; more get RESOURCE_EXHAUSTED at once (grpcio >= 1.62; older: they wait)",
    ),
    _Setting(
        "max_pending_rpcs",
        _optional(_integer),
        "N",
        "calls waiting inside gRPC for the event loop: with N waiting, every new one is refused at once (CANCELLED, before the loop sees it); default 64 (a client's 64 in flight never refused); off: gRPC's own 1,000, under which overload waits out its deadlines in gRPC (README)",
    ),
    _Setting(
        "max_message_bytes",
        _optional(_integer),
        "BYTES",
        "gRPC max send/receive message size (1024 to 2**31 - 1); default: the largest legitimate request plus 25%%, in whole MiB, from the model and --max-peers, --max-queue-rows, --max-tick-ids (logged at start-up with the memory budget; docs/memory.md)",
    ),
    _Setting(
        "max_scoring_bytes",
        _optional(_integer),
        "BYTES",
        "working memory of ScoreMatrix, ScoreMatrixStream and ScoreTick at once; a call that does not fit is RESOURCE_EXHAUSTED at once (default: the largest legitimate call's; docs/memory.md)",
    ),
    _Setting("grace_period_s", _number, "S", "shutdown: seconds to answer accepted requests"),
    _Setting(
        "drain_delay_s",
        _number,
        "S",
        "shutdown: on SIGTERM health goes NOT_SERVING at once but requests are still served this long (so load balancers and Kubernetes endpoints stop sending first), then the drain; a second signal cuts it short",
    ),
    _Setting(
        "max_connection_age_s",
        _optional(_number),
        "S",
        "close each client connection (GOAWAY) after about this long, its calls given the grace period, so clients rebalance over new replicas; 'off' = never",
    ),
    _Setting(
        "tls_cert", _optional(_text), "FILE", "serve gRPC over TLS with this PEM certificate (chain); needs --tls-key"
    ),
    _Setting("tls_key", _optional(_text), "FILE", "the PEM private key (unencrypted) of --tls-cert"),
    _Setting(
        "tls_client_ca",
        _optional(_text),
        "FILE",
        "mTLS: require a client certificate signed by a CA in this PEM file (needs --tls-cert)",
    ),
    _Setting(
        "admin_token_file",
        _optional(_text),
        "FILE",
        "the model repository RPCs (index, load, unload) need metadata 'authorization: Bearer <token>' with the token in this file (one line, >= 16 bytes); needed for --model-control on a non-loopback --host unless --tls-client-ca is set",
    ),
    _Setting(
        "trusted_key",
        _optional(_text),
        "FILE",
        "refuse an artifact not signed (manifest.sig) by a key in this PEM file of Ed25519 public keys (one or more, concatenated; `neuronserve keygen` makes a pair); unset: integrity checks only",
    ),
    _Setting("reflection", _switch, "on|off", "gRPC server reflection"),
    _Setting(
        "model_process",
        _switch,
        "on|off",
        "cpu backend: run each core group's fused graph in a process of its own, fed through shared memory from the event loop (no executor thread waiting for the GIL: docs/benchmarks.md)",
    ),
    _Setting(
        "inline_below",
        _number,
        "SHARE",
        "cpu backend: run a batch on the event loop while the loop, the graph on it, is busy less than this share of the time (fewer thread wake-ups at low load); torch's thread again from this + 0.1; 0: never; default 0.75 for one process, 0 for each worker of --workers N > 1 and for one process with one usable CPU (docs/pipeline.md)",
    ),
    _Setting(
        "gil_switch_ms",
        _number,
        "MS",
        "the interpreter's thread switch interval: how long a model thread waits for the GIL behind the event loop, at most, each time it retakes it (Python's default: 5)",
    ),
    _Setting("cache_max_rows", _integer, "ROWS", "embedding cache bound per kind"),
    _Setting(
        "embedding_store",
        _store_url,
        "URL",
        "'embedded' (the in-process cache only) or redis://HOST:PORT/DB: a shared store every replica writes upserts to and follows into its local cache, loaded before SERVING (docs/fleet.md)",
    ),
    _Setting(
        "model_repository",
        _optional(_text),
        "DIR",
        "a model repository, DIR/<model>/<integer version>/ each an artifact (Triton's layout), instead of --artifact; one model directory",
    ),
    _Setting(
        "model_control",
        _text,
        "MODE",
        "none | explicit (Triton's RepositoryModelLoad/Unload switch versions while serving) | poll (rescan the repository every --repository-poll-s)",
    ),
    _Setting(
        "version_policy",
        _text,
        "POLICY",
        "versions of the repository's model to serve: latest, latest:N, all or specific:V1,V2; requests naming no version get the highest",
    ),
    _Setting("repository_poll_s", _number, "S", "--model-control poll: seconds between rescans of the repository"),
    _Setting(
        "experiment",
        _optional(_text),
        "FILE",
        'JSON spec of an experiment between two versions of --model-repository, e.g. {"design": "ab", "control": 1, "candidate": 2, "share": 0.1} or {"design": "switchback", "control": 1, "candidate": 2, "seed": 7, "window_s": 1800, "burn_in_s": 300, "start": UNIX_S}; requests naming no version are routed by it (docs/lifecycle.md)',
    ),
    _Setting("max_queue_delay_ms", _number, "MS", "batching delay bound from the oldest queued request"),
    _Setting(
        "max_queue_rows",
        _integer,
        "ROWS",
        "queue bound in rows (memory); past it RESOURCE_EXHAUSTED at once (one request above it: INVALID_ARGUMENT)",
    ),
    _Setting(
        "max_queue_wait_ms",
        _number,
        "MS",
        "queue bound in time: a request whose queue ahead needs longer to drain is RESOURCE_EXHAUSTED at once",
    ),
    _Setting("max_batch_rows", _optional(_integer), "ROWS", "rows per batch (default: the largest compiled bucket)"),
    _Setting(
        "max_in_flight_batches",
        _optional(_integer),
        "N",
        "batches in flight per batcher (default: the pipeline's executor slots; 1 in each worker of a cpu pool and in one cpu process with one usable CPU, docs/pipeline.md)",
    ),
    _Setting(
        "sim_latency_scale", _number, "X", "sim backend: multiply the device latency model (0 = as fast as the CPU)"
    ),
    _Setting("sim_core_timeout_s", _number, "S", "sim backend: an execution past this is a hung core"),
    _Setting("sim_reset_s", _number, "S", "sim backend: a faulted core is back in rotation after this"),
)
_SECTIONS = {"server": ServerConfig, "batching": BatchingConfig, "sim": SimConfig}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag (raw strings: resolve_config parses them and names the flag on error)."""
    parser.add_argument(
        "--config",
        metavar="FILE.json",
        default=None,
        help=f"JSON object of settings (keys: the flag names with _); env {ENV_PREFIX}CONFIG",
    )
    for setting in SETTINGS:
        default = getattr(_SECTIONS[setting.section](), setting.field)
        shown = (
            "" if default is None else f" (default {('off', 'on')[default] if isinstance(default, bool) else default})"
        )
        parser.add_argument(
            setting.flag, dest=setting.key, metavar=setting.metavar, help=f"{setting.help}{shown}; env {setting.env}"
        )


def resolve_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """ServerConfig from flags > --config file > NEURONSERVE_* environment > defaults. A bad value is a
    ConfigError naming where it came from (the flag, the file and key, or the variable)."""
    sections = _parsed_sections(_raw_values(args, os.environ if environ is None else environ))
    return ServerConfig(
        **sections["server"], batching=BatchingConfig(**sections["batching"]), sim=SimConfig(**sections["sim"])
    )


def _raw_values(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """key -> (raw value, where it came from), the later sources overriding the earlier."""
    values: dict[str, tuple[Any, str]] = {}
    for setting in SETTINGS:
        if setting.env in environ:
            values[setting.key] = (environ[setting.env], f"environment variable {setting.env}")
    known = {s.env for s in SETTINGS} | {ENV_PREFIX + name for name in OTHER_ENV}
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known):
        log.warning("ignoring environment variable %s: not a neuronserve setting (a typo?)", name)
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        for key, value in _read_config_file(config_path).items():
            values[key] = (value, f"config file {config_path}, key {key!r}")
    for setting in SETTINGS:
        value = getattr(args, setting.key, None)
        if value is not None:
            values[setting.key] = (value, setting.flag)
    return values


def _parsed_sections(values: dict[str, tuple[Any, str]]) -> dict[str, dict[str, Any]]:
    """section -> field -> parsed value, each checked alone by its dataclass; errors name the source. A
    value refused alone but accepted with the others (a rule across settings, such as --model-control
    explicit needing --model-repository) is kept: the whole config is checked again when it is built."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    refused: list[tuple[str, str, ConfigError]] = []  # (section, source, error) of values refused alone
    for setting in SETTINGS:
        if setting.key not in values:
            continue
        raw, source = values[setting.key]
        try:
            parsed = setting.parse(raw)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
        try:
            _SECTIONS[setting.section](**{setting.field: parsed})  # the dataclass's own checks, for this value alone
        except (ValueError, ConfigError) as exc:
            refused.append((setting.section, source, ConfigError(str(exc))))
        sections[setting.section][setting.field] = parsed
    for section, source, alone in refused:
        try:
            _SECTIONS[section](**sections[section])
        except (ValueError, ConfigError):
            raise ConfigError(f"{source}: {alone}") from None
    return sections


def _read_config_file(path: str) -> dict[str, Any]:
    data = read_json_object(path, f"config file {path}")
    known = {s.key for s in SETTINGS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {unknown}; known keys: {', '.join(sorted(known))}")
    return data
