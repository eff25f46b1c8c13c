"""Modification times to the nanosecond.

A float of seconds since the epoch holds about 16 significant digits: at today's times that is a
quarter of a microsecond, so `1796233250.817603073` came back as `...817603072`, and tools that
compare mtimes exactly (`make`, rsync without a window) see a change that never happened. An
`Mtime` is still such a float everywhere a float is used, and carries the exact nanoseconds from
where they were known (the kernel's setattr, rclone's `mtime` metadata) to where they are written
(the metadata, the mtime index, the kernel's attributes).

Text forms, both rclone's: on S3 seconds with a decimal fraction ("1796233250.817603073"); on
Azure and GCS RFC 3339 in UTC with up to nine fraction digits ("2026-12-02T19:00:50.817603073Z").
"""

from __future__ import annotations

import calendar
import re
import time

NS = 1_000_000_000
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9})\d*)?(Z|z|[+-]\d\d:\d\d)")


class Mtime(float):
    """Seconds since the epoch (a float) with its exact nanoseconds in `ns`."""

    ns: int

    def __new__(cls, ns: int) -> "Mtime":
        obj = super().__new__(cls, ns / NS)
        obj.ns = int(ns)
        return obj

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Mtime, (self.ns,))

    @classmethod
    def parse_seconds(cls, text: str) -> "Mtime | None":
        """`"1796233250.817603073"` (digits after the point beyond nine are dropped)."""
        m = re.fullmatch(r"\s*(-?)(\d+)(?:\.(\d*))?\s*", text)
        if m is None:
            return None
        frac = (m.group(3) or "")[:9].ljust(9, "0")
        ns = int(m.group(2)) * NS + int(frac)
        return cls(-ns if m.group(1) else ns)

    @classmethod
    def parse_rfc3339(cls, text: str) -> "Mtime | None":
        m = _RFC3339.fullmatch(text.strip())
        if m is None:
            return None
        year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
        zone = m.group(8)
        if zone not in ("Z", "z"):
            sign = 1 if zone[0] == "+" else -1
            seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
        return cls(seconds * NS + int((m.group(7) or "").ljust(9, "0")))


def ns_of(t: float) -> int:
    """The nanoseconds of a time: exact for an Mtime, the float's nearest otherwise."""
    return t.ns if isinstance(t, Mtime) else round(t * NS)


def seconds_text(t: float) -> str:
    """rclone's S3 form: seconds with nine fraction digits, exact for an Mtime."""
    ns = ns_of(t)
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    return f"{sign}{ns // NS}.{ns % NS:09d}"


def rfc3339_text(t: float) -> str:
    """rclone's Azure and GCS form: RFC 3339, UTC, nine fraction digits."""
    ns = ns_of(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // NS)) + f".{ns % NS:09d}Z"
