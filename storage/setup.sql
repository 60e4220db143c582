-- A PostgreSQL database for evomerge: an owner role that searches (the drivers), and a reader role that
-- can only SELECT (the dashboard, `status`, `front`). Run once, as a superuser:
--
--   psql -h HOST -U postgres -v db=evomerge -v owner=evomerge -v owner_password=SECRET1 \
--        -v reader=evomerge_dashboard -v reader_password=SECRET2 -f storage/setup.sql
--
-- then create the schema as the owner:
--
--   evomerge storage upgrade --storage postgresql+psycopg://evomerge:SECRET1@HOST:5432/evomerge
\set ON_ERROR_STOP on

CREATE ROLE :"owner" LOGIN PASSWORD :'owner_password';
CREATE ROLE :"reader" LOGIN PASSWORD :'reader_password';
CREATE DATABASE :"db" OWNER :"owner";
-- Only the two roles may connect.
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO :"reader";

\connect :"db"
-- The owner creates and migrates the tables; every table it creates, now and in later migrations,
-- can be read, never written, by the reader.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"reader";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO :"reader";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"reader";
