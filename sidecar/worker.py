"""One mount, one process: serves a single FUSE mount of one storage.

pyfuse3 serves one file system per process (its session is module state), so the daemon runs a
worker per mount. That also isolates mounts: a crash takes down one mount, not all of them.

Protocol with the daemon (sidecar.protocol): the first stdin line is the mount's
`WorkerConfig`; the worker answers `Mounted` once the kernel mount exists, `Failed` if it could
not be mounted, and each command with its answer; stdin closed, `Stop`, SIGTERM or SIGINT:
unmount and exit 0. Logs go to stderr.
"""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import sqlite3
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from sidecar import log, passthrough, rescue, urls  # (passthrough: before pyfuse3 is loaded; see there)
from sidecar.cache.blocks import BlockCache
from sidecar.cache.disk import DiskTier, writing as disk_writing
from sidecar.cache.shared import SharedBlocks, VersionId
from sidecar.cache.warmup import Prefetcher, PrefetchRefused
from sidecar.errors import SidecarError
from sidecar.mounthelper import HelperError, mount
from sidecar.mounttable import UnsafeMountPath
from sidecar.private import private_folder
from sidecar.process import clear_stale_mount, command_lines, default_cache_dir, emit, fuse_init, prepare_mountpoint, read_command, read_config_line
from sidecar.protocol import (
    Checked, Copying, Failed, Mount, Mounted, Prefetch, PrefetchStarted, Publish, Published, Push, Pushed, Refresh, Refreshed,
    REOPENS_TO_SWITCH, RescueUpload, RescueUploaded, Stats, StatsReport, Stop, WorkerConfig, WorkerStats,
)
from sidecar.vfs.core import Filesystem
from sidecar.vfs.mtimes import MtimeIndex
from sidecar.vfs.staging import SPARES, StagingArea

logger = log.get_logger("sidecar.worker")
FUSE_MAX_BACKGROUND = 64  # read-ahead requests the kernel sends a mount at once (its default: 12)
WARM_UP_S = 3.0  # at most this long for the warm-up listing before the mount is announced
DISK_DRAIN_S = 5.0  # s an exiting worker waits for its disk cache's writes
CLOSE_STORE_S = 2.0  # at most this long for a store to close its connections when the worker ends


async def open_store(cfg: WorkerConfig, url: urls.StorageURL) -> tuple[Any, Any]:
    """The storage's store, its SDK client built now (not on the first read), and the listing of
    its folder when the check's LIST held all of it (else None). With `cfg.preflight`, the
    storage is checked first with that client (so one client per storage, not one for the
    check and one for the mount): the worker reports `checked` and waits for the daemon's
    `mount` (the daemon first clears the mount path), or reports the check's error code and
    returns no store."""
    from sidecar import preflight
    from sidecar.store.azure import CredentialsMissing
    from sidecar.store.factory import build_store

    try:
        store = build_store(cfg.storage_id, url, cfg.options, cfg.credentials, deadline=cfg.mount.deadline)
    except CredentialsMissing:
        if not cfg.preflight:
            raise
        emit(Failed("credentials_missing", f"no credentials for storage {cfg.name!r}"))
        return None, None
    await store.warm_up()
    if not cfg.preflight:
        await rehearse_read(store, cfg)
        return store, None
    listed: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rehearse_read, store, cfg)  # its CPU while the check waits for the network
        result = await preflight.check(cfg.name, url, cfg.options, cfg.credentials, source_path=cfg.mount.source_path, writable=not cfg.readonly,
                                       write_probe=cfg.write_probe, deadline=cfg.check_deadline, store=store, listed=listed.append)
    logger.info("preflight", mount=cfg.name, code=result.code)
    if not result.ok:
        emit(Failed(result.code, result.reason))
        return None, None
    emit(Checked())
    if not isinstance(await trio.to_thread.run_sync(read_command, abandon_on_cancel=True), Mount):
        return None, None  # the daemon went away, or changed its mind
    return store, (listed[0] if listed else None)


