"""Observability: value-based log redaction (``redact``) and Prometheus metrics (``metrics``)."""
