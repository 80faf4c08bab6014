"""CacheServiceConfig: flags built from the dataclass, validated at construction."""

from __future__ import annotations

import pytest

from specmesh.cache_service.config import CacheServiceConfig, parse_args


def test_config_flags_match_the_dataclass():
    assert parse_args([]) == CacheServiceConfig()
    cfg = parse_args(["--redis-url", "redis://h:1/2", "--piece-bytes", "4096",
                      "--metrics-port", "9100", "--redis-timeout-s", "0.1"])
    assert (cfg.redis_url, cfg.piece_bytes, cfg.metrics_port, cfg.redis_timeout_s) == \
        ("redis://h:1/2", 4096, 9100, 0.1)
    with pytest.raises(ValueError):
        CacheServiceConfig(piece_bytes=0)
    with pytest.raises(ValueError):
        CacheServiceConfig(redis_url="localhost:6379")
