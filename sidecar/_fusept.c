/*
 * FUSE passthrough, and zero-message opens, under pyfuse3 and libfuse 3.14.
 *
 * Since Linux 6.9 a FUSE server may hand the kernel an open file to serve an opened FUSE file's
 * reads, writes and mmap from ("passthrough"): the kernel reads the cache file itself, at the
 * disk's speed, and the server sees no READ at all. It takes two steps of the protocol:
 *   - the INIT reply sets FUSE_PASSTHROUGH in flags2 and a max_stack_depth (1 or 2);
 *   - an OPEN reply sets FOPEN_PASSTHROUGH and the backing_id that the FUSE_DEV_IOC_BACKING_OPEN
 *     ioctl (CAP_SYS_ADMIN) returned for the file to read from.
 * libfuse learned both in 3.17, and pyfuse3 neither; this machine's Debian has libfuse 3.14. Both
 * steps are answers libfuse writes to /dev/fuse, so this library sets them in those answers:
 *   - it defines fuse_session_mount(), loaded (RTLD_GLOBAL) before pyfuse3's extension so that
 *     pyfuse3's call binds here; that calls libfuse's own and then installs custom I/O
 *     (fuse_session_custom_io, public since libfuse 3.13) on the session;
 *   - the custom read notes the INIT request (does the kernel offer passthrough?) and the unique
 *     id of each OPEN request;
 *   - the custom writev patches the INIT reply, and the reply to an OPEN whose file handle the
 *     server registered (sidecar_pt_register) just before answering it.
 * Without custom splice functions libfuse neither splices requests in nor replies out, so every
 * message passes through these two functions. Nothing else is changed.
 *
 * Zero-message opens (a mount whose opens the kernel makes alone, sidecar_pt_zero_open): once
 * the server answered an OPEN with ENOSYS, the kernel sends no OPEN or RELEASE for the
 * connection's files, and their READs carry file handle 0. libfuse hands the READ
 * on with its file handle and pyfuse3 drops the node id, so the custom read puts the node id,
 * marked by ZERO_OPEN_FH, in place of that 0 (READ and FSYNC, whose arguments begin with it).
 *
 * The device reader (a C thread, on read-only mounts; STORAGE_SIDECAR_DEVICE_THREAD=0 turns it
 * off): Python's open() asks isatty() of every file it opens, which is an IOCTL request to a FUSE
 * server (TCGETS). Linux remembers no refusal of an ioctl, so each costs a round trip; through
 * pyfuse3 that is a wake of the event loop per opened file, the gap between a page-cached epoch
 * of small files and the local disk's (benchmarks/results/HISTORY.md).
 * So the thread owns /dev/fuse: it reads every request, answers an IOCTL itself (ENOTTY, the
 * answer libfuse gives for a server without an ioctl handler, as the kernel turns ENOSYS into
 * it), and queues every other request, in order, for libfuse. The session's fd becomes an
 * eventfd that counts the queued requests, so pyfuse3 waits on it as it waited on the device,
 * and the custom read takes the next request from the queue. Replies are written to the device
 * as before. At unmount the thread is stopped and the device closed before libfuse unmounts
 * (libfuse closes the device first so that a synchronous unmount cannot wait on this process).
 * Not on writable mounts: a WRITE's data would be copied once more, between the threads, which
 * costs a writer more CPU per byte than the IOCTLs it saves (HISTORY.md).
 *
 * Large replies are written with the GIL released. pyfuse3 answers a READ from Python, holding
 * the GIL, and the kernel copies the reply's bytes into the reader's pages inside that writev.
 * Held, the GIL stopped the threads that receive the next blocks and write the disk cache for
 * much of a cold read's time (py-spy --gil; benchmarks/results/HISTORY.md).
 * A small reply (a lookup, an attribute) keeps it: taking the GIL back may wait for another
 * thread's switch interval, which costs more than such a reply's copy.
 *
 * Struct layouts are the kernel's ABI (include/uapi/linux/fuse.h, protocol 7.40), not libfuse's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>  /* (first: it sets feature macros, _GNU_SOURCE among them) */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>

struct pt_in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};
struct pt_out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};