async def rehearse_read(store: Any, cfg: WorkerConfig) -> None:
    """Reads an object of the store's rehearsal (answered inside the SDK, no request is sent)
    through the same code a reader's first read runs: FUSE operations, the file system, the block
    cache, the store; then stats it (a lookup's HEAD). A forked worker copies the template's
    pages that code touches on its first run, and the SDK builds per-operation state; here,
    before the mount is announced, not on the session's first read. Throwaway instances:
    nothing of it stays in the mount's caches."""
    from sidecar.fuse_ops import FuseOps
    from sidecar.store.base import ObjectInfo
    from sidecar.store.s3 import REHEARSAL_KEY, REHEARSAL_SIZE

    rehearsal = getattr(store, "rehearsal", None)
    if rehearsal is None or not (cfg.credentials or cfg.options.get("anonymous")):
        return  # without credentials the SDK cannot sign even a rehearsal (and the check says why)
    try:
        async with rehearsal():
            cache = BlockCache(store, block_size=cfg.cache.block_size, memory_limit=max(REHEARSAL_SIZE, cfg.cache.block_size), storage_id=cfg.storage_id,
                               fetch_size=cfg.cache.fetch_size, max_fetches=cfg.cache.max_fetches)
            async with trio.open_nursery() as nursery:
                await nursery.start(cache.run)
                fs = Filesystem(store, cache)
                ops = FuseOps(fs, mount_name=cfg.name, passthrough_wanted=False)
                node = fs.inodes.for_entry(REHEARSAL_KEY, False, ObjectInfo(REHEARSAL_KEY, REHEARSAL_SIZE, "0", 0.0), trio.current_time())
                with trio.fail_after(cfg.mount.deadline):
                    info = await ops.open(node.ino, os.O_RDONLY, None)
                    for offset in range(0, REHEARSAL_SIZE, 1 << 20):  # as the kernel reads a file read whole
                        await ops.read(info.fh, offset, 1 << 20)
                    await ops.release(info.fh)
                    await store.stat(REHEARSAL_KEY)
                nursery.cancel_scope.cancel()
    except Exception as exc:  # only a warm-up
        logger.debug("read_rehearsal_failed", error=type(exc).__name__, detail=str(exc)[:200])


def kernel_readahead_kb(cfg: WorkerConfig) -> int:
    """The mount's kernel read-ahead window: its manifest's, else the daemon's."""
    return cfg.mount.kernel_readahead_kb or cfg.cache.kernel_readahead_kb


