"""Beyla, Tempo, Pyroscope and Loki configs, checked against the documented configuration of the pinned versions.

None of the four can run here (Beyla needs kprobes; Tempo, Pyroscope and Loki are AGPL images only run
in compose), so this is what can honestly be checked without them: the files parse, every key is one
the pinned version documents (Beyla even ignores unknown keys silently, so a typo would simply
switch a feature off), enum values are accepted ones, and the settings this stack relies on are set.
The allow-lists are transcribed from the sources named above each, at the versions in
DOCUMENTED_VERSIONS; extend them from the same sources when a config needs a new key, and re-check
them when an image is upgraded (a test fails until DOCUMENTED_VERSIONS matches .env again).
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import pytest
import yaml
from stackfiles import REPO_ROOT, app_routes, compose, dotenv, named_volumes, service_ports

pytestmark = pytest.mark.unit

# The versions whose documentation the allow-lists below were transcribed from (tags of the upstream
# repositories). A copy of .env's values on purpose: upgrading an image must make someone re-read the
# new version's config reference.
DOCUMENTED_VERSIONS = {"BEYLA_VERSION": "3.33.0", "TEMPO_VERSION": "2.10.8", "PYROSCOPE_VERSION": "2.2.1",
                       "LOKI_VERSION": "3.7.6"}


def key_paths(node, prefix: str = "") -> set[str]:
    """Dotted paths of every key; list items are written `[]`."""
    paths = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths.add(path)
            paths |= key_paths(value, path)
    elif isinstance(node, list):
        for item in node:
            paths |= key_paths(item, prefix + "[]")
    return paths


def unknown_keys(config: dict, allowed: set[str], free_form: tuple[str, ...] = ()) -> set[str]:
    """Keys not in `allowed`; below a `free_form` prefix anything goes (maps passed through as is)."""
    return {
        path
        for path in key_paths(config)
        if path not in allowed and not any(path.startswith(prefix + ".") for prefix in free_form)
    }


def load(relative: str) -> dict:
    return yaml.safe_load((REPO_ROOT / relative).read_text())


def test_allow_lists_were_checked_against_the_pinned_versions():
    env = dotenv()
    stale = {key: (documented, env[key]) for key, documented in DOCUMENTED_VERSIONS.items() if env[key] != documented}
    assert not stale, (
        f"images upgraded since the allow-lists were checked (documented, pinned): {stale}; re-read the "
        "config reference of the new version, update the allow-lists, then DOCUMENTED_VERSIONS"
    )


def test_key_paths_and_unknown_keys_do_what_the_tests_rely_on():
    config = {"a": {"b": [{"c": 1}], "free": {"x": {"y": 2}}}, "typo": 0}
    assert key_paths(config) == {"a", "a.b", "a.b[].c", "a.free", "a.free.x", "a.free.x.y", "typo"}
    assert unknown_keys(config, {"a", "a.b", "a.b[].c", "a.free"}, ("a.free",)) == {"typo"}


# --- Beyla -------------------------------------------------------------------------------------------
# grafana/beyla, docs/config-schema.json (generated from the config structs, checked in CI there):
# properties of the root, BeylaDiscoveryConfig, GlobAttributes (discovery.instrument[]), RoutesConfig,
# GlobalMetricsConfig and PrometheusConfig.
BEYLA_ROOT = {
    "attributes", "channel_buffer_len", "channel_send_timeout", "channel_send_timeout_panic", "discovery", "ebpf",
    "enforce_sys_caps", "executable_name", "filter", "grafana", "health_check", "injector", "internal_metrics",
    "javaagent", "jvm_runtime_metrics", "log_config", "log_format", "log_level", "metrics", "name_resolver",
    "network", "nodejs", "open_port", "otel_metrics_export", "otel_traces_export", "processes", "profile_port",
    "prometheus_export", "routes", "service_name", "service_namespace", "shutdown_timeout", "sigil_export", "stats",
    "target_pids", "topology", "trace_printer",
}  # fmt: skip
BEYLA_DISCOVERY = {
    "bpf_pid_filter_off", "default_exclude_instrument", "default_exclude_services", "default_otlp_grpc_port",
    "disabled_route_harvesters", "exclude_instrument", "exclude_otel_instrumented_services",
    "exclude_otel_instrumented_services_span_metrics", "exclude_services", "excluded_linux_system_paths",
    "instrument", "min_process_age", "poll_interval", "process_context_poll_interval",
    "route_harvester_advanced", "route_harvester_timeout", "services", "skip_go_specific_tracers", "survey",
}  # fmt: skip
BEYLA_INSTRUMENT = {
    "cmd_args", "container_name", "containers_only", "exe_path", "exports", "k8s_container_name",
    "k8s_cronjob_name", "k8s_daemonset_name", "k8s_deployment_name", "k8s_job_name", "k8s_namespace",
    "k8s_owner_name", "k8s_pod_annotations", "k8s_pod_labels", "k8s_pod_name", "k8s_replicaset_name",
    "k8s_statefulset_name", "languages", "metrics", "name", "namespace", "open_ports", "routes", "sampler",
    "target_pids",
}  # fmt: skip
BEYLA_ROUTES = {
    "ignore_mode", "ignored_patterns", "max_path_segment_cardinality", "patterns", "unmatched", "wildcard_char",
}  # fmt: skip
BEYLA_METRICS = {"features"}
# `features` is left out on purpose: it is the deprecated spelling of metrics.features, and it silently
# overrides metrics.features when set (pkg/beyla/config.go, normalizeConfig).
BEYLA_PROMETHEUS = {
    "allow_service_graph_self_references", "buckets", "disable_build_info", "exemplar_filter",
    "extra_resource_attributes", "extra_span_resource_attributes", "instrumentations", "native_histogram", "path",
    "port", "service_cache_size", "ttl",
}  # fmt: skip
# Buckets (prometheus_export.buckets) of the same schema: bounds per histogram family.
BEYLA_BUCKETS = {
    "duration_histogram", "gen_ai_client_operation_duration_histogram", "gen_ai_client_token_usage_histogram",
    "request_size_histogram", "response_size_histogram",
}  # fmt: skip
BEYLA_ALLOWED = (
    BEYLA_ROOT
    | {f"discovery.{k}" for k in BEYLA_DISCOVERY}
    | {f"discovery.instrument[].{k}" for k in BEYLA_INSTRUMENT}
    | {f"routes.{k}" for k in BEYLA_ROUTES}
    | {f"metrics.{k}" for k in BEYLA_METRICS}
    | {f"prometheus_export.{k}" for k in BEYLA_PROMETHEUS}
    | {f"prometheus_export.buckets.{k}" for k in BEYLA_BUCKETS}
)
# Enums of the same schema: RoutesConfig.unmatched, RoutesConfig.ignore_mode, Features.
BEYLA_UNMATCHED = {"heuristic", "low-cardinality", "path", "unset", "wildcard"}
BEYLA_IGNORE_MODE = {"all", "metrics", "traces"}
BEYLA_FEATURES = {
    "*", "all", "application", "application_host", "application_process", "application_runtime",
    "application_service_graph", "application_span", "application_span_otel", "application_span_sizes", "ebpf",
    "network", "network_flow_packets", "network_inter_zone", "stats", "stats_tcp_failed_connections", "stats_tcp_io",
    "stats_tcp_retransmits", "stats_tcp_rtt",
}  # fmt: skip


@pytest.fixture(scope="module")
def beyla() -> dict:
    return load("beyla/beyla-config.yaml")


def test_beyla_uses_only_documented_keys(beyla):
    assert not unknown_keys(beyla, BEYLA_ALLOWED), "not in the pinned Beyla's config schema"


def test_beyla_key_check_catches_a_typo(beyla):
    broken = dict(beyla, discovery={**beyla["discovery"], "exclude_otel_instrumented_service": False})
    assert unknown_keys(broken, BEYLA_ALLOWED) == {"discovery.exclude_otel_instrumented_service"}


def test_beyla_keeps_watching_an_app_that_exports_otlp(beyla):
    # Default true: Beyla would drop the app's metrics as soon as the SDK exports.
    assert beyla["discovery"]["exclude_otel_instrumented_services"] is False


def test_beyla_selects_the_app_by_its_port(beyla):
    app_ports = service_ports(compose()["services"]["app"])
    selected = {int(p) for entry in beyla["discovery"]["instrument"] for p in str(entry["open_ports"]).split(",")}
    assert selected == app_ports


def test_beyla_routes_are_the_apps_routes(beyla):
    routes = beyla["routes"]
    assert set(routes["patterns"]) == app_routes() == {"/", "/health", "/fail"}
    assert "/metrics" in routes["ignored_patterns"]
    assert routes["ignore_mode"] in BEYLA_IGNORE_MODE and routes["ignore_mode"] != "traces"
    assert routes["unmatched"] in BEYLA_UNMATCHED


def test_beyla_exports_red_and_process_metrics_for_prometheus(beyla):
    features = set(beyla["metrics"]["features"])
    assert features <= BEYLA_FEATURES
    assert {"application", "application_process"} <= features
    assert "features" not in beyla["prometheus_export"]
    assert beyla["prometheus_export"]["port"] in service_ports(compose()["services"]["beyla"])


def test_beyla_settings_live_in_its_config_file_only():
    # Beyla reads BEYLA_* / OTEL_EBPF_* variables too; the same setting in two places would drift.
    environment = compose()["services"]["beyla"].get("environment") or {}
    assert not [key for key in environment if key.startswith(("BEYLA_", "OTEL_EBPF_", "OTEL_"))]


# --- Tempo -------------------------------------------------------------------------------------------
# grafana/tempo: root keys are the yaml tags of cmd/tempo/app/config.go; the sections used are
# from docs/sources/tempo/configuration/manifest.md (generated from the config structs: every option
# and its default). stream_over_http_enabled is also used in example/docker-compose/shared/tempo.yaml.
# distributor.receivers is passed to the OpenTelemetry receivers as is (configuration/_index.md).
TEMPO_ROOT = {
    "auth_enabled", "backend_scheduler", "backend_scheduler_client", "backend_worker", "block_builder", "cache",
    "compactor", "distributor", "enable_go_runtime_metrics", "http_api_prefix", "ingest", "ingester",
    "ingester_client", "internal_server", "live_store", "live_store_client", "memberlist", "metrics_generator",
    "metrics_generator_client", "multitenancy_enabled", "overrides", "querier", "query_frontend", "server",
    "shutdown_delay", "storage", "stream_over_http_enabled", "target", "usage_report",
}  # fmt: skip
TEMPO_SERVER = {
    "graceful_shutdown_timeout", "grpc_listen_address", "grpc_listen_port", "http_listen_address",
    "http_listen_port", "http_path_prefix", "http_server_idle_timeout", "http_server_read_timeout",
    "http_server_write_timeout", "log_format", "log_level", "register_instrumentation",
}  # fmt: skip
TEMPO_INGESTER = {
    "complete_block_timeout", "concurrent_flushes", "flush_all_on_shutdown", "flush_check_period",
    "flush_object_storage", "flush_op_timeout", "lifecycler", "max_block_bytes", "max_block_duration",
    "override_ring_key", "partition_ring", "trace_idle_period", "trace_live_period",
}  # fmt: skip
TEMPO_COMPACTION = {
    "block_retention", "compacted_block_retention", "compaction_cycle", "compaction_window", "max_block_bytes",
    "max_compaction_objects", "max_time_per_tenant", "retention_concurrency", "v2_in_buffer_bytes",
    "v2_out_buffer_bytes", "v2_prefetch_traces_count",
}  # fmt: skip
TEMPO_ALLOWED = (
    TEMPO_ROOT
    | {f"server.{k}" for k in TEMPO_SERVER}
    | {"distributor.receivers"}
    | {f"ingester.{k}" for k in TEMPO_INGESTER}
    | {"compactor.compaction"} | {f"compactor.compaction.{k}" for k in TEMPO_COMPACTION}
    | {"storage.trace", "storage.trace.backend", "storage.trace.wal", "storage.trace.wal.path"}
    | {"storage.trace.local", "storage.trace.local.path"}
    | {"usage_report.reporting_enabled"}
)  # fmt: skip


@pytest.fixture(scope="module")
def tempo() -> dict:
    return load("tempo/tempo-config.yaml")


def test_tempo_uses_only_documented_keys(tempo):
    assert not unknown_keys(tempo, TEMPO_ALLOWED, free_form=("distributor.receivers",))


def test_tempo_key_check_catches_a_typo(tempo):
    broken = dict(tempo, ingester={"max_block_duraton": "5m"})
    assert unknown_keys(broken, TEMPO_ALLOWED, free_form=("distributor.receivers",)) == {"ingester.max_block_duraton"}


def test_tempo_receives_otlp_grpc_from_other_containers(tempo):
    endpoint = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    host, _, port = endpoint.rpartition(":")
    # The receivers' default host is localhost: unreachable from the collector's container.
    assert host in ("0.0.0.0", "")
    assert int(port) in service_ports(compose()["services"]["tempo"])
    assert tempo["server"]["http_listen_port"] in service_ports(compose()["services"]["tempo"])


def test_tempo_stores_traces_on_local_disk_in_its_volume(tempo):
    trace = tempo["storage"]["trace"]
    assert trace["backend"] == "local"
    (volume_target,) = [target for _, target in named_volumes(compose()["services"]["tempo"])]
    for path in (trace["wal"]["path"], trace["local"]["path"]):
        assert Path(path).is_relative_to(volume_target), f"{path} is outside the tempo-data volume"


def test_service_graph_metrics_come_from_one_place_only(tempo):
    # The collector's service-graph connector writes traces_service_graph_*; Tempo's metrics generator
    # with the service-graphs processor would write the same series a second time.
    collector = load("otel-collector/otel-collector-config.yaml")
    collector_has_graph = any(
        name.split("/")[0] in {"servicegraph", "service_graph"} for name in collector["connectors"]
    )
    tempo_processors = (
        (tempo.get("overrides") or {}).get("defaults", {}).get("metrics_generator", {}).get("processors", [])
    )
    assert collector_has_graph != ("service-graphs" in tempo_processors)


# --- Pyroscope ---------------------------------------------------------------------------------------
# grafana/pyroscope: cmd/pyroscope/pyroscope.yaml, the reference of every option with its
# default (the image's own default config), for the sections used.
PYROSCOPE_ROOT = {
    "admin_server", "analytics", "api", "architecture_storage", "distributor", "embedded_grafana", "limits",
    "memberlist", "metastore", "multitenancy_enabled", "overrides_exporter", "pyroscopedb", "runtime_config",
    "segment_writer", "self_profiling", "server", "show_banner", "shutdown_delay", "storage", "target", "tracing",
}  # fmt: skip
PYROSCOPE_ALLOWED = (
    PYROSCOPE_ROOT
    | {f"storage.{k}" for k in ("backend", "s3", "gcs", "azure", "swift", "cos", "filesystem", "prefix")}
    | {"storage.filesystem.dir"}
    | {f"pyroscopedb.{k}" for k in (
        "data_path", "max_block_duration", "row_group_target_size", "symbols_partition_label", "min_free_disk_gb",
        "min_disk_available_percentage", "enforcement_interval", "disable_enforcement")}
    | {"metastore.raft", "metastore.raft.dir", "metastore.data_dir"}
    | {f"self_profiling.{k}" for k in (
        "disable_push", "mutex_profile_fraction", "block_profile_rate", "use_k6_middleware", "tenant_id")}
    | {"analytics.reporting_enabled"}
)  # fmt: skip


@pytest.fixture(scope="module")
def pyroscope() -> dict:
    return load("pyroscope/pyroscope-config.yaml")


def test_pyroscope_uses_only_documented_keys(pyroscope):
    assert not unknown_keys(pyroscope, PYROSCOPE_ALLOWED)


def test_pyroscope_key_check_catches_a_typo(pyroscope):
    broken = dict(pyroscope, storage={"backend": "filesystem", "filesytem": {"dir": "/data"}})
    assert unknown_keys(broken, PYROSCOPE_ALLOWED) == {"storage.filesytem", "storage.filesytem.dir"}


def test_pyroscope_stores_profiles_on_local_disk_in_its_volume(pyroscope):
    assert pyroscope["storage"]["backend"] == "filesystem"
    (volume_target,) = [target for _, target in named_volumes(compose()["services"]["pyroscope"])]
    paths = [
        pyroscope["storage"]["filesystem"]["dir"],
        pyroscope["pyroscopedb"]["data_path"],
        pyroscope["metastore"]["raft"]["dir"],
        pyroscope["metastore"]["data_dir"],
    ]
    for path in paths:
        assert Path(path).is_absolute() and Path(path).is_relative_to(volume_target), path


def test_pyroscope_runs_as_one_binary(pyroscope):
    # target defaults to "all" (single binary); anything else would need the other components.
    assert pyroscope.get("target", "all") == "all"


# --- Loki --------------------------------------------------------------------------------------------
# grafana/loki at the tag v<LOKI_VERSION>: docs/sources/shared/configuration.md, generated from the config
# structs ("Supported contents and default values of loki.yaml" and the blocks it refers to): every root
# key, and the keys of the sections used. period_config is the item of schema_config.configs.
LOKI_ROOT = {
    "analytics", "auth_enabled", "ballast_bytes", "bloom_build", "bloom_gateway", "chunk_store_config", "common",
    "compactor", "compactor_grpc_client", "dataobj", "distributor", "frontend", "frontend_worker", "index_gateway",
    "ingest_limits", "ingest_limits_frontend", "ingest_limits_frontend_client", "ingester", "ingester_client",
    "kafka_config", "limits_config", "memberlist", "metrics_namespace", "operational_config", "pattern_ingester",
    "profiling", "querier", "query_engine", "query_range", "query_scheduler", "ruler", "ruler_storage",
    "runtime_config", "schema_config", "server", "shutdown_delay", "storage_config", "table_manager", "target",
    "tenant_limits_allow_publish", "tracing", "ui",
}  # fmt: skip
LOKI_SERVER = {
    "graceful_shutdown_timeout", "grpc_listen_address", "grpc_listen_port", "http_listen_address",
    "http_listen_port", "http_path_prefix", "http_server_idle_timeout", "http_server_read_timeout",
    "http_server_write_timeout", "log_format", "log_level", "register_instrumentation",
}  # fmt: skip
LOKI_COMMON = {
    "compactor_address", "compactor_grpc_address", "instance_addr", "instance_interface_names", "path_prefix",
    "persist_tokens", "replication_factor", "ring", "scratch_path", "storage",
}  # fmt: skip
LOKI_PERIOD_CONFIG = {"chunks", "from", "index", "object_store", "row_shards", "schema", "store"}
LOKI_COMPACTOR = {
    "apply_retention_interval", "backup_delete_request_store_db_type", "compaction_interval", "compactor_ring",
    "delete_batch_size", "delete_max_interval", "delete_request_cancel_period", "delete_request_store",
    "delete_request_store_db_type", "delete_request_store_key_prefix", "deletion_marker_object_store_prefix",
    "horizontal_scaling_mode", "jobs_config", "max_compaction_parallelism", "retention_backoff_config",
    "retention_delete_delay", "retention_delete_worker_count", "retention_enabled", "retention_table_timeout",
    "skip_latest_n_tables", "tables_to_compact", "upload_parallelism", "worker_config", "working_directory",
}  # fmt: skip
# limits_config: the write path's validation and rate limits, retention and the OTLP-related switches.
LOKI_LIMITS = {
    "allow_structured_metadata", "creation_grace_period", "discover_log_levels", "discover_service_name",
    "ingestion_burst_size_mb", "ingestion_rate_mb", "ingestion_rate_strategy", "log_level_fields",
    "max_global_streams_per_user", "max_label_name_length", "max_label_names_per_series", "max_label_value_length",
    "max_line_size", "max_line_size_truncate", "max_line_size_truncate_identifier",
    "max_structured_metadata_entries_count", "max_structured_metadata_size", "per_stream_rate_limit",
    "per_stream_rate_limit_burst", "reject_old_samples", "reject_old_samples_max_age", "retention_period",
    "retention_stream", "unordered_writes", "volume_enabled",
}  # fmt: skip
LOKI_ALLOWED = (
    LOKI_ROOT
    | {f"server.{k}" for k in LOKI_SERVER}
    | {f"common.{k}" for k in LOKI_COMMON}
    | {"common.storage.filesystem", "common.storage.filesystem.chunks_directory",
       "common.storage.filesystem.rules_directory"}
    | {"common.ring.kvstore", "common.ring.kvstore.store", "common.ring.replication_factor"}
    | {"schema_config.configs"} | {f"schema_config.configs[].{k}" for k in LOKI_PERIOD_CONFIG}
    | {f"schema_config.configs[].index.{k}" for k in ("path_prefix", "period", "prefix", "tags")}
    | {f"compactor.{k}" for k in LOKI_COMPACTOR}
    | {f"limits_config.{k}" for k in LOKI_LIMITS}
    | {"analytics.reporting_enabled"}
)  # fmt: skip
# Loki's byte sizes (flagext.ByteSize, by github.com/c2h5oh/datasize): binary units, case-insensitive.
LOKI_SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def loki_bytes(value) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([KMG]?B)?", str(value).upper()).groups()
    return int(number) * LOKI_SIZE_UNITS[unit or "B"]


def go_duration_hours(value: str) -> float:
    units = {"h": 1, "m": 1 / 60, "s": 1 / 3600, "d": 24, "w": 168}
    parts = re.findall(r"(\d+)([hmsdw])", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"unexpected duration {value!r}"
    return sum(int(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def loki() -> dict:
    return load("loki/loki-config.yaml")


def test_loki_uses_only_documented_keys(loki):
    assert not unknown_keys(loki, LOKI_ALLOWED), "not in the pinned Loki's configuration reference"


def test_loki_key_check_catches_a_typo(loki):
    broken = dict(loki, limits_config={**loki["limits_config"], "max_line_size_truncated": True})
    assert unknown_keys(broken, LOKI_ALLOWED) == {"limits_config.max_line_size_truncated"}


def test_loki_runs_as_one_binary_with_one_tenant(loki):
    # target defaults to "all" (single binary): distributor, ingester, querier and compactor in one process.
    assert loki.get("target", "all") == "all"
    # No X-Scope-OrgID: neither the collector nor Grafana sends one.
    assert loki["auth_enabled"] is False
    common = loki["common"]
    assert common["replication_factor"] == 1 and common["ring"]["kvstore"]["store"] == "inmemory"


def test_loki_listens_where_compose_publishes_and_checks_it(loki):
    service = compose()["services"]["loki"]
    port = loki["server"]["http_listen_port"]
    assert port in service_ports(service)
    # The image is distroless: the healthcheck is the binary's own -health against its /ready.
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "/usr/bin/loki", "-health"], test
    assert f"-health.url=http://127.0.0.1:{port}/ready" in test


def test_loki_stores_logs_on_local_disk_in_its_volume(loki):
    (volume_target,) = [target for _, target in named_volumes(compose()["services"]["loki"])]
    common = loki["common"]
    # path_prefix also roots the directories left to their defaults: TSDB index, WAL, compactor.
    paths = [common["path_prefix"], *common["storage"]["filesystem"].values()]
    for path in paths:
        assert Path(path).is_absolute() and Path(path).is_relative_to(volume_target), path
    (period,) = loki["schema_config"]["configs"]
    assert (period["store"], period["object_store"], period["schema"]) == ("tsdb", "filesystem", "v13")
    assert period["index"]["period"] == "24h", "retention needs a 24h index period"
    assert date.fromisoformat(str(period["from"])) <= date.today(), "the only period must start in the past"


def test_loki_deletes_logs_when_tempo_deletes_their_traces(loki, tempo):
    compactor, limits = loki["compactor"], loki["limits_config"]
    assert compactor["retention_enabled"] is True
    # Required with retention: where delete requests live (here, beside the chunks).
    assert compactor["delete_request_store"] == loki["schema_config"]["configs"][0]["object_store"]
    retention = go_duration_hours(limits["retention_period"])
    assert retention >= 24, "Loki's smallest retention is 24h"
    # A log line links to its trace: keep them as long as each other.
    assert retention == go_duration_hours(tempo["compactor"]["compaction"]["block_retention"])


def test_loki_keeps_trace_ids_of_otlp_records_as_structured_metadata(loki):
    limits = loki["limits_config"]
    assert limits["allow_structured_metadata"] is True
    # The default OTLP mapping of the pinned version makes service.name the stream label service_name
    # (what Grafana's trace-to-logs query and the dashboards select on) and the trace and span ids
    # structured metadata. An otlp_config would change that mapping: check it against the docs first.
    assert "otlp_config" not in limits
    grafana = yaml.safe_load((REPO_ROOT / "grafana" / "provisioning" / "datasources" / "datasources.yaml").read_text())
    (tempo_ds,) = [ds for ds in grafana["datasources"] if ds["uid"] == "tempo"]
    assert {"key": "service.name", "value": "service_name"} in tempo_ds["jsonData"]["tracesToLogsV2"]["tags"]


def test_the_collector_pushes_logs_to_lokis_otlp_endpoint(loki):
    collector = load("otel-collector/otel-collector-config.yaml")
    port = loki["server"]["http_listen_port"]
    to_loki = {name: exporter["endpoint"] for name, exporter in collector["exporters"].items()
               if str((exporter or {}).get("endpoint", "")).startswith("http://loki:")}
    # otlp_http appends /v1/logs: Loki's native OTLP ingestion is /otlp/v1/logs.
    assert to_loki and set(to_loki.values()) == {f"http://loki:{port}/otlp"}, to_loki
    assert all(name.split("/")[0] in {"otlp_http", "otlphttp"} for name in to_loki), to_loki
    logs_exporters = {e for name, pipeline in collector["service"]["pipelines"].items()
                      if name.split("/")[0] == "logs" for e in pipeline["exporters"]}
    assert set(to_loki) <= logs_exporters


def test_loki_states_what_it_keeps_of_large_lines(loki):
    limits = loki["limits_config"]
    # Written out, not left to defaults: the README and the bad-input tests quote these values.
    stated = {"max_line_size", "max_line_size_truncate", "max_line_size_truncate_identifier",
              "max_structured_metadata_size", "max_structured_metadata_entries_count", "ingestion_rate_mb",
              "ingestion_burst_size_mb", "per_stream_rate_limit", "per_stream_rate_limit_burst"}
    assert stated <= set(limits)
    line = loki_bytes(limits["max_line_size"])
    assert line == 256 * 1024
    # A longer line is cut to max_line_size, the identifier included, instead of being discarded.
    assert limits["max_line_size_truncate"] is True
    assert 0 < len(limits["max_line_size_truncate_identifier"].encode()) < line
    # One record that fits the line limit also fits the rate limits: it cannot be refused for its size
    # alone (the per-stream burst and the tenant's burst are at least one full line with its metadata).
    record = line + loki_bytes(limits["max_structured_metadata_size"])
    assert record <= loki_bytes(limits["per_stream_rate_limit_burst"])
    assert record <= limits["ingestion_burst_size_mb"] * (1 << 20)


def test_loki_byte_sizes_are_read_as_loki_reads_them():
    assert loki_bytes("256KB") == 262_144 and loki_bytes("256kb") == 262_144 and loki_bytes("3MB") == 3 << 20
    assert loki_bytes(1024) == 1024
    assert go_duration_hours("24h") == 24 and go_duration_hours("1h30m") == 1.5