enum {
    OP_OPEN = 14,
    OP_READ = 15,
    OP_FSYNC = 20,
    OP_INIT = 26,
    OP_IOCTL = 39,
};
#define ZERO_OPEN_FH (1ull << 63)    /* a handle-less request's node id, as its file handle */
#define INIT_EXT (1u << 30)          /* fuse_init_in/out.flags: flags2 is valid */
#define INIT_WRITEBACK (1u << 16)    /* FUSE_WRITEBACK_CACHE: the kernel refuses passthrough with it */
#define INIT2_PASSTHROUGH (1u << 5)  /* FUSE_PASSTHROUGH (1 << 37), in flags2 */
#define STACK_DEPTH 2                /* the cache may itself be on a stacked file system (overlayfs) */
#define FOPEN_DIRECT_IO (1u << 0)
#define FOPEN_NOFLUSH (1u << 5)
#define FOPEN_PARALLEL_DIRECT_WRITES (1u << 6)
#define FOPEN_PASSTHROUGH (1u << 7)
/* The only flags the kernel accepts beside FOPEN_PASSTHROUGH (keep_cache would fail the open). */
#define FOPEN_PASSTHROUGH_MASK (FOPEN_DIRECT_IO | FOPEN_NOFLUSH | FOPEN_PARALLEL_DIRECT_WRITES)

/* fuse_init_in: major, minor, max_readahead, flags, flags2 (u32 each) */
#define INIT_IN_FLAGS 3
#define INIT_IN_FLAGS2 4
/* fuse_init_out: flags at u32 3, flags2 at u32 8, max_stack_depth at u32 9 */
#define INIT_OUT_FLAGS 3
#define INIT_OUT_FLAGS2 8
#define INIT_OUT_STACK 9
#define OPEN_OUT_SIZE 16 /* fh (u64), open_flags (u32), backing_id (i32) */

#define SLOTS 256
#define MAX_PAGES 256                /* libfuse 3.14's FUSE_MAX_MAX_PAGES: its buffer's size */
#define HEADER_ROOM 0x1000           /* libfuse's FUSE_BUFFER_HEADER_SIZE */
#define SMALL_REQUEST 65536          /* a request up to this size is copied out of the big buffer */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int hooked;   /* custom I/O installed on the session */
static int offered;  /* the kernel's INIT offered passthrough */
static int active;   /* our INIT reply asked for it */
static int zero_open;  /* handle-less READ and FSYNC carry their node id (see above) */
static int dev_fd = -1;
static uint64_t init_unique = UINT64_MAX;
static uint64_t opens[SLOTS];  /* OPEN requests not answered yet (0: free) */
static struct {
    uint64_t fh;
    int32_t backing_id;  /* 0: free */
} registered[SLOTS];

/* What the hook needs to know of a request, read from the device: the INIT's offer, the OPENs
 * to answer, and a handle-less READ or FSYNC's node id. */
static void note_request(void *buf, ssize_t n)
{
    if (n < (ssize_t)sizeof(struct pt_in_header))
        return;
    const struct pt_in_header *in = buf;
    if (in->opcode == OP_INIT && n >= (ssize_t)(sizeof *in + 5 * sizeof(uint32_t))) {
        const uint32_t *arg = (const uint32_t *)(in + 1);
        init_unique = in->unique;
        offered = (arg[INIT_IN_FLAGS] & INIT_EXT) && (arg[INIT_IN_FLAGS2] & INIT2_PASSTHROUGH);
    } else if (__atomic_load_n(&zero_open, __ATOMIC_ACQUIRE) && (in->opcode == OP_READ || in->opcode == OP_FSYNC)
               && n >= (ssize_t)(sizeof *in + sizeof(uint64_t))) {
        uint64_t fh;
        memcpy(&fh, (const char *)buf + sizeof *in, sizeof fh);
        if (fh == 0) {
            fh = in->nodeid | ZERO_OPEN_FH;
            memcpy((char *)buf + sizeof *in, &fh, sizeof fh);
        }
    } else if (in->opcode == OP_OPEN) {
        pthread_mutex_lock(&lock);
        for (int i = 0; i < SLOTS; i++) {
            if (!opens[i]) {
                opens[i] = in->unique;
                break;
            }
        }  /* (none free: this open is answered as it is, not passed through) */
        pthread_mutex_unlock(&lock);
    }
}

/* The device reader's queue (see the top). */
struct request {
    struct request *next;
    char *data;
    size_t len;
};
static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static struct request *queue_head, *queue_tail;
static int queue_errno;        /* the device's error (ENODEV: unmounted), once the reader ended */
static int count_fd = -1;      /* the reader's descriptor of the eventfd libfuse holds (and may close) */
static int stop_fd = -1;       /* an eventfd: stop reading */
static pthread_t reader;
static int reading;            /* the reader thread runs */
static int reader_wanted = 1;  /* sidecar_pt_device_reader */
static uint64_t ioctls;        /* IOCTL requests the reader answered */
static size_t device_buffer;

