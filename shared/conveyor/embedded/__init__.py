"""Real servers the project starts for itself when no Docker engine is at hand: Kafka and PostgreSQL."""
