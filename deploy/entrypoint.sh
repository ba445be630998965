#!/bin/sh
# Entry point of the Conveyor image, configured by environment variables:
#   conveyor-entrypoint dispatcher   CONVEYOR_BIND (tcp://0.0.0.0:5555), CONVEYOR_JOURNAL
#                                    (/var/lib/conveyor/journal.db), CONVEYOR_DISPATCHER_ARGS (extra flags);
#                                    one of a standby pair (docs/standby.md) when CONVEYOR_PEER (the other's
#                                    pair address) is set: CONVEYOR_ROLE (primary), CONVEYOR_PAIR_BIND
#                                    (CONVEYOR_BIND's port + 1), CONVEYOR_WITNESS, CONVEYOR_FAILOVER_TIMEOUT (2)
#   conveyor-entrypoint witness      a standby pair's witness: CONVEYOR_BIND (tcp://0.0.0.0:5557),
#                                    CONVEYOR_WITNESS_STATE (/var/lib/conveyor/witness.epoch),
#                                    CONVEYOR_FAILOVER_TIMEOUT (2: the pair's)
#   conveyor-entrypoint worker       CONVEYOR_DISPATCHER (tcp://dispatcher:5555), CONVEYOR_MODE (processes),
#                                    CONVEYOR_CONCURRENCY, CONVEYOR_TAGS (comma- or space-separated),
#                                    CONVEYOR_NAME (the container's hostname), CONVEYOR_DRAIN_TIMEOUT (30),
#                                    CONVEYOR_WORKER_ARGS (extra flags)
#   conveyor-entrypoint keys         creates CurveZMQ keys in CONVEYOR_KEYS (/keys) unless it has them:
#                                    `conveyor keys init` the first time, nothing afterwards
#   conveyor-entrypoint CMD...       runs CMD (e.g. `conveyor status`)
# CONVEYOR_KEYS (a key directory, docs/security.md) is used by the dispatcher, the worker, the witness
# and any `conveyor` command; CONVEYOR_INSECURE=true (or 1, yes, on) ignores it: no keys, no encryption.
# Each runs as PID 1 via exec; the dispatcher and the worker drain on SIGTERM (docker stop / docker-compose down).
set -eu
role=${1:-worker}
[ $# -gt 0 ] && shift
case "${CONVEYOR_INSECURE:-false}" in
1 | [Tt]rue | TRUE | [Yy]es | YES | [Oo]n | ON) unset CONVEYOR_KEYS ;;
esac
case "$role" in
keys)
    dir=${CONVEYOR_KEYS:-/keys}
    if [ -e "$dir/dispatcher.key_secret" ]; then
        echo "conveyor-entrypoint: keys already in $dir" >&2
        exit 0
    fi
    set -- conveyor keys init "$dir"
    ;;
dispatcher)
    # shellcheck disable=SC2086  # extra flags are split on purpose
    set -- conveyor dispatcher --bind "${CONVEYOR_BIND:-tcp://0.0.0.0:5555}" \
        --journal "${CONVEYOR_JOURNAL:-/var/lib/conveyor/journal.db}" \
        --log-level "${CONVEYOR_LOG_LEVEL:-info}" ${CONVEYOR_DISPATCHER_ARGS:-} "$@"
    if [ -n "${CONVEYOR_PEER:-}" ]; then
        set -- "$@" --peer "$CONVEYOR_PEER" --role "${CONVEYOR_ROLE:-primary}" \
            --failover-timeout "${CONVEYOR_FAILOVER_TIMEOUT:-2}"
        if [ -n "${CONVEYOR_PAIR_BIND:-}" ]; then
            set -- "$@" --pair-bind "$CONVEYOR_PAIR_BIND"
        fi
        if [ -n "${CONVEYOR_WITNESS:-}" ]; then
            set -- "$@" --witness "$CONVEYOR_WITNESS"
        fi
    fi
    ;;
witness)
    set -- conveyor witness --bind "${CONVEYOR_BIND:-tcp://0.0.0.0:5557}" \
        --state "${CONVEYOR_WITNESS_STATE:-/var/lib/conveyor/witness.epoch}" \
        --failover-timeout "${CONVEYOR_FAILOVER_TIMEOUT:-2}" --log-level "${CONVEYOR_LOG_LEVEL:-info}" "$@"
    ;;
worker)
    # shellcheck disable=SC2086
    set -- conveyor worker --connect "${CONVEYOR_DISPATCHER:-tcp://dispatcher:5555}" \
        --mode "${CONVEYOR_MODE:-processes}" --name "${CONVEYOR_NAME:-$(cat /etc/hostname)}" \
        --drain-timeout "${CONVEYOR_DRAIN_TIMEOUT:-30}" --log-level "${CONVEYOR_LOG_LEVEL:-info}" \
        ${CONVEYOR_WORKER_ARGS:-} "$@"
    if [ -n "${CONVEYOR_CONCURRENCY:-}" ]; then
        set -- "$@" --concurrency "$CONVEYOR_CONCURRENCY"
    fi
    for tag in $(echo "${CONVEYOR_TAGS:-}" | tr ',' ' '); do
        set -- "$@" --tag "$tag"
    done
    ;;
*)
    set -- "$role" "$@"
    ;;
esac
exec "$@"
