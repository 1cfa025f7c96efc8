"""The backfill: legacy plaintext columns (revision 0001) moved into sealed secrets and providers."""
