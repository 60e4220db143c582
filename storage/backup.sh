#!/usr/bin/env bash
# Back up an evomerge PostgreSQL database to one file (pg_dump's custom format: compressed, and
# pg_restore can restore it whole or in part).
#
#   storage/backup.sh DATABASE_URL FILE
#
# DATABASE_URL is the URL evomerge takes (postgresql+psycopg://user:password@host:5432/db) or a plain
# libpq one (postgresql://...). The dump is one consistent snapshot, taken while drivers keep writing;
# it is written next to FILE and renamed into place only when complete.
set -euo pipefail

usage() { echo "usage: $0 DATABASE_URL FILE" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
url=$1
file=$2
case $url in
  postgresql+psycopg://*) url="postgresql://${url#postgresql+psycopg://}" ;;
  postgresql://* | postgres://*) ;;
  *) echo "error: not a PostgreSQL URL: ${url%%://*}://..." >&2; exit 2 ;;
esac
command -v pg_dump >/dev/null || { echo "error: pg_dump not found (install the PostgreSQL client)" >&2; exit 2; }

tmp=$(mktemp "${file}.XXXXXX")
trap 'rm -f "$tmp"' EXIT
pg_dump --format=custom --no-owner --no-privileges --file="$tmp" --dbname="$url"
mv -f "$tmp" "$file"
trap - EXIT
echo "backed up to $file ($(wc -c <"$file") bytes)"