static void answer(uint64_t unique, int error)
{
    struct pt_out_header out = {.len = sizeof out, .error = -error, .unique = unique};
    if (write(dev_fd, &out, sizeof out) < 0) {
        /* the request was interrupted (ENOENT) or the connection ended: nothing waits for it */
    }
}

static void enqueue(struct request *r)
{
    pthread_mutex_lock(&queue_lock);
    if (queue_tail)
        queue_tail->next = r;
    else
        queue_head = r;
    queue_tail = r;
    pthread_mutex_unlock(&queue_lock);
    uint64_t one = 1;
    if (write(count_fd, &one, sizeof one) < 0) {
        /* an eventfd's counter cannot overflow at one request each */
    }
}

static void *read_device(void *unused)
{
    (void)unused;
    char *buf = malloc(device_buffer);
    struct pollfd fds[2] = {{.fd = dev_fd, .events = POLLIN}, {.fd = stop_fd, .events = POLLIN}};
    int error = buf ? 0 : ENOMEM;
    while (!error) {
        if (poll(fds, 2, -1) < 0) {
            if (errno != EINTR)
                error = errno;
            continue;
        }
        if (fds[1].revents)
            break;
        ssize_t n = read(dev_fd, buf, device_buffer);
        if (n < 0) {
            /* EAGAIN: nothing after all; ENOENT: interrupted before it was read */
            if (errno != EAGAIN && errno != EINTR && errno != ENOENT)
                error = errno;
            continue;
        }
        const struct pt_in_header *in = (const void *)buf;
        if (n >= (ssize_t)sizeof *in && in->opcode == OP_IOCTL) {
            answer(in->unique, ENOTTY);
            __atomic_add_fetch(&ioctls, 1, __ATOMIC_RELAXED);
            continue;
        }
        note_request(buf, n);
        struct request *r = malloc(sizeof *r);
        if (!r) {
            error = ENOMEM;
            continue;
        }
        r->next = NULL;
        r->len = (size_t)n;
        if (n <= SMALL_REQUEST) {
            r->data = malloc(n ? (size_t)n : 1);
            if (r->data)
                memcpy(r->data, buf, (size_t)n);
        } else {  /* a big one (a WRITE): its buffer is handed on, not copied */
            r->data = buf;
            buf = malloc(device_buffer);
            error = buf ? 0 : ENOMEM;
        }
        if (!r->data) {
            free(r);
            error = ENOMEM;
            continue;
        }
        enqueue(r);
    }
    free(buf);
    pthread_mutex_lock(&queue_lock);
    queue_errno = error ? error : ENODEV;
    pthread_mutex_unlock(&queue_lock);
    uint64_t many = UINT64_MAX / 2;  /* readable for good: every later read gets the error */
    if (write(count_fd, &many, sizeof many) < 0) {
        /* nothing to do */
    }
    return NULL;
}

static ssize_t pt_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    if (!reading) {
        ssize_t n = read(fd, buf, len);
        note_request(buf, n);
        return n;
    }
    uint64_t count;
    if (read(fd, &count, sizeof count) < 0)
        return -1;
    pthread_mutex_lock(&queue_lock);
    struct request *r = queue_head;
    if (r) {
        queue_head = r->next;
        if (!queue_head)
            queue_tail = NULL;
    }
    int error = queue_errno;
    pthread_mutex_unlock(&queue_lock);
    if (!r) {
        errno = error ? error : EAGAIN;
        return -1;
    }
    ssize_t n = (ssize_t)r->len;
    if (r->len <= len)
        memcpy(buf, r->data, r->len);
    else
        n = -1, errno = EIO;  /* (libfuse's buffer is the size of the reader's) */
    free(r->data);
    free(r);
    return n;
}

#define UNLOCKED_REPLY (64 * 1024)  /* bytes from which a reply is written without the GIL */

/* writev(2) of a reply, with the GIL released if the calling thread holds it and the reply is
 * large (see the top of this file). Exported for a test. */
ssize_t sidecar_pt_send_reply(int fd, const struct iovec *iov, int count)
{
    size_t total = 0;
    for (int i = 0; i < count; i++)
        total += iov[i].iov_len;
    if (total < UNLOCKED_REPLY || !Py_IsInitialized() || !PyGILState_Check())
        return writev(fd, iov, count);
    ssize_t n;
    int error;
    Py_BEGIN_ALLOW_THREADS
    n = writev(fd, iov, count);
    error = errno;
    Py_END_ALLOW_THREADS
    errno = error;
    return n;
}

