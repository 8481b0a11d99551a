"""Real servers the project starts for itself when no Docker engine is at hand: Kafka (its jars, and the
cluster). The tests' PostgreSQL server is test support code: `tests/postgres_server.py`."""
