#!/usr/bin/env bash
# Make sure the local test services answer: PostgreSQL on 127.0.0.1:5432 and Redis on
# 127.0.0.1:6379 (ENSURE_SERVICES_REDIS_PORT overrides the port), and that /usr/bin/chromium
# exists for the dashboard's browser test. Idempotent: a running
# service is left alone. Installs a missing server with apt-get (Debian/Ubuntu). Every step
# is bounded in time; prints one line per service and exits non-zero when one is not ready.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_HOST=127.0.0.1
REDIS_PORT=${ENSURE_SERVICES_REDIS_PORT:-6379}
WAIT_SECONDS=${ENSURE_SERVICES_WAIT_SECONDS:-30}
APT_TIMEOUT_SECONDS=${ENSURE_SERVICES_APT_TIMEOUT_SECONDS:-600}

# Root runs commands directly; anyone else goes through passwordless sudo when there is one.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        "$@"
    fi
}

apt_updated=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "ensure_services: $* missing and apt-get unavailable; install it by hand" >&2
        return 1
    fi
    if [ "$apt_updated" -eq 0 ]; then
        as_root timeout "$APT_TIMEOUT_SECONDS" apt-get update -qq >/dev/null
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        timeout "$APT_TIMEOUT_SECONDS" apt-get install -y -qq "$@" >/dev/null
}

# wait_until SECONDS COMMAND...: poll COMMAND every half second until it succeeds.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            return 1
        fi
        sleep 0.5
    done
}

postgres_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        timeout 5 pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
    else
        timeout 5 bash -c "</dev/tcp/$PG_HOST/$PG_PORT"
    fi
}

redis_ready() {
    if command -v redis-cli >/dev/null 2>&1; then
        [ "$(timeout 5 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]
    else
        timeout 5 bash -c "</dev/tcp/$REDIS_HOST/$REDIS_PORT"
    fi
}

ensure_postgres() {
    if postgres_ready; then
        echo "postgresql: ready on $PG_HOST:$PG_PORT (already running)"
        return 0
    fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
        apt_install postgresql
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    as_root timeout 60 pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
        true # "already running" exits non-zero; readiness below decides
    if wait_until "$WAIT_SECONDS" postgres_ready; then
        echo "postgresql: ready on $PG_HOST:$PG_PORT (started cluster $version/main)"
    else
        echo "postgresql: NOT ready on $PG_HOST:$PG_PORT after ${WAIT_SECONDS}s" >&2
        return 1
    fi
}

ensure_redis() {
    if redis_ready; then
        echo "redis: ready on $REDIS_HOST:$REDIS_PORT (already running)"
        return 0
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        apt_install redis-server
    fi
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root timeout 30 redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    if wait_until "$WAIT_SECONDS" redis_ready; then
        echo "redis: ready on $REDIS_HOST:$REDIS_PORT (started)"
    else
        echo "redis: NOT ready on $REDIS_HOST:$REDIS_PORT after ${WAIT_SECONDS}s" >&2
        return 1
    fi
}

# The dashboard's browser test drives Debian's chromium (never a downloaded browser).
ensure_chromium() {
    if [ -x /usr/bin/chromium ]; then
        echo "chromium: present at /usr/bin/chromium"
        return 0
    fi
    apt_install chromium || true # readiness below decides
    if [ -x /usr/bin/chromium ]; then
        echo "chromium: installed at /usr/bin/chromium"
    else
        echo "chromium: NOT available at /usr/bin/chromium" >&2
        return 1
    fi
}

status=0
ensure_postgres || status=1
ensure_redis || status=1
ensure_chromium || status=1
exit "$status"
