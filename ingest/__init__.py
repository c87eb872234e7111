"""store-agent-ingest: lands every agent's uplink events in PostgreSQL (contract section 10)."""
