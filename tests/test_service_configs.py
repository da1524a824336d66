"""Beyla, Tempo and Pyroscope configs, checked against the documented configuration of the pinned versions.

None of the three can run here (Beyla needs kprobes; Tempo and Pyroscope are AGPL images only run in
compose), so this is what can honestly be checked without them: the files parse, every key is one
the pinned version documents (Beyla even ignores unknown keys silently, so a typo would simply
switch a feature off), enum values are accepted ones, and the settings this stack relies on are set.
The allow-lists are transcribed from the sources named above each, at the versions in
DOCUMENTED_VERSIONS; extend them from the same sources when a config needs a new key, and re-check
them when an image is upgraded (a test fails until DOCUMENTED_VERSIONS matches .env again).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from stackfiles import REPO_ROOT, compose, dotenv, named_volumes, service_ports

pytestmark = pytest.mark.unit

# The versions whose documentation the allow-lists below were transcribed from (tags of the upstream
# repositories). A copy of .env's values on purpose: upgrading an image must make someone re-read the
# new version's config reference.
DOCUMENTED_VERSIONS = {"BEYLA_VERSION": "3.33.0", "TEMPO_VERSION": "2.10.8", "PYROSCOPE_VERSION": "2.2.1"}


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
BEYLA_ALLOWED = (
    BEYLA_ROOT
    | {f"discovery.{k}" for k in BEYLA_DISCOVERY}
    | {f"discovery.instrument[].{k}" for k in BEYLA_INSTRUMENT}
    | {f"routes.{k}" for k in BEYLA_ROUTES}
    | {f"metrics.{k}" for k in BEYLA_METRICS}
    | {f"prometheus_export.{k}" for k in BEYLA_PROMETHEUS}
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


def app_routes() -> set[str]:
    """The paths of the app's Flask routes, read from app/app.py without importing it."""
    tree = ast.parse((REPO_ROOT / "app" / "app.py").read_text())
    routes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call)
                    and isinstance(decorator.func, ast.Attribute)
                    and decorator.func.attr in {"route", "get"}
                    and decorator.args
                    and isinstance(decorator.args[0], ast.Constant)
                ):
                    routes.add(decorator.args[0].value)
    return routes


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
