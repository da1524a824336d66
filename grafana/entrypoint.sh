#!/bin/bash
# Wraps the image's /run.sh so that no Grafana admin password is ever committed or defaulted.
# GF_SECURITY_ADMIN_PASSWORD set (from GRAFANA_ADMIN_PASSWORD in .env or the shell): used as is.
# Empty: a random password is generated once into the data volume and reused on every restart, so it
# survives `docker compose restart` and disappears with `docker compose down -v`.
# Grafana applies the password only when it creates its database, i.e. on the volume's first start.
set -euo pipefail

password_file="${GF_PATHS_DATA:-/var/lib/grafana}/admin-password"

if [ -z "${GF_SECURITY_ADMIN_PASSWORD:-}" ]; then
    if [ ! -s "$password_file" ]; then
        umask 077
        # 18 random bytes are exactly 24 base64 characters, without padding.
        head -c 18 /dev/urandom | base64 >"$password_file"
        echo "grafana: generated an admin password for user '${GF_SECURITY_ADMIN_USER:-admin}'"
    fi
    GF_SECURITY_ADMIN_PASSWORD="$(tr -d '\n' <"$password_file")"
    export GF_SECURITY_ADMIN_PASSWORD
    echo "grafana: read the admin password with: docker compose exec grafana cat $password_file"
fi

exec "$@"
