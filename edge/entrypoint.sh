#!/bin/sh
# The edge's entrypoint in compose (docker-compose.yml): one safety check, then its command (`caddy run ...`).
# POSIX sh: the caddy image is Alpine, whose /bin/sh is busybox ash (tests/edge/test_edge_compose.py runs this
# file under dash and busybox).
#
# Only the edge follows BIND_ADDRESS off loopback: it publishes the app and Grafana (its `grafana`
# listener), every other port stays on 127.0.0.1. Anonymous Grafana viewers can read every dashboard and
# run any query against Prometheus, Tempo, Loki and Pyroscope through Explore, so on a network, anonymous
# viewing is an open door. With BIND_ADDRESS not loopback and GRAFANA_ANONYMOUS_ENABLED on, the edge refuses
# to serve and says why, naming both settings. Compose passes both in the edge's environment, with the
# same defaults as the ports and Grafana's GF_AUTH_ANONYMOUS_ENABLED (a test keeps them equal).
#
# Refusing is not exiting. Under `restart: unless-stopped` the engine would restart an exited edge forever,
# and Compose waits without end for a restarting container: each start resets its health to `starting`.
# So the script prints why, then idles without listening: the healthcheck fails, the edge turns unhealthy,
# `docker compose up --wait` (and locust, which waits for the edge) fails naming it, and
# `docker compose logs edge` shows this message.
set -eu

bind_address=${BIND_ADDRESS:-127.0.0.1}
anonymous=${GRAFANA_ANONYMOUS_ENABLED:-true}

is_loopback() {
    case $1 in
        *[!0-9.]*) ;;                  # not a dotted IPv4 address: see below
        127.*.*.*) return 0 ;;         # 127.0.0.0/8
    esac
    case $1 in
        ::1 | '[::1]' | 0:0:0:0:0:0:0:1 | '[0:0:0:0:0:0:0:1]' | localhost) return 0 ;;
    esac
    return 1
}

# What Grafana reads as true (go-ini's Key.MustBool, which [auth.anonymous] enabled goes through); any other
# value, or one it cannot parse, it reads as false, and then anonymous viewing is off.
anonymous_is_on() {
    case $1 in
        1 | t | T | true | TRUE | True | y | Y | yes | YES | Yes | on | ON | On) return 0 ;;
    esac
    return 1
}

if [ "$#" -eq 0 ]; then
    echo "edge/entrypoint.sh: no command to run (docker-compose.yml gives the edge's command)" >&2
    exit 64
fi

if ! is_loopback "$bind_address" && anonymous_is_on "$anonymous"; then
    cat >&2 <<EOF
edge: refusing to serve. BIND_ADDRESS=$bind_address is not loopback, so the edge publishes Grafana to your
network, and GRAFANA_ANONYMOUS_ENABLED=$anonymous lets anyone who reaches it read every dashboard and query
Prometheus, Tempo, Loki and Pyroscope without logging in.
Set GRAFANA_ANONYMOUS_ENABLED=false (Grafana then asks for its admin login), or BIND_ADDRESS=127.0.0.1,
in .env or in the shell, then run \`docker compose up -d --wait\` again.
EOF
    # Idle, not listening, until stopped. The sleep runs in the background so that the shell (PID 1 in
    # the container, which ignores signals it has no handler for) takes `docker compose stop` at once,
    # ending and reaping its sleep before it exits.
    idler=
    trap 'kill $idler 2>/dev/null; wait $idler 2>/dev/null || :; exit 1' TERM INT
    sleep 2147483647 &
    idler=$!
    wait "$idler" || true
    exit 1
fi

# Replace the shell: caddy becomes PID 1 and gets the engine's signals itself (graceful stop on SIGTERM).
exec "$@"
