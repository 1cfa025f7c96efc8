"""The audit log: who did what, append-only and hash-chained per org."""