/* The reply with iov[1] replaced by `arg` (a patched copy of it). */
static ssize_t send_patched(int fd, const struct iovec *iov, void *arg, size_t size)
{
    struct iovec out[2] = {iov[0], {.iov_base = arg, .iov_len = size}};
    return writev(fd, out, 2);
}

static ssize_t pt_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    fd = dev_fd;  /* (libfuse's session fd may be the reader's eventfd) */
    if (count < 1 || iov[0].iov_len < sizeof(struct pt_out_header))
        return sidecar_pt_send_reply(fd, iov, count);
    const struct pt_out_header *out = iov[0].iov_base;
    uint32_t arg[32];
    if (out->unique == init_unique) {
        init_unique = UINT64_MAX;
        if (count == 2 && out->error == 0 && offered && iov[1].iov_len >= (INIT_OUT_STACK + 1) * sizeof(uint32_t)
                && iov[1].iov_len <= sizeof arg) {
            memcpy(arg, iov[1].iov_base, iov[1].iov_len);
            if ((arg[INIT_OUT_FLAGS] & INIT_EXT) && !(arg[INIT_OUT_FLAGS] & INIT_WRITEBACK)) {
                arg[INIT_OUT_FLAGS2] |= INIT2_PASSTHROUGH;
                arg[INIT_OUT_STACK] = STACK_DEPTH;
                active = 1;
                return send_patched(fd, iov, arg, iov[1].iov_len);
            }
        }
        return sidecar_pt_send_reply(fd, iov, count);
    }
    int32_t backing_id = 0;
    pthread_mutex_lock(&lock);
    int was_open = 0;
    for (int i = 0; i < SLOTS; i++) {
        if (opens[i] == out->unique) {
            opens[i] = 0;
            was_open = 1;
            break;
        }
    }
    if (was_open && count == 2 && out->error == 0 && iov[1].iov_len == OPEN_OUT_SIZE) {
        uint64_t fh;
        memcpy(&fh, iov[1].iov_base, sizeof fh);
        for (int i = 0; i < SLOTS; i++) {
            if (registered[i].backing_id && registered[i].fh == fh) {
                backing_id = registered[i].backing_id;
                registered[i].backing_id = 0;  /* one open, one answer */
                break;
            }
        }
    }
    pthread_mutex_unlock(&lock);
    if (!backing_id)
        return sidecar_pt_send_reply(fd, iov, count);
    memcpy(arg, iov[1].iov_base, OPEN_OUT_SIZE);
    arg[2] = (arg[2] & FOPEN_PASSTHROUGH_MASK) | FOPEN_PASSTHROUGH;
    arg[3] = (uint32_t)backing_id;
    return send_patched(fd, iov, arg, OPEN_OUT_SIZE);
}

/* Installs the custom I/O on `se`, with the device reader if it is wanted and starts (else
 * libfuse reads the device through pt_read). 0 on success. */
static int hook_session(struct fuse_session *se)
{
    const struct fuse_custom_io io = {.read = pt_read, .writev = pt_writev};
    const char *env = getenv("STORAGE_SIDECAR_DEVICE_THREAD");
    if (!reader_wanted || (env && strcmp(env, "0") == 0))
        return fuse_session_custom_io(se, &io, dev_fd);
    int queued = eventfd(0, EFD_CLOEXEC | EFD_SEMAPHORE);
    int counter = queued < 0 ? -1 : fcntl(queued, F_DUPFD_CLOEXEC, 0);
    int stop = eventfd(0, EFD_CLOEXEC);
    int flags = fcntl(dev_fd, F_GETFL);
    int res = -1;
    if (queued >= 0 && counter >= 0 && stop >= 0 && flags >= 0 && fcntl(dev_fd, F_SETFL, flags | O_NONBLOCK) == 0) {
        device_buffer = (size_t)MAX_PAGES * (size_t)getpagesize() + HEADER_ROOM;
        count_fd = counter, stop_fd = stop;
        reading = 1;  /* before libfuse may read through pt_read */
        if (fuse_session_custom_io(se, &io, queued) == 0) {
            if (pthread_create(&reader, NULL, read_device, NULL) == 0)
                return 0;
            res = fuse_session_custom_io(se, &io, dev_fd);  /* (libfuse does not close the eventfd) */
        }
        reading = 0;
        count_fd = stop_fd = -1;
        fcntl(dev_fd, F_SETFL, flags);
    }
    if (queued >= 0)
        close(queued);
    if (counter >= 0)
        close(counter);
    if (stop >= 0)
        close(stop);
    return res == 0 ? 0 : fuse_session_custom_io(se, &io, dev_fd);
}

/* Stops the device reader and closes the device, which ends the connection (requests still
 * queued are never answered: the kernel fails them). */
