"""Egress: every outbound call that carries a secret goes through ``app.egress.guard``."""

from app.egress.guard import (
    METADATA_ADDRESSES,
    AsyncGuardedTransport,
    Destination,
    DestinationDeniedError,
    EgressDeniedError,
    EgressError,
    EgressPolicy,
    EgressResolutionError,
    GuardedTransport,
    ResponseTooLargeError,
    check_destination,
    guarded_async_client,
    guarded_client,
    host_matches,
)

__all__ = [
    "METADATA_ADDRESSES",
    "AsyncGuardedTransport",
    "Destination",
    "DestinationDeniedError",
    "EgressDeniedError",
    "EgressError",
    "EgressPolicy",
    "EgressResolutionError",
    "GuardedTransport",
    "ResponseTooLargeError",
    "check_destination",
    "guarded_async_client",
    "guarded_client",
    "host_matches",
]
