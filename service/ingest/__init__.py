"""MQTT ingest: consume, validate, sequence-check and group device messages."""
