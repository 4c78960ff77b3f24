"""The registry in PostgreSQL: tables, queries and Alembic migrations."""
