"""Object stores: the protocol the filesystem core reads through, and its implementations.

Provider differences (listing, etag/generation as cache identity, error codes) stay in here;
everything above sees `ObjectInfo`, `Listing` and the domain errors of `sidecar.errors`.
"""

from sidecar.store.base import DirInfo, Listing, ObjectInfo, ObjectStore, StoreStats

__all__ = ["DirInfo", "Listing", "ObjectInfo", "ObjectStore", "StoreStats"]
