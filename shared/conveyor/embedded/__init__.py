"""Real infrastructure run locally (a Kafka broker from Maven Central) for development and tests."""
