"""The edge: Caddy in front of the app, run natively from the compose config with local addresses.

edge/caddy-config.json is what compose and Kubernetes load. The native stack rewrites only its
listen addresses and upstream dials (compose service names -> 127.0.0.1 ports), as it does for the
collector and Prometheus, and gives Caddy edge/edge.env with the collector's local address.
Caddy is the compose image's release, built from its Go module (CADDY_VERSION in .env).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from tooling.config import DOTENV, load_env_file

REPO_ROOT = Path(__file__).resolve().parents[2]
EDGE_CONFIG = REPO_ROOT / "edge" / "caddy-config.json"
EDGE_ENV = REPO_ROOT / "edge" / "edge.env"
# The servers of edge/caddy-config.json, by role.
APP_SERVER, GRAFANA_SERVER, METRICS_SERVER = "app", "grafana", "metrics"


class EdgeConfigError(ValueError):
    """edge/caddy-config.json does not have the shape the stack relies on."""


def caddy_version(env_file: Path = DOTENV) -> str:
    version = load_env_file(env_file).get("CADDY_VERSION", "")
    if not version:
        raise EdgeConfigError(f"{env_file} sets no CADDY_VERSION (the edge's release, the caddy image's tag)")
    return version


def caddy_binary() -> Path:
    """The caddy binary of CADDY_VERSION, built from its Go module into .cache/ if needed (tooling.builds)."""
    from tooling.builds import binary

    return binary("caddy")


def load_config(path: Path = EDGE_CONFIG) -> dict:
    config = json.loads(path.read_text())
    servers = config.get("apps", {}).get("http", {}).get("servers", {})
    missing = {APP_SERVER, GRAFANA_SERVER, METRICS_SERVER} - set(servers)
    if missing:
        raise EdgeConfigError(f"{path}: apps.http.servers lacks {sorted(missing)}")
    return config


def _handlers(node):
    """Every handler object anywhere in a route tree."""
    if isinstance(node, dict):
        if "handler" in node:
            yield node
        for value in node.values():
            yield from _handlers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _handlers(item)


def upstream_dials(config: dict) -> dict[str, list[str]]:
    """server name -> the addresses its reverse_proxy handlers dial (compose host:port)."""
    return {name: [u["dial"] for h in _handlers(server) if h["handler"] == "reverse_proxy" for u in h["upstreams"]]
            for name, server in config["apps"]["http"]["servers"].items()}


def _app_routes(config: dict):
    """(path pattern or "" for the catch-all, the route's handlers) of the app server, in order."""
    for route in config["apps"]["http"]["servers"][APP_SERVER]["routes"]:
        patterns = [m["path_regexp"]["pattern"] for m in route.get("match", []) if "path_regexp" in m]
        yield (patterns[0] if patterns else ""), route["handle"]


def route_table(config: dict) -> dict[str, str]:
    """The app server's forwarded path patterns -> the http.route its SERVER span carries ("" for the
    catch-all, which carries none)."""
    table = {}
    for pattern, handlers in _app_routes(config):
        if any(h["handler"] == "invoke" for h in handlers):
            tracing = next(h for h in handlers if h["handler"] == "tracing")
            table[pattern] = tracing.get("span_attributes", {}).get("http.route", "")
    return table


def answered_at_the_edge(config: dict) -> dict[str, int]:
    """Path patterns the edge answers itself, never forwarding them, -> the status it answers with."""
    return {pattern: int(h["status_code"]) for pattern, handlers in _app_routes(config)
            for h in handlers if h["handler"] == "static_response"}


def render_config(listen: dict[str, int], dials: dict[str, str], config: dict | None = None) -> dict:
    """The config with each server listening on 127.0.0.1:<listen[server]> and each upstream `dials[host:port]`
    rewritten; a server missing from `listen` is left out, an upstream missing from `dials` is an error."""
    config = copy.deepcopy(config or load_config())
    servers = config["apps"]["http"]["servers"]
    for name in list(servers):
        if name not in listen:
            del servers[name]
            continue
        servers[name]["listen"] = [f"127.0.0.1:{listen[name]}"]
        for handler in _handlers(servers[name]):
            if handler["handler"] != "reverse_proxy":
                continue
            for upstream in handler["upstreams"]:
                if upstream["dial"] not in dials:
                    raise EdgeConfigError(f"server {name} proxies to {upstream['dial']}, unknown to the native stack")
                upstream["dial"] = dials[upstream["dial"]]
    return config


def edge_environment(otlp_endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(load_env_file(EDGE_ENV))
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
    # Caddy keeps its autosave and certificate storage under XDG dirs; a run's own directory, not $HOME.
    return env