def raise_kernel_readahead(real_mountpath: str, kb: int, background: int = FUSE_MAX_BACKGROUND) -> None:
    """The kernel reads ahead 128 KiB on a FUSE mount by default; a larger window keeps more
    requests in flight for sequential readers, which raised warm throughput (benchmarks/results/
    HISTORY.md). It also sends at most 12 read-ahead requests of a mount at once, and a reader
    that would send more waits in the kernel (pyarrow's pre-buffering of eight column chunks
    waited for each other): `background` raises that bound through the FUSE control file system
    (mounted here if it is not). Best effort: needs a writable /sys (root in the pod)."""
    # Runs on the event loop, which serves the mount: nothing here may touch the mount point
    # (stat, realpath would wait for this very process). The device number comes from
    # mountinfo, and the caller resolved the path before mounting.
    real = real_mountpath
    try:
        with open("/proc/self/mountinfo") as f:
            devs = [line.split()[2] for line in f if line.split()[4].replace("\\040", " ") == real]
        if not devs:
            return
        with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as exc:
        logger.debug("kernel_readahead_unchanged", reason=str(exc))
        return
    major, minor = (int(n) for n in devs[-1].split(":"))
    control = f"{FUSE_CONTROL}/{os.makedev(major, minor)}"
    if not os.path.isdir(control) and not mount_fuse_control():
        return
    try:
        for name, value in (("max_background", background), ("congestion_threshold", background * 3 // 4)):
            with open(f"{control}/{name}", "w") as f:
                f.write(str(value))
    except OSError as exc:
        logger.debug("fuse_background_unchanged", reason=str(exc))


FUSE_CONTROL = "/sys/fs/fuse/connections"


def mount_fuse_control() -> bool:
    """Mounts the FUSE control file system where the kernel expects it, if nothing is mounted
    there: systemd does so at boot, a machine or container without it has none, and the
    kernel's bound of 12 read-ahead requests then stays. Best effort (root, a writable /sys):
    whether it is mounted now."""
    if os.path.ismount(FUSE_CONTROL):
        return True
    try:
        mount("fusectl", FUSE_CONTROL, "fusectl")
    except OSError as exc:
        logger.debug("fuse_control_not_mounted", reason=exc.strerror)
        return False
    logger.info("fuse_control_mounted", path=FUSE_CONTROL)
    return True


def stall_counts(store: Any) -> dict[str, int]:
    """`stalled_now`: calls in flight without progress for 5 s; `stalled_calls`: every call that
    stalled so far (ended ones and those now), so a stall between two polls is seen too."""
    now = store.stalled_calls()
    return {"stalled_now": now, "stalled_calls": store.stats.stalls + now}


def mount_options(cfg: WorkerConfig) -> set[str]:
    import pyfuse3

    opts = set(pyfuse3.default_options)
    opts.add(f"fsname=storage-sidecar:{cfg.name}")
    opts.add("subtype=storage-sidecar")
    opts.add("noatime")
    if cfg.readonly:
        opts.add("ro")
    if cfg.allow_other:
        opts.add("allow_other")
    return opts


def storage_dir_name(cfg: WorkerConfig) -> str:
    return hashlib.sha256(cfg.storage_id.encode()).hexdigest()[:16]


async def serve_copy(cfg: WorkerConfig) -> int:
    """Copy mode: download the storage's folder into the mount path, report progress, then stay
    (for `stats` and `push`) until told to stop."""
    url = urls.parse(cfg.url)
    store, _ = await open_store(cfg, url)
    if store is None:
        return 1
    try:
        return await copy_and_serve(cfg, url, store)
    finally:
        await close_store(store)


async def copy_and_serve(cfg: WorkerConfig, url: urls.StorageURL, store: Any) -> int:
    from sidecar.copier import Copier, CopyRefused

    try:
        dest = prepare_mountpoint(cfg.root, cfg.mountpath)
    except UnsafeMountPath as exc:
        emit(Failed("mount_path_unsafe", str(exc)))
        return 1
    copier = Copier(store, url.key_prefix(cfg.mount.source_path), dest, limit=cfg.mount.copy_limit, fetch_size=cfg.cache.fetch_size)
    refused: list[str] = []

    async def copy() -> None:
        try:
            await copier.run()
        except CopyRefused as exc:
            refused.append(str(exc))
            logger.error("copy_refused", mount=cfg.name, reason=str(exc))
        except SidecarError as exc:
            copier.progress.state = "failed"
            refused.append(f"{exc.code}: {exc}")

    async def commands() -> None:
        async for cmd in command_lines():
            if isinstance(cmd, Stats):
                emit(StatsReport({"store": {**store.stats.as_dict(), **stall_counts(store)},
                                  "copy": {**copier.progress.public(), "refused": refused[0] if refused else None}}))
            elif isinstance(cmd, Stop):
                return
            elif isinstance(cmd, Push):
                if cfg.readonly:
                    emit(Pushed(ok=False, reason="the storage is read-only"))
                else:
                    emit(Pushed(ok=True, **await copier.push()))

    emit(Copying(mountpath=dest))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(copy)
        nursery.start_soon(stop_on_signal, nursery.cancel_scope.cancel)
        await commands()
        nursery.cancel_scope.cancel()
    return 0


async def stop_on_signal(stop: Any) -> None:
    """Calls `stop` at the first SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        async for signum in received:
            logger.info("signal_received", signal=signal.Signals(signum).name)
            stop()
            return


async def serve(cfg: WorkerConfig) -> int:
    if cfg.mount.mode == "copy":
        return await serve_copy(cfg)
    url = urls.parse(cfg.url)
    store, checked_listing = await open_store(cfg, url)
    if store is None:
        return 1
    try:
        worker = MountWorker(cfg, url, store)
        await worker.open_caches(checked_listing)
        return await worker.run()
    finally:
        await close_store(store)


async def close_store(store: Any) -> None:
    """Closes the store's own connections (the SDK's are fsspec's), within a bound: a worker
    that ends is not held by a server that does not answer."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_STORE_S):
        try:
            await store.close()
        except Exception as exc:  # its connections end with the process anyway
            logger.debug("store_not_closed", error=type(exc).__name__)


class MountWorker:
    """One FUSE mount of one storage: its caches and file system, the mount, the daemon's
    commands (a method each), and the unmount that stores what is committed first."""

    def __init__(self, cfg: WorkerConfig, url: urls.StorageURL, store: Any) -> None:
        self.cfg = cfg
        self.url = url
        self.store = store
        self.disk: DiskTier | None = None
        self.staging: StagingArea | None = None
        self.shared_problem: str | None = None  # why the node's shared cache could not be opened
        self.cache: BlockCache
        self.fs: Filesystem
        self.ops: Any = None
        self.prefetcher: Prefetcher
        self.mountpath = cfg.mountpath
        self.handlers = {Stats: self.on_stats, Publish: self.on_publish, Refresh: self.on_refresh, Prefetch: self.on_prefetch,
                         RescueUpload: self.on_rescue_upload}

    async def open_caches(self, checked_listing: Any) -> None:
        """The disk tier, the block cache, the staging area (writable mounts), the file system."""
        from sidecar.fuse_ops import FuseOps

        cfg = self.cfg
        if cfg.cache.cache_dir:
            private_folder(cfg.cache.cache_dir)  # ours alone: cached blocks and staged files are bucket data
            self.disk = disk = await trio.to_thread.run_sync(DiskTier, Path(cfg.cache.cache_dir) / storage_dir_name(cfg), cfg.cache.disk_limit)
            if disk.limit < disk.configured_limit:
                logger.warning("disk_cache_limited", configured=disk.configured_limit, effective=disk.limit,
                               reason="the cache's file system has less free space than --disk-limit")
        self.cache = BlockCache(self.store, block_size=cfg.cache.block_size, memory_limit=cfg.cache.memory_limit, disk=self.disk,
                                storage_id=cfg.storage_id, fetch_size=cfg.cache.fetch_size, max_fetches=cfg.cache.max_fetches)
        if cfg.cache.shared_cache_dir:
            await self._open_shared(cfg.cache.shared_cache_dir, cfg.cache.shared_cache_limit)
        if not cfg.readonly:
            self.staging = await self._open_staging()
        mtimes = MtimeIndex(Path(cfg.cache.cache_dir) / storage_dir_name(cfg) / "mtimes.db" if cfg.cache.cache_dir else None)
        self.fs = Filesystem(
            self.store, self.cache, staging=self.staging, mtimes=mtimes, mtime_from_metadata=cfg.mount.mtime_source == "metadata",
            root_prefix=self.url.key_prefix(cfg.mount.source_path), ttl=cfg.mount.ttl, uid=cfg.uid, gid=cfg.gid, readonly=cfg.readonly,
            max_readahead_blocks=max(1, cfg.cache.readahead // cfg.cache.block_size),
            kernel_readahead=kernel_readahead_kb(cfg) * 1024, write_mode=cfg.mount.write_mode, writeback_delay=cfg.mount.writeback_delay,
        )
        if checked_listing is not None and not self.fs.mtime_from_metadata:
            # The check's LIST held the whole folder: the mount's root is listed from the start, so
            # the session's first `ls` or open there costs no request (on S3: one round trip less).
            await self.fs.adopt_listing(self.fs.root_prefix, checked_listing)
        self.ops = FuseOps(self.fs, mount_name=cfg.name, passthrough_wanted=cfg.mount.passthrough)
        self.prefetcher = Prefetcher(self.store, self.cache, self.url.key_prefix(cfg.mount.source_path), adopt=self.fs.adopt_listing,
                                     ranges=self.fs.ranges)

    async def _open_shared(self, directory: str, limit: int) -> None:
        """The node's shared cache; one that cannot be opened (a folder this user may not write,
        a broken index) is logged and the mount runs without it: it is a cache."""
        try:
            shared = await trio.to_thread.run_sync(SharedBlocks, directory, limit)
        except (OSError, sqlite3.Error) as exc:
            self.shared_problem = f"{type(exc).__name__}: {log.redact_text(str(exc))[:200]}"
            logger.warning("shared_cache_unusable", error=type(exc).__name__, detail=str(exc)[:200])
            return
        url, endpoint = self.url, str(self.cfg.options.get("endpoint_url") or self.url.endpoint or self.url.host)
        self.cache.shared = shared
        self.cache.version_of = lambda ref: VersionId(url.provider, endpoint, url.bucket, ref.key, ref.etag, ref.size, "")

    async def _open_staging(self) -> StagingArea:
        """The staging area, with what a killed predecessor left: its multipart uploads aborted,
        its files recovered (committed ones are stored again, the others kept as incomplete)."""
        cfg = self.cfg
        base = Path(cfg.cache.cache_dir or default_cache_dir())
        private_folder(base / "staging")
        staging = StagingArea(base / "staging" / f"{storage_dir_name(cfg)}-{cfg.name}", cfg.cache.staging_limit, spares=SPARES)
        if hasattr(self.store, "abort_abandoned"):
            from sidecar.store.ledger import UploadLedger

            self.store.ledger = UploadLedger(staging.directory / "uploads.jsonl")
            for key in await self.store.abort_abandoned():
                logger.warning("abandoned_upload_aborted", key=key, reason="a multipart upload of a killed worker; its file is uploaded again")
        recovered = await trio.to_thread.run_sync(lambda: staging.recover(keep_incomplete_s=cfg.incomplete_keep_days * 86400))
        for f in recovered:
            (logger.error if f.state == "incomplete" else logger.warning)("staged_file_recovered", key=f.key, size=f.size, state=f.state)
        return staging

    def _prepare_mountpath(self) -> bool:
        if self.cfg.mount_helper:
            return True  # the privileged helper checks and prepares it
        clear_stale_mount(self.cfg.mountpath)
        try:
            self.mountpath = prepare_mountpoint(self.cfg.root, self.cfg.mountpath)
        except UnsafeMountPath as exc:
            emit(Failed("mount_path_unsafe", str(exc)))
            return False
        return True

    # -- the daemon's commands -----------------------------------------------------------------

    def stats(self) -> WorkerStats:
        fs, disk, staging = self.fs, self.disk, self.staging
        return {
            "store": {**self.store.stats.as_dict(), **stall_counts(self.store)},
            "cache": self.cache.stats.as_dict(),
            "memory_bytes": self.cache.memory_bytes,
            "link": self.cache.link.as_dict(),
            "disk": {"used": disk.used, "limit": disk.limit, "configured_limit": disk.configured_limit, "blocks": len(disk), "writing": disk_writing(disk),
                     "corrupt": disk.corrupt, "evictions": disk.evictions, "errors": disk.errors,
                     "direct_reads": disk.direct_reads}
            if disk is not None
            else None,
            "shared": self.cache.shared.as_dict() if self.cache.shared is not None else ({"unusable": self.shared_problem} if self.shared_problem else None),
            "errors": dict(self.ops.errors),
            "requests": {**self.ops.requests, **passthrough.answered_in_hook()},
            "bytes_read": self.ops.bytes_read,
            "passthrough": self.ops.open_files.as_dict() if self.ops.open_files is not None else None,
            "zero_message_opens": {"state": self.ops.zero_message_opens, "readers": fs.unopened_readers} if self.cfg.mount.zero_message_opens else None,
            "inodes": fs.inode_count,
            "handles": fs.handle_count,
            "write_mode": self.cfg.mount.write_mode if staging else None,
            "unsynced": {**fs.writer.unsynced(), "old_names": len(fs.deletes)} if fs.writer else None,
            "prefetch": self.prefetcher.progress.public() if self.prefetcher.progress.state != "idle" else None,
            "staged": [f.public() for f in staging.pending()] if staging else [],
        }

    async def on_stats(self, cmd: Stats) -> None:
        emit(StatsReport(dict(self.stats())))

    async def on_publish(self, cmd: Publish) -> None:
        try:
            if self.fs.writer is None:
                raise ValueError("this mount is read-only")
            await self.fs.writer.publish(cmd.key)
            emit(Published(key=cmd.key, ok=True))
        except Exception as exc:
            emit(Published(key=cmd.key, ok=False, reason=log.redact_text(str(exc))))

    async def on_prefetch(self, cmd: Prefetch) -> None:
        try:
            progress = await self.prefetcher.start(list(cmd.paths), self.nursery)
            emit(PrefetchStarted(ok=True, files=progress.files_total, bytes=progress.bytes_total))
        except (PrefetchRefused, SidecarError) as exc:
            logger.warning("prefetch_refused", paths=list(cmd.paths), reason=str(exc))
            emit(PrefetchStarted(ok=False, reason=str(exc)))

    async def on_refresh(self, cmd: Refresh) -> None:
        entries = await self.refresh(cmd.path)
        emit(Refreshed(path=cmd.path, entries=entries))

    async def refresh(self, path: str) -> int:
        """Forgets what is cached about `path` (a folder, "" for the whole mount), in this process
        and in the kernel, so the next access asks the bucket."""
        import pyfuse3

        entries, inodes = self.fs.refresh(path)
        for parent_ino, name in entries:
            try:
                pyfuse3.invalidate_entry_async(parent_ino, name.encode("utf-8"), ignore_enoent=True)
            except Exception as exc:  # the kernel may have forgotten it already
                logger.debug("invalidate_failed", error=str(exc))

        def invalidate_inodes() -> None:  # blocking, and the kernel may need us meanwhile: a thread
            for ino in inodes:
                try:
                    pyfuse3.invalidate_inode(ino, attr_only=False)
                except Exception as exc:
                    logger.debug("invalidate_failed", error=str(exc))

        await trio.to_thread.run_sync(invalidate_inodes)
        logger.info("refreshed", path=path or "/", entries=len(entries))
        return len(entries)

    async def on_rescue_upload(self, cmd: RescueUpload) -> None:
        """Stores what the daemon moved aside from beneath the mount path (sidecar.rescue)."""
        done = await rescue.upload(self.store, self.fs.root_prefix, cmd.folder)
        logger.info("rescued_uploaded", uploaded=len(done["uploaded"]), conflicts=len(done["conflicts"]), kept=len(done["kept"]),
                    failed=len(done["failed"]))
        if done["uploaded"] or done["conflicts"]:
            await self.refresh("")
        emit(RescueUploaded(**done))

    async def control(self) -> None:
        import pyfuse3

        async for cmd in command_lines():
            if isinstance(cmd, Stop):
                break
            handler = self.handlers.get(type(cmd))  # type: ignore[call-overload]
            if handler is not None:
                await handler(cmd)
        pyfuse3.terminate()  # told to stop, or the daemon went away: do not outlive it

    # -- the mount's life ------------------------------------------------------------------------

    async def announce(self) -> None:
        """`mounted` once the mount has answered a first request (a stat of its root, from a
        thread: the loop serves it). The kernel has then finished FUSE_INIT, whose reply sets
        the read-ahead window (raised after it), and no start-up work is left for the session's
        first read."""
        try:
            await trio.to_thread.run_sync(os.stat, self.mountpath)
        except OSError as exc:
            logger.debug("first_stat_failed", error=str(exc))
        raise_kernel_readahead(self.mountpath, kernel_readahead_kb(self.cfg))
        logger.info("mounted", mount=self.cfg.name, mountpath=self.mountpath, url=self.url.canonical(),
                    write_mode=self.cfg.mount.write_mode if self.staging else None,
                    passthrough=passthrough.state() if self.ops.open_files is not None else "off",
                    zero_message_opens=self.ops.zero_message_opens)
        emit(Mounted(mountpath=self.mountpath))

    async def run(self) -> int:
        import pyfuse3

        cfg, fs = self.cfg, self.fs
        if not self._prepare_mountpath():
            return 1
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self.cache.run)
            if self.cache.shared is not None:  # what writers killed midway left in the node's shared cache
                nursery.start_soon(partial(trio.to_thread.run_sync, self.cache.shared.sweep, abandon_on_cancel=True))
            if not cfg.preflight:  # the check has listed the mount's folder with this client already
                with trio.move_on_after(min(cfg.mount.deadline, WARM_UP_S)):
                    failed = await fs.warm_up()
                    if failed:
                        logger.info("warm_up_failed", code=failed)
            try:
                _helper_conn = fuse_init(self.ops, self.mountpath, mount_options(cfg), cfg.mount_helper, name=cfg.name, readonly=cfg.readonly)
            except (RuntimeError, OSError, HelperError) as exc:
                emit(Failed("mount_failed", str(exc)))
                nursery.cancel_scope.cancel()
                return 1
            if cfg.mount.zero_message_opens:
                auto = cfg.mount.zero_message_opens == "auto"
                state = self.ops.switch_after_reopens(REOPENS_TO_SWITCH) if auto else self.ops.open_without_requests()
                if state != "on" and not state.startswith("auto"):
                    logger.warning("zero_message_opens_unavailable", reason=state)
            try:
                nursery.start_soon(self.announce)
                nursery.start_soon(self.control)
                nursery.start_soon(stop_on_signal, pyfuse3.terminate)
                if fs.writer is not None:
                    await nursery.start(fs.writer.run)
                    await nursery.start(fs.store_mtimes)
                    await nursery.start(fs.deletes.run)
                if cfg.mount.prefetch:
                    nursery.start_soon(self.on_prefetch, Prefetch(tuple(cfg.mount.prefetch)))
                await pyfuse3.main()
            finally:
                stopping = trio.current_time()
                await self._store_before_unmount()
                pyfuse3.close(unmount=True)
                logger.info("unmounted", mount=cfg.name, mountpath=self.mountpath)
                # The disk cache's writes still going out (a read's last blocks), bounded, and
                # within the grace period: after a restart they are read from disk, not fetched.
                until = min(trio.current_time() + DISK_DRAIN_S, stopping + cfg.grace_period - 1)
                with trio.CancelScope(shield=True), trio.move_on_at(until):
                    await self.cache.disk_writes.none_left()
                nursery.cancel_scope.cancel()
        return 0

    async def _store_before_unmount(self) -> None:
        """Stores every committed file, bounded by the grace period. What does not make it stays
        staged and is stored at the next start; files still open with uncommitted changes are
        kept as incomplete, never published."""
        writer, staging = self.fs.writer, self.staging
        if writer is None or staging is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self.cfg.grace_period - 2):
            await writer.upload_pending(only_idle=False)
            await self.fs.flush_mtimes()
            await self.fs.deletes.flush()
        writer.abandon_uncommitted()
        for f in staging.pending():
            logger.error("left_in_staging", key=f.key, size=f.size, state=f.state, local_path=str(f.data_path))


GC_THRESHOLDS = (50_000, 20, 20)
M_MMAP_THRESHOLD = -3  # glibc's malloc.h
BLOCK_MMAP_THRESHOLD = 512 << 10


def return_freed_blocks() -> bool:
    """Has glibc give allocations from 512 KiB up (cache blocks, bodies of ranged GETs) their own
    mapping, returned to the kernel when freed. Its default threshold rises to the size of any
    such allocation freed, after which blocks came from the heap and arenas, and memory the
    cache had evicted stayed resident in their holes, and many readers went over the memory
    bound (the `readers16` benchmark). False where there is no glibc."""
    import ctypes

    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, BLOCK_MMAP_THRESHOLD))
    except (AttributeError, OSError):
        return False


