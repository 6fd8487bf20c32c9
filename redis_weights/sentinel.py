"""Redis Sentinel's helpers under their former name: they live in ``deployment/sentinel.py``."""

from .deployment.sentinel import (
    DEFAULT_PORT,
    FAILOVER_WAIT,
    SCHEMES,
    SentinelURL,
    close,
    describe,
    is_sentinel_url,
    master_client,
    parse_url,
    pool_of,
    primary_address,
    replica_client,
    scope,
    sentinel_addresses,
    wait_for_primary,
)

__all__ = [
    "DEFAULT_PORT",
    "FAILOVER_WAIT",
    "SCHEMES",
    "SentinelURL",
    "close",
    "describe",
    "is_sentinel_url",
    "master_client",
    "parse_url",
    "pool_of",
    "primary_address",
    "replica_client",
    "scope",
    "sentinel_addresses",
    "wait_for_primary",
]
