#!/usr/bin/env bash
# Run once by the postgres image on a new data volume: the evomerge database, its owner role and the
# dashboard's SELECT-only role, through storage/setup.sql (mounted at /evomerge/setup.sql).
set -euo pipefail
: "${EVOMERGE_DB_PASSWORD:?set EVOMERGE_DB_PASSWORD}"
: "${EVOMERGE_DASHBOARD_PASSWORD:?set EVOMERGE_DASHBOARD_PASSWORD}"
psql --no-psqlrc --username "$POSTGRES_USER" --dbname postgres \
  -v db=evomerge -v owner=evomerge -v owner_password="$EVOMERGE_DB_PASSWORD" \
  -v reader=evomerge_dashboard -v reader_password="$EVOMERGE_DASHBOARD_PASSWORD" \
  -f /evomerge/setup.sql