def collect_less_often() -> None:
    """Python's collector runs after every 700 new objects by default: a listing page of 1,000
    keys is tens of thousands of them in botocore's parser, and each run of the older
    generations scans the growing listings the mount keeps (a sixth of a walk's CPU, py-spy).
    The template froze what it imported (gc.freeze); the rest is collected less often."""
    thresholds = os.environ.get("STORAGE_SIDECAR_GC_THRESHOLDS")
    gc.set_threshold(*(int(x) for x in thresholds.split(","))) if thresholds else gc.set_threshold(*GC_THRESHOLDS)


def main() -> None:
    return_freed_blocks()
    collect_less_often()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # never query instance metadata
    doc = read_config_line()
    for value in (doc.get("credentials") or {}).values():
        log.register_secret(value)
    try:
        cfg = WorkerConfig.from_dict(doc)
    except (TypeError, ValueError) as exc:
        emit(Failed("bad_config", str(exc)))
        sys.exit(2)
    log.configure(cfg.log_level)
    try:
        rc = trio.run(serve, cfg)
    except Exception as exc:
        logger.exception("worker_failed", mount=cfg.name)
        emit(Failed(getattr(exc, "code", "internal"), log.redact_text(str(exc))))
        rc = 1
    sys.exit(rc)


if __name__ == "__main__":
    main()