static void stop_reader(void)
{
    if (!reading)
        return;
    uint64_t one = 1;
    if (write(stop_fd, &one, sizeof one) < 0) {
        /* an eventfd accepts it */
    }
    pthread_join(reader, NULL);
    reading = 0;
    close(stop_fd);
    close(count_fd);
    stop_fd = count_fd = -1;
    close(dev_fd);
    dev_fd = -1;
    pthread_mutex_lock(&queue_lock);
    struct request *left = queue_head;
    queue_head = queue_tail = NULL;
    pthread_mutex_unlock(&queue_lock);
    while (left) {
        struct request *r = left;
        left = r->next;
        free(r->data);
        free(r);
    }
}

static void *libfuse_symbol(const char *name)
{
    void *libfuse = dlopen("libfuse3.so.3", RTLD_NOLOAD | RTLD_LAZY);
    return libfuse ? dlsym(libfuse, name) : NULL;
}

int fuse_session_mount(struct fuse_session *se, const char *mountpoint)
{
    static int (*libfuse_mount)(struct fuse_session *, const char *);
    if (!libfuse_mount)
        libfuse_mount = (int (*)(struct fuse_session *, const char *))libfuse_symbol("fuse_session_mount");
    if (!libfuse_mount)
        return -1;
    int res = libfuse_mount(se, mountpoint);
    if (res == 0) {
        dev_fd = fuse_session_fd(se);
        if (hook_session(se) == 0)
            hooked = 1;
    }
    return res;
}

void fuse_session_unmount(struct fuse_session *se)
{
    static void (*libfuse_unmount)(struct fuse_session *);
    if (!libfuse_unmount)
        libfuse_unmount = (void (*)(struct fuse_session *))libfuse_symbol("fuse_session_unmount");
    stop_reader();
    if (libfuse_unmount)
        libfuse_unmount(se);
}

void fuse_session_destroy(struct fuse_session *se)
{
    static void (*libfuse_destroy)(struct fuse_session *);
    if (!libfuse_destroy)
        libfuse_destroy = (void (*)(struct fuse_session *))libfuse_symbol("fuse_session_destroy");
    stop_reader();
    if (libfuse_destroy)
        libfuse_destroy(se);
}

/* Whether the next mount runs the device reader (see the top): called before it. */
void sidecar_pt_device_reader(int wanted)
{
    reader_wanted = wanted;
}

/* IOCTL requests the device reader answered. */
uint64_t sidecar_pt_ioctls(void)
{
    return __atomic_load_n(&ioctls, __ATOMIC_RELAXED);
}

/* Whether the device reader runs. */
int sidecar_pt_reading(void)
{
    return reading;
}

/* bit 0: custom I/O installed; bit 1: the kernel offered passthrough; bit 2: it was asked for;
 * bit 3: handle-less requests carry their node id */
int sidecar_pt_state(void)
{
    return hooked | offered << 1 | active << 2 | zero_open << 3;
}

/* From now on a READ or FSYNC with file handle 0 carries its node id (| ZERO_OPEN_FH) instead:
 * to be set before the server first answers an OPEN with ENOSYS. */
void sidecar_pt_zero_open(void)
{
    __atomic_store_n(&zero_open, 1, __ATOMIC_RELEASE);
}

int sidecar_pt_fd(void)
{
    return dev_fd;
}

/* The next answer to an OPEN that returns file handle `fh` passes it through to `backing_id`.
 * 0, or -1 when every slot is taken (answer that open as it is). */
int sidecar_pt_register(uint64_t fh, int32_t backing_id)
{
    int res = -1;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < SLOTS; i++) {
        if (!registered[i].backing_id) {
            registered[i].fh = fh;
            registered[i].backing_id = backing_id;
            res = 0;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    return res;
}

/* Whether a registration for `fh` is still waiting for its answer: after that answer was sent,
 * it means the answer was not passed through (its OPEN was not noted: every slot was taken). */
int sidecar_pt_pending(uint64_t fh)
{
    int res = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < SLOTS; i++) {
        if (registered[i].backing_id && registered[i].fh == fh)
            res = 1;
    }
    pthread_mutex_unlock(&lock);
    return res;
}

/* Forgets a registration that no answer consumed. */
void sidecar_pt_unregister(uint64_t fh)
{
    pthread_mutex_lock(&lock);
    for (int i = 0; i < SLOTS; i++) {
        if (registered[i].backing_id && registered[i].fh == fh)
            registered[i].backing_id = 0;
    }
    pthread_mutex_unlock(&lock);
}
