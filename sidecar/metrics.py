"""Prometheus metrics of the daemon (text format through prometheus-client), built on request
from the per-mount state and the counters the workers report. Never carries a secret: only
mount names, providers and numbers."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sidecar.states import STATES


class _DaemonCollector:
    def __init__(self, daemon: Any) -> None:  # a sidecar.daemon.Daemon (not imported: no cycle)
        self.daemon = daemon

    def collect(self) -> Any:
        state = GaugeMetricFamily("storage_sidecar_mount_state", "1 for the current state of each mount", labels=["mount", "state"])
        restarts = CounterMetricFamily("storage_sidecar_mount_restarts", "Times a mount process died and was mounted again", labels=["mount"])
        cache = CounterMetricFamily("storage_sidecar_cache_lookups", "Block cache lookups by outcome", labels=["mount", "outcome"])
        backend = CounterMetricFamily("storage_sidecar_backend_requests", "Requests to the backend by kind", labels=["mount", "kind"])
        fetched = CounterMetricFamily("storage_sidecar_backend_bytes_fetched", "Bytes read from the backend", labels=["mount"])
        served = CounterMetricFamily("storage_sidecar_fuse_bytes_read", "Bytes answered to the kernel's reads (not those passed through to the disk cache)",
                                     labels=["mount"])
        errors = CounterMetricFamily("storage_sidecar_fuse_errors", "FUSE requests answered with an error, by reason", labels=["mount", "reason"])
        disk = GaugeMetricFamily("storage_sidecar_disk_cache_bytes", "Bytes in the disk cache", labels=["mount"])
        latency = CounterMetricFamily("storage_sidecar_backend_seconds", "Time spent in backend calls", labels=["mount"])
        calls = CounterMetricFamily("storage_sidecar_backend_calls", "Backend calls (latency = seconds / calls)", labels=["mount"])
        memory = GaugeMetricFamily("storage_sidecar_memory_cache_bytes", "Bytes of cached and in-flight blocks", labels=["mount"])
        shared = CounterMetricFamily("storage_sidecar_shared_cache_blocks", "Blocks of the node's shared cache by outcome (hit, miss, "
                                     "stored, evicted by this mount, rejected: did not authenticate)", labels=["mount", "outcome"])
        shared_served = CounterMetricFamily("storage_sidecar_shared_cache_bytes_served", "Bytes read from the node's shared cache", labels=["mount"])
        shared_size = GaugeMetricFamily("storage_sidecar_shared_cache_bytes", "Bytes in the node's shared cache (all sidecars), as this mount last saw it",
                                        labels=["mount"])
        for m in self.daemon.mounts.values():
            for s in STATES:
                state.add_metric([m.name, s], 1.0 if m.state == s else 0.0)
            restarts.add_metric([m.name], m.restarts)
            st = m.stats or {}
            c = st.get("cache") or {}
            for outcome, key in (("memory_hit", "memory_hits"), ("disk_hit", "disk_hits"), ("miss", "misses")):
                cache.add_metric([m.name, outcome], c.get(key, 0))
            b = st.get("store") or {}
            for kind in ("get", "list", "head"):
                backend.add_metric([m.name, kind], b.get(f"{kind}_requests", 0))
            backend.add_metric([m.name, "error"], b.get("errors", 0))
            backend.add_metric([m.name, "retry"], b.get("retries", 0) + b.get("sdk_retries", 0))
            backend.add_metric([m.name, "stall"], b.get("stalled_calls", 0))
            latency.add_metric([m.name], b.get("latency_sum_s", 0.0))
            calls.add_metric([m.name], b.get("calls", 0))
            fetched.add_metric([m.name], b.get("bytes_fetched", 0))
            served.add_metric([m.name], st.get("bytes_read", 0))
            for reason, n in (st.get("errors") or {}).items():
                errors.add_metric([m.name, reason], n)
            disk.add_metric([m.name], (st.get("disk") or {}).get("used", 0))
            memory.add_metric([m.name], st.get("memory_bytes", 0))
            sh = st.get("shared")
            if sh:
                for outcome, key in (("hit", "hits"), ("miss", "misses"), ("stored", "stored"), ("evicted", "evictions"), ("rejected", "rejected")):
                    shared.add_metric([m.name, outcome], sh.get(key, 0))
                shared_served.add_metric([m.name], sh.get("bytes_served", 0))
                shared_size.add_metric([m.name], sh.get("size", 0))
        yield from (state, restarts, cache, backend, fetched, served, errors, latency, calls, disk, memory, shared, shared_served, shared_size)


def render(daemon: Any) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DaemonCollector(daemon))  # type: ignore[arg-type]
    return generate_latest(registry).decode()
