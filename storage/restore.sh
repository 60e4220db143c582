#!/usr/bin/env bash
# Restore an evomerge backup (storage/backup.sh) into an empty PostgreSQL database, all or nothing.
#
#   storage/restore.sh FILE DATABASE_URL
#
# The database must exist and hold no evomerge tables (create it with createdb, or storage/setup.sql).
# The restore runs in one transaction: on any error nothing is left behind. The restored tables belong
# to the user of DATABASE_URL. Afterwards run `evomerge storage upgrade --storage DATABASE_URL` if this
# evomerge is newer than the one that wrote the backup.
set -euo pipefail

usage() { echo "usage: $0 FILE DATABASE_URL" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
file=$1
url=$2
case $url in
  postgresql+psycopg://*) url="postgresql://${url#postgresql+psycopg://}" ;;
  postgresql://* | postgres://*) ;;
  *) echo "error: not a PostgreSQL URL: ${url%%://*}://..." >&2; exit 2 ;;
esac
[[ -f $file ]] || { echo "error: no backup file $file" >&2; exit 2; }
command -v pg_restore >/dev/null || { echo "error: pg_restore not found (install the PostgreSQL client)" >&2; exit 2; }

# A database that already holds a study store is never merged into: restore into a new one.
held=$(psql --no-psqlrc --quiet --tuples-only --no-align --dbname="$url" \
  --command="SELECT to_regclass('public.studies') IS NOT NULL OR to_regclass('public.alembic_version') IS NOT NULL")
if [[ $held == t ]]; then
  echo "error: the target database already holds evomerge tables; restore into an empty database" >&2
  exit 2
fi
pg_restore --no-owner --no-privileges --exit-on-error --single-transaction --dbname="$url" "$file"
echo "restored $file"
