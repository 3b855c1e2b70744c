"""The one place that builds Redis clients from settings (URL, password, TLS and its CA), for every user.

The prediction cache and the alerting worker's state both get their client here, so TLS and AUTH apply to
each alike (a password is never sent over a connection the settings asked to encrypt but that is not).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pipeline.errors import ConfigError


def redis_client(url: str, *, password: str | None = None, tls: bool = False, ca_file: str | None = None,
                 timeout_s: float = 5.0, where: str = "cache.redis_url"):
    """A ``redis.asyncio.Redis`` for ``url``; ``tls`` upgrades ``redis://`` to ``rediss://`` (verified with
    ``ca_file`` when given). A URL Redis cannot parse is a ``ConfigError`` naming ``where``."""
    import redis.asyncio as aioredis

    kw: dict = {"password": password} if password else {}
    if tls and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://"):]
    if url.startswith("rediss://") and ca_file:
        kw["ssl_ca_certs"] = ca_file
    try:
        return aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                 retry_on_timeout=False, health_check_interval=0, **kw)
    except ValueError:
        raise ConfigError(f"not a Redis URL: {safe_url(url)}", where=where,
                          hint="use redis://HOST:PORT/DB, rediss://HOST:PORT/DB for TLS, or none") from None


def safe_url(url: str) -> str:
    """A Redis URL without its user and password, fit for a message or a log line."""
    try:
        u = urlsplit(url)
        host = u.hostname or ""
        port = f":{u.port}" if u.port else ""
    except ValueError:
        return "<unparsable URL>"
    return f"{u.scheme}://{host}{port}{u.path}" if u.scheme else "<unparsable URL>"
