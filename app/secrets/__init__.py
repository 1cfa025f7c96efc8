"""Secrets: sealing, keys, the resolver cache, reveal and rotation; the only package that imports cryptography."""
