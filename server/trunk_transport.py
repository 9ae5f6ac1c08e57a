"""The trunk's gRPC transport limits: pool, streams, keepalive, sizes.

:func:`server.trunk_service.start_trunk_server` builds its ``grpc.server``
from a :class:`TrunkTransport` (defaults below; ``[split]`` config sets
``workers``, ``max_concurrent_streams`` and ``max_connection_age_s``).

=====================================================  ======  =========================
option                                                 value   why
=====================================================  ======  =========================
workers (thread pool)                                  32      calls served at once
``maximum_concurrent_rpcs``                            32      more: refused, no queue
``grpc.max_concurrent_streams``                        4       calls per connection
``grpc.max_receive_message_length``                    64 MB   [split] max_message_mb
``grpc.max_metadata_size``                             8 KiB   headers of one call
``grpc.keepalive_time_ms``                             60 s    ping a quiet connection
``grpc.keepalive_timeout_ms``                          20 s    drop it if unanswered
``grpc.keepalive_permit_without_calls``                0       no pings without calls
``grpc.http2.max_pings_without_data``                  2       pings sent with no data
``grpc.http2.min_recv_ping_interval_without_data_ms``  30 s    ping floods
``grpc.http2.max_ping_strikes``                        2       then GOAWAY
``grpc.max_connection_idle_ms``                        300 s   idle connections closed
``grpc.max_connection_age_ms``                         600 s   every connection recycled
``grpc.max_connection_age_grace_ms``                   60 s    its calls finish first
sweep_interval_s                                       5 s     free late graphs, idle
=====================================================  ======  =========================

See :mod:`server.trunk_service` for why one slow client cannot fill the
worker pool.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["TrunkTransport"]


@dataclass(frozen=True, slots=True)
class TrunkTransport:
    """gRPC server settings of the trunk (see the module docstring)."""

    workers: int = 32
    max_concurrent_rpcs: int = 32
    max_concurrent_streams: int = 4
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_ping_interval_s: float = 30.0
    max_ping_strikes: int = 2
    max_pings_without_data: int = 2
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float = 600.0
    max_connection_age_grace_s: float = 60.0
    max_metadata_bytes: int = 8 * 1024
    sweep_interval_s: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"trunk transport {f.name} must be > 0, got {value!r}")
        if self.max_concurrent_rpcs > self.workers:
            raise ValueError(
                f"max_concurrent_rpcs ({self.max_concurrent_rpcs}) must not exceed "
                f"workers ({self.workers}): queued calls could wait behind stalled ones"
            )

    def options(self, max_message_bytes: int) -> list[tuple[str, int]]:
        """The ``grpc.server`` channel options."""

        def ms(seconds: float) -> int:
            return int(seconds * 1000)

        return [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_metadata_size", self.max_metadata_bytes),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", self.max_pings_without_data),
            (
                "grpc.http2.min_recv_ping_interval_without_data_ms",
                ms(self.min_ping_interval_s),
            ),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            ("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)),
            ("grpc.max_connection_age_ms", ms(self.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s)),
            ("grpc.so_reuseport", 0),  # never share an explicit port silently
        ]
