#!/usr/bin/env bash
# Entrypoint of the qarm images (docker/Dockerfile, docker/Dockerfile.cuda); docker/compose.yaml
# runs every service of the stack but Postgres through it.
#
#   deploy             create the Prefect work pool $QARM_POOL (default qarm, type $QARM_POOL_TYPE,
#                      default process) if it is missing, then register every deployment of
#                      deployments/prefect.yaml (idempotent: a rerun updates them). The compose
#                      stack's one-shot `deploy` service.
#   mlflow server ...  create the database named by a postgresql:// --backend-store-uri if it is
#                      missing (the Postgres container creates only the Prefect one), then run the
#                      server with the arguments as given.
#   anything else      run as given: qarm ..., prefect worker start ..., prefect server start, bash.
set -euo pipefail

ensure_postgres_db() {  # $1: postgresql://USER:PASSWORD@HOST:PORT/DB
  python - "$1" <<'PY'
import sys
import time
from urllib.parse import unquote, urlsplit

import psycopg2
from psycopg2 import errors, sql

url = urlsplit(sys.argv[1])
db = unquote(url.path.lstrip("/"))
if not db:
    sys.exit(0)
params = dict(host=url.hostname, port=url.port or 5432, user=unquote(url.username or ""),
              password=unquote(url.password or ""), dbname="postgres", connect_timeout=5)
for attempt in range(30):          # compose starts us once Postgres is healthy; this covers restarts
    try:
        conn = psycopg2.connect(**params)
        break
    except psycopg2.OperationalError as exc:
        if attempt == 29:
            raise
        print(f"waiting for Postgres at {url.hostname}: {str(exc).strip()}", file=sys.stderr)
        time.sleep(2)
conn.autocommit = True             # CREATE DATABASE cannot run inside a transaction
with conn.cursor() as cur:
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
    if cur.fetchone() is None:
        try:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
            print(f"created database {db}", file=sys.stderr)
        except (errors.DuplicateDatabase, errors.InsufficientPrivilege) as exc:
            print(f"not creating database {db}: {str(exc).strip()}", file=sys.stderr)
conn.close()
PY
}

case "${1:-}" in
  deploy)
    shift
    pool="${QARM_POOL:-qarm}"
    cd "${QARM_REPO:-/app}"
    if prefect work-pool inspect "$pool" >/dev/null 2>&1; then
      echo "work pool $pool exists"
    else
      prefect work-pool create "$pool" --type "${QARM_POOL_TYPE:-process}"
    fi
    exec prefect --no-prompt deploy --all --prefect-file "${QARM_PREFECT_FILE:-deployments/prefect.yaml}" "$@"
    ;;
  mlflow)
    if [ "${2:-}" = server ]; then
      uri="" prev=""
      for arg in "$@"; do
        if [ "$prev" = --backend-store-uri ]; then uri="$arg"; fi
        case "$arg" in --backend-store-uri=*) uri="${arg#*=}" ;; esac
        prev="$arg"
      done
      uri="${uri:-${MLFLOW_BACKEND_STORE_URI:-}}"
      case "$uri" in postgresql*) ensure_postgres_db "$uri" ;; esac
    fi
    exec "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
