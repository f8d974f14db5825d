/* A viewer's frame in one call: RTP packets made, SRTP-protected in place and sent, in C.

   camrelay's per-frame send (relay/webrtc/rtpsend.py) does in Python, for each
   viewer and frame: copy the header and each payload side by side into one
   buffer, set each packet's sequence number and marker, call libsrtp's
   srtp_protect on it where it lies, and write each run of equal-size datagrams
   with one segmented sendmsg (UDP GSO).  send_frame() below does the same in
   one call: no Python runs per packet.

   libsrtp is not linked here: the caller passes the address of srtp_protect
   and the session's srtp_t, both taken from pylibsrtp's own compiled binding
   (relay/webrtc/borrowed.py), so the session, its sequence numbers and
   rollover counter are the very ones aiortc's RTCP and retransmissions use.

   Whatever cannot be sent from here (the socket's buffer is full, the route
   refuses segmentation, any other error) is handed, from that datagram on, to
   the caller's `fallback(data, segment)`, which is the Python path's own
   writer (udpbatch's Batcher.write_run): it queues on EAGAIN, gives up GSO
   where refused, counts and reports as before.  Every run after it goes there
   too, so nothing is reordered.

   Nothing from the network reaches a size or an index unchecked: every
   payload's size is checked against the buffer before anything is written,
   and the peer's address is parsed with inet_pton into a fixed-size
   sockaddr.  The GIL is held throughout: the SRTP session is the event loop
   thread's, shared with aiortc's RTCP and retransmissions, and a release
   around each sendmsg (a few microseconds) would let another thread of the
   relay (the recorder's, a to_thread call) take the GIL for up to its switch
   interval (5 ms) before the event loop got it back. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103 /* linux/udp.h, Linux 4.18 */
#endif

/* What libsrtp may add after a packet it protects: SRTP_MAX_TAG_LEN + SRTP_MAX_MKI_LEN, as pylibsrtp's margin
   (borrowed.SRTP_TRAILER_ROOM, passed in and checked to be at least this). */
#define TRAILER_ROOM_MIN 144
/* send_frame's arguments and results as this file has them: relay/webrtc/borrowed.py uses the module only when
   its FASTSEND_API is the same (an editable install's built module is not rebuilt when the source changes). */
#define API_VERSION 4
#define RTP_HEADER_MIN 12    /* version to SSRC */
#define RTP_PACKET_MAX 65535 /* what one UDP datagram carries at most, and what an int surely holds */

/* srtp_err_status_t srtp_protect(srtp_t ctx, void *rtp_hdr, int *len_ptr), libsrtp 2.x as pylibsrtp 1.0 links it */
typedef int (*srtp_protect_fn)(void *ctx, void *rtp_hdr, int *len_ptr);

static PyObject *SrtpError; /* args: (libsrtp's status,) */

/* The peer's address as a sockaddr of `family`; 0, or -1 where it is not a numeric address of that family
   (the caller then takes the Python path). */
static int parse_address(int family, PyObject *addr, struct sockaddr_storage *out, socklen_t *outlen) {
    if (!PyTuple_Check(addr) || PyTuple_GET_SIZE(addr) < 2) {
        return -1;
    }
    PyObject *host = PyTuple_GET_ITEM(addr, 0), *port_obj = PyTuple_GET_ITEM(addr, 1);
    if (!PyUnicode_Check(host) || !PyLong_Check(port_obj)) {
        return -1;
    }
    Py_ssize_t hostlen;
    const char *text = PyUnicode_AsUTF8AndSize(host, &hostlen);
    if (text == NULL) {
        PyErr_Clear();
        return -1;
    }
    long port = PyLong_AsLong(port_obj);
    if (port < 0 || port > 65535) {
        PyErr_Clear();
        return -1;
    }
    char numeric[INET6_ADDRSTRLEN];
    if (hostlen <= 0 || (size_t)hostlen >= sizeof numeric || memchr(text, '\0', (size_t)hostlen) != NULL) {
        return -1;
    }
    memcpy(numeric, text, (size_t)hostlen);
    numeric[hostlen] = '\0';
    memset(out, 0, sizeof *out);
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)out;
        if (inet_pton(AF_INET, numeric, &sin->sin_addr) != 1) {
            return -1;
        }
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        *outlen = (socklen_t)sizeof *sin;
        return 0;
    }
    if (family == AF_INET6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)out;
        /* "fe80::1%eth0": a scope by name is left to Python's own resolution */
        if (inet_pton(AF_INET6, numeric, &sin6->sin6_addr) != 1) {
            return -1;
        }
        unsigned long flowinfo = 0, scope = 0;
        if (PyTuple_GET_SIZE(addr) >= 4) {
            PyObject *f = PyTuple_GET_ITEM(addr, 2), *s = PyTuple_GET_ITEM(addr, 3);
            if (!PyLong_Check(f) || !PyLong_Check(s)) {
                return -1;
            }
            flowinfo = PyLong_AsUnsignedLong(f);
            scope = PyLong_AsUnsignedLong(s);
            if (PyErr_Occurred() || flowinfo > 0xFFFFFul || scope > 0xFFFFFFFFul) {
                PyErr_Clear();
                return -1;
            }
        }
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        sin6->sin6_flowinfo = htonl((uint32_t)flowinfo);
        sin6->sin6_scope_id = (uint32_t)scope;
        *outlen = (socklen_t)sizeof *sin6;
        return 0;
    }
    return -1;
}

typedef struct {
    int fd;
    const struct sockaddr_storage *to;
    socklen_t tolen;
    int gso;             /* segmented writes allowed on this socket */
    int fallen;          /* a run went to the fallback: every later one does too (never reordered) */
    int blocked;         /* what fell back met a full socket buffer (EAGAIN): the fallback queues it untried */
    PyObject *fallback;  /* fallback(data, segment, blocked): the Python path's writer */
    /* A lane's (send_batch): its session, which with `fallback` is held from the first call of the fallback on
       (`held`; the caller lets both go), as that Python may unbind the lane while the session's srtp_t is still
       in use. Not before: two reference counts a viewer-packet on objects nothing else touches then. NULL for
       send_frame, whose caller holds both. */
    PyObject *session;
    int held;
    unsigned char *base; /* the buffer */
    Py_ssize_t datagrams, syscalls; /* written here (the fallback counts its own) */
    /* protected so far (their sequence numbers spent in the SRTP session, even where the frame then failed):
       packets, their bytes as protected, their payloads' bytes */
    Py_ssize_t packets;
    size_t protected_bytes, octets;
} Route;

/* One sendmsg of `len` bytes at `data`: a segmented write of `segment`-byte datagrams, or one datagram
   (segment 0). 0: sent; else the errno that stopped it. */
static int send_once(const Route *r, unsigned char *data, size_t len, uint16_t segment) {
    struct iovec iov = {.iov_base = data, .iov_len = len};
    struct msghdr msg;
    union {
        char buf[CMSG_SPACE(sizeof(uint16_t))];
        struct cmsghdr align;
    } control;
    memset(&msg, 0, sizeof msg);
    msg.msg_name = (void *)r->to;
    msg.msg_namelen = r->tolen;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (segment) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_UDP;
        cm->cmsg_type = UDP_SEGMENT;
        cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        memcpy(CMSG_DATA(cm), &segment, sizeof segment);
    }
    ssize_t n;
    do {
        n = sendmsg(r->fd, &msg, MSG_DONTWAIT); /* never block the event loop, whatever the fd's mode */
    } while (n < 0 && errno == EINTR);
    return n < 0 ? (errno ? errno : EIO) : 0;
}

static int is_blocked(int err) { return err == EAGAIN || err == EWOULDBLOCK; }

/* A run of `count` datagrams of `segment` bytes (the last may be shorter) at [start, end) of the buffer: one
   segmented write, else one write a datagram; what cannot be written here goes to the fallback, told whether the
   socket's buffer was full (then it queues without trying the socket again: the retries were 2 or 3 system calls
   a run, each failing alike). -1: the fallback raised (the exception is set). */
static int write_run(Route *r, size_t start, size_t end, size_t segment, Py_ssize_t count) {
    if (!r->fallen) {
        if (count > 1 && r->gso && segment <= UINT16_MAX) {
            int err = send_once(r, r->base + start, end - start, (uint16_t)segment);
            if (err == 0) {
                r->datagrams += count;
                r->syscalls += 1;
                return 0;
            }
            r->fallen = 1; /* the Python path decides: queue, give up GSO, or drop */
            r->blocked = is_blocked(err);
        } else {
            for (; start < end; start += segment) {
                size_t len = end - start < segment ? end - start : segment;
                int err = send_once(r, r->base + start, len, 0);
                if (err != 0) {
                    r->fallen = 1;
                    r->blocked = is_blocked(err);
                    break;
                }
                r->datagrams += 1;
                r->syscalls += 1;
            }
            if (!r->fallen) {
                return 0;
            }
        }
    }
    if (r->session != NULL && !r->held) { /* the lane is still bound here: no Python has run since it was checked */
        Py_INCREF(r->session);
        Py_INCREF(r->fallback);
        r->held = 1;
    }
    PyObject *view = PyMemoryView_FromMemory((char *)r->base + start, (Py_ssize_t)(end - start), PyBUF_READ);
    if (view == NULL) {
        return -1;
    }
    PyObject *segment_obj = PyLong_FromSize_t(segment);
    if (segment_obj == NULL) {
        Py_DECREF(view);
        return -1;
    }
    PyObject *args[3] = {view, segment_obj, r->blocked ? Py_True : Py_False};
    PyObject *result = PyObject_Vectorcall(r->fallback, args, 3, NULL);
    /* The view must not outlive the call: the buffer is written again at once (the fallback copies what it
       keeps). A view still held elsewhere cannot be released, and is left as the Python path leaves its own
       (a slice of it kept would still read the buffer: the fallback, udpbatch's write_run, keeps copies only).
       The fallback's own exception, if it raised, is set aside meanwhile and raised from here as it was. */
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *released = PyObject_CallMethod(view, "release", NULL);
    if (released == NULL) {
        PyErr_Clear();
    }
    Py_XDECREF(released);
    PyErr_Restore(type, value, traceback);
    Py_DECREF(view);
    Py_DECREF(segment_obj);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

/* One payload's bytes, without a copy; -1 for an object that is not bytes (immutable: the fallback's Python
   cannot change it under us). */
static int payload_of(PyObject *item, const unsigned char **data, size_t *len) {
    if (PyBytes_CheckExact(item)) {
        *data = (const unsigned char *)PyBytes_AS_STRING(item);
        *len = (size_t)PyBytes_GET_SIZE(item);
        return 0;
    }
    return -1;
}

/* The largest payload of `payloads` (a list), and all their bytes in `total`; -1 where one is not bytes. */
static Py_ssize_t largest_payload(PyObject *payloads, unsigned long long *total) {
    size_t largest = 0;
    *total = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(payloads); i++) {
        const unsigned char *data;
        size_t len;
        if (payload_of(PyList_GET_ITEM(payloads, i), &data, &len) != 0) {
            return -1;
        }
        largest = len > largest ? len : largest;
        *total += len;
    }
    return (Py_ssize_t)largest;
}

/* A frame's packets: `header` with each payload, numbered from `sequence`, the marker on the last, protected one
   after another in the route's buffer (`room` bytes usable) and each run written as it ends. Every payload is
   bytes and fits `room` with the header (the caller checked). 0 and the bytes protected in `sent`; -1 with the
   exception set (what was written before is counted in the route all the same). */
typedef struct {
    srtp_protect_fn protect;
    void *ctx;
    size_t room;
    Py_ssize_t trailer_room, max_segments, max_bytes;
} Protect;

static int send_packets(Route *r, const Protect *p, const unsigned char *header, size_t header_len,
                        PyObject *payloads_obj, unsigned long sequence, size_t *sent_out) {
    Py_ssize_t n = PyList_GET_SIZE(payloads_obj);
    unsigned char pt = header[1] & 0x7F;
    size_t used = 0, start = 0, segment = 0, sent = 0;
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *data;
        size_t len;
        /* The list is the caller's, and only the fallback's writer runs Python meanwhile, which does not touch
           it; checked again all the same, and the payload held while it is read (a fallback may run first). */
        PyObject *item = i < PyList_GET_SIZE(payloads_obj) ? PyList_GET_ITEM(payloads_obj, i) : NULL;
        if (item == NULL || payload_of(item, &data, &len) != 0 || header_len + len > p->room) {
            PyErr_SetString(PyExc_RuntimeError, "send_frame: the payloads changed while sending");
            return -1;
        }
        Py_INCREF(item);
        if (used + header_len + len > p->room && used) { /* the buffer is full: what it holds leaves, then again */
            if (write_run(r, start, used, segment, count) != 0) {
                Py_DECREF(item);
                return -1;
            }
            used = start = 0;
            count = 0;
        }
        unsigned char *packet = r->base + used;
        memcpy(packet, header, header_len);
        memcpy(packet + header_len, data, len);
        Py_DECREF(item);
        uint16_t number = (uint16_t)((sequence + (unsigned long)i) & 0xFFFFu);
        packet[1] = (unsigned char)(i == n - 1 ? pt | 0x80 : pt);
        packet[2] = (unsigned char)(number >> 8);
        packet[3] = (unsigned char)(number & 0xFF);
        int length = (int)(header_len + len);
        int status = p->protect(p->ctx, packet, &length);
        if (status != 0) {
            PyObject *code = PyLong_FromLong(status);
            if (code != NULL) {
                PyErr_SetObject(SrtpError, code);
                Py_DECREF(code);
            }
            return -1;
        }
        if (length < (int)(header_len + len) || (size_t)length > header_len + len + (size_t)p->trailer_room) {
            PyErr_SetString(PyExc_RuntimeError, "send_frame: srtp_protect returned a length out of bounds");
            return -1;
        }
        size_t protected_len = (size_t)length;
        if (count && protected_len <= segment && used - start == (size_t)count * segment &&
            count < p->max_segments && used - start + protected_len <= (size_t)p->max_bytes) {
            count += 1;
        } else {
            if (count && write_run(r, start, used, segment, count) != 0) {
                return -1;
            }
            start = used;
            count = 1;
            segment = protected_len;
        }
        used += protected_len;
        sent += protected_len;
        r->packets += 1;
        r->protected_bytes += protected_len;
        r->octets += len;
    }
    if (count && write_run(r, start, used, segment, count) != 0) {
        return -1;
    }
    *sent_out = sent;
    return 0;
}

/* The exception being raised gets `camrelay_written` = (datagrams, syscalls) written before it, so the caller
   counts them (they were lost: the batcher's counts missed what C wrote before a failure mid-frame). */
static void note_written(Py_ssize_t datagrams, Py_ssize_t syscalls) {
    if (!datagrams && !syscalls) {
        return;
    }
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL) {
        PyObject *written = Py_BuildValue("(nn)", datagrams, syscalls);
        if (written == NULL || PyObject_SetAttrString(value, "camrelay_written", written) != 0) {
            PyErr_Clear();
        }
        Py_XDECREF(written);
    }
    PyErr_Restore(type, value, traceback);
}

/* The session, limits and fallback a call was given, checked; -1 with an exception where one is bad. */
static int check_limits(unsigned long long ctx, unsigned long long protect, Py_ssize_t trailer_room,
                        Py_ssize_t max_segments, Py_ssize_t max_bytes, PyObject *fallback) {
    if (PyErr_Occurred()) {
        return -1;
    }
    if (ctx == 0 || protect == 0 || max_segments < 1 || max_bytes < 1 || trailer_room < TRAILER_ROOM_MIN ||
        (fallback != NULL && !PyCallable_Check(fallback))) {
        PyErr_SetString(PyExc_ValueError, "send_frame: a bad session, limit or fallback");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(send_frame_doc,
             "send_frame(buffer, ctx, protect, trailer_room, fd, family, addr, header, payloads, sequence,\n"
             "           max_segments, max_bytes, gso, fallback) -> (protected, datagrams, syscalls) | None\n\n"
             "One frame: `header` with each of `payloads` (numbered from `sequence`, the marker on the last) in\n"
             "`buffer` (writable), protected with srtp_protect (its address `protect`, the session `ctx`), each\n"
             "run of equal-size datagrams (at most `max_segments`, `max_bytes`) written to `addr` on socket\n"
             "`fd` of `family` as soon as it ends: segmented (`gso`) or one datagram a write. What cannot be\n"
             "written goes, from there on, to `fallback(data, segment, blocked)` (`blocked`: the socket's buffer\n"
             "was full). Returns the bytes protected and the datagrams and system calls written here; None,\n"
             "before anything is done, for an address or a payload it does not take (the caller's Python path\n"
             "does). An exception raised after C wrote some carries them as `camrelay_written`.");

static PyObject *send_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "send_frame takes 14 arguments");
        return NULL;
    }
    PyObject *buffer_obj = args[0], *header_obj = args[7], *payloads_obj = args[8], *fallback = args[13];
    unsigned long long ctx_address = PyLong_AsUnsignedLongLong(args[1]);
    unsigned long long protect_address = PyLong_AsUnsignedLongLong(args[2]);
    Py_ssize_t trailer_room = PyLong_AsSsize_t(args[3]);
    long fd = PyLong_AsLong(args[4]);
    long family = PyLong_AsLong(args[5]);
    long sequence = PyLong_AsLong(args[9]);
    Py_ssize_t max_segments = PyLong_AsSsize_t(args[10]);
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[11]);
    int gso = PyObject_IsTrue(args[12]);
    if (check_limits(ctx_address, protect_address, trailer_room, max_segments, max_bytes, fallback) != 0) {
        return NULL;
    }
    if (fd < 0 || fd > INT32_MAX || gso < 0 || sequence < 0) {
        PyErr_SetString(PyExc_ValueError, "send_frame: a bad socket or sequence number");
        return NULL;
    }
    if (!PyList_CheckExact(payloads_obj)) {
        PyErr_SetString(PyExc_TypeError, "send_frame: payloads must be a list");
        return NULL;
    }
    struct sockaddr_storage to;
    socklen_t tolen = 0;
    if (parse_address((int)family, args[6], &to, &tolen) != 0) {
        Py_RETURN_NONE;
    }
    /* Both held exported for the call: a bytearray cannot be resized under us while the fallback runs */
    Py_buffer header_view, buffer;
    if (PyObject_GetBuffer(header_obj, &header_view, PyBUF_SIMPLE) != 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(buffer_obj, &buffer, PyBUF_WRITABLE) != 0) {
        PyBuffer_Release(&header_view);
        return NULL;
    }
    PyObject *result = NULL;
    const unsigned char *header = (const unsigned char *)header_view.buf;
    size_t header_len = (size_t)header_view.len;
    if (header_len < RTP_HEADER_MIN || header_len > RTP_PACKET_MAX) {
        PyErr_SetString(PyExc_ValueError, "send_frame: the header is not an RTP header");
        goto done;
    }
    Py_ssize_t n = PyList_GET_SIZE(payloads_obj);
    /* Every payload is checked before anything is written: one that does not fit fails the frame cleanly. */
    size_t room = (size_t)buffer.len > (size_t)trailer_room ? (size_t)buffer.len - (size_t)trailer_room : 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *data;
        size_t len;
        if (payload_of(PyList_GET_ITEM(payloads_obj, i), &data, &len) != 0) {
            Py_INCREF(Py_None);
            result = Py_None;
            goto done;
        }
        if (len > RTP_PACKET_MAX - header_len || header_len + len > room) {
            PyErr_Format(PyExc_ValueError, "send_frame: packet %zd of %zu bytes does not fit the %zd-byte buffer",
                         i, header_len + len, buffer.len);
            goto done;
        }
    }

    Route r = {.fd = (int)fd, .to = &to, .tolen = tolen, .gso = gso, .fallen = 0, .blocked = 0,
               .fallback = fallback, .base = (unsigned char *)buffer.buf, .datagrams = 0, .syscalls = 0};
    Protect p = {.protect = (srtp_protect_fn)(uintptr_t)protect_address, .ctx = (void *)(uintptr_t)ctx_address,
                 .room = room, .trailer_room = trailer_room, .max_segments = max_segments, .max_bytes = max_bytes};
    size_t sent = 0;
    if (send_packets(&r, &p, header, header_len, payloads_obj, (unsigned long)sequence, &sent) != 0) {
        note_written(r.datagrams, r.syscalls);
        goto done;
    }
    result = Py_BuildValue("(nnn)", (Py_ssize_t)sent, r.datagrams, r.syscalls);
done:
    PyBuffer_Release(&buffer);
    PyBuffer_Release(&header_view);
    return result;
}

/* -- lanes: one viewer's sender, sent to with its stream's other viewers in one call (send_batch) */

/* What a NACK may name, per lane: the frames sent lately, at least `history` packets of them (as aiortc's
   RTP_HISTORY_SIZE, 128), each frame one entry holding the shared payload list. One entry a frame of at least one
   packet: HISTORY_FRAMES_MAX entries hold any history of fewer packets (Lane refuses a longer one). */
#define HISTORY_FRAMES_MAX 256
/* A guard's dict unchanged since the guard last held (PEP 509's version tag, which CPython 3.11 bumps at every change
   of a dict, to a number no other dict has had) holds without a lookup: one cache line read a guard instead of the
   dict's keys and values, for the first GUARDS_SEEN guards of a lane (bind_lane gives ~10). Python 3.12 deprecates
   the tag: from there on, every guard is looked up. */
#if PY_VERSION_HEX < 0x030C0000
#define GUARD_VERSIONS 1
#endif
#define GUARDS_SEEN 16
#define HEADER_MAX 256 /* an RTP header with its extensions: 12 bytes and a few elements (mid, abs-send-time,
                          playout-delay: ~30); more is refused */
#define NTP_UNIX_OFFSET 2208988800ULL
#define ABS_SEND_TIME_BYTES 3
#define COUNTS 3 /* the batcher's counter array: datagrams, system calls, frames written from C */
#define PTS_LIMIT (1LL << 62) /* |pts| taken; its capture time is clamped to CAPTURE_NS_LIMIT */
/* A capture time (ns since 1970) taken as it is: pts near PTS_LIMIT at 90 kHz is ~2^75 ns, beyond a long long;
   2^62 ns is the year 2116, and ntp_at's arithmetic on it stays within a long long */
#define CAPTURE_NS_LIMIT (1LL << 62)

typedef struct {
    uint16_t first;     /* sequence number of its first packet */
    uint32_t timestamp; /* RTP timestamp, after the origin */
    PyObject *payloads; /* the frame's list (shared by every viewer), held */
} Sent;

typedef struct {
    PyObject_HEAD
    /* the route (bind): none while unbound */
    int bound;
    PyObject *session;   /* pylibsrtp's Session, held so its srtp_t lives as long as this lane uses it */
    Protect protect;     /* its srtp_protect and srtp_t; room, limits from send_batch */
    int fd, gso;
    struct sockaddr_storage to;
    socklen_t tolen;
    PyObject *transport, *fallback, *guards;
    uint64_t seen[GUARDS_SEEN]; /* lane_check_'s: each guard's dict's version when it last held by identity; 0 */
    uint64_t binds;             /* bind and unbind calls: a check that a rebinding ran through keeps no version */
    Py_buffer counts; /* the batcher's int64 counter array, held exported while bound */
    int has_counts;
    /* the header (set_header) */
    unsigned char header[HEADER_MAX];
    size_t header_len;
    Py_ssize_t abs_send_time_at; /* -1: none (audio) */
    uint32_t origin;
    long long clock_rate;
    /* what the viewer's timeline and sequence are */
    uint16_t sequence;
    int has_last;
    long long last, offset;
    unsigned long long frames; /* sent by send_batch, all time */
    unsigned long long batch;  /* the serial of the last send_batch call that took it (0: none) */
    /* counts since take_counts, for sender reports and stats */
    unsigned long long octets, packets, protected_bytes;
    uint64_t ntp;
    uint32_t rtp_timestamp;
    int counted;
    /* the history for NACKs */
    Py_ssize_t history; /* packets kept at least; 0: none (a codec without NACK) */
    Sent ring[HISTORY_FRAMES_MAX];
    Py_ssize_t ring_start, ring_len, held;
} Lane;

static PyTypeObject LaneType;
static PyObject *str_is_closing, *str_get_write_buffer_size;

static void lane_unbind_(Lane *self) {
    self->bound = 0;
    self->binds++;
    Py_CLEAR(self->session);
    Py_CLEAR(self->transport);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->guards);
    if (self->has_counts) {
        PyBuffer_Release(&self->counts);
        self->has_counts = 0;
    }
}

static void lane_forget(Lane *self) {
    for (Py_ssize_t k = 0; k < self->ring_len; k++) {
        Py_CLEAR(self->ring[(self->ring_start + k) % HISTORY_FRAMES_MAX].payloads);
    }
    self->ring_start = self->ring_len = self->held = 0;
}

static int lane_traverse(Lane *self, visitproc visit, void *arg) {
    Py_VISIT(self->session);
    Py_VISIT(self->transport);
    Py_VISIT(self->fallback);
    Py_VISIT(self->guards);
    if (self->has_counts) {
        Py_VISIT(self->counts.obj);
    }
    for (Py_ssize_t k = 0; k < self->ring_len; k++) {
        Py_VISIT(self->ring[(self->ring_start + k) % HISTORY_FRAMES_MAX].payloads);
    }
    return 0;
}

static int lane_clear(Lane *self) {
    lane_unbind_(self);
    lane_forget(self);
    return 0;
}

static void lane_dealloc(Lane *self) {
    PyObject_GC_UnTrack(self);
    lane_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int lane_init(Lane *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"origin", "sequence", "clock_rate", "history", NULL};
    unsigned long long origin;
    long sequence;
    long long clock_rate;
    Py_ssize_t history;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KlLn", names, &origin, &sequence, &clock_rate, &history)) {
        return -1;
    }
    if (origin > 0xFFFFFFFFull || sequence < 0 || sequence > 0xFFFF || clock_rate <= 0 || history < 0 ||
        history >= HISTORY_FRAMES_MAX) {
        PyErr_SetString(PyExc_ValueError, "Lane: origin, sequence, clock rate or history out of range");
        return -1;
    }
    lane_clear(self);
    self->origin = (uint32_t)origin;
    self->sequence = (uint16_t)sequence;
    self->clock_rate = clock_rate;
    self->history = history;
    self->header_len = 0;
    self->abs_send_time_at = -1;
    return 0;
}

PyDoc_STRVAR(set_header_doc, "set_header(template, abs_send_time_at) -> None: the header every frame's is made from,\n"
                             "its abs-send-time's 3 bytes at `abs_send_time_at` (None: it has none).");

static PyObject *lane_set_header(Lane *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_header takes 2 arguments");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) != 0) {
        return NULL;
    }
    Py_ssize_t at = -1;
    if (args[1] != Py_None) {
        at = PyLong_AsSsize_t(args[1]);
        if (at == -1 && PyErr_Occurred()) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    if (view.len < RTP_HEADER_MIN || view.len > HEADER_MAX || (((unsigned char *)view.buf)[0] >> 6) != 2 ||
        (args[1] != Py_None && (at < RTP_HEADER_MIN || at > view.len - ABS_SEND_TIME_BYTES))) {
        /* `at > len - 3`, not `at + 3 > len`: an `at` near PY_SSIZE_T_MAX would overflow the sum and pass */
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "set_header: not an RTP header, or its abs-send-time out of it");
        return NULL;
    }
    memcpy(self->header, view.buf, (size_t)view.len);
    self->header_len = (size_t)view.len;
    self->abs_send_time_at = at;
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(bind_doc,
             "bind(session, ctx, protect, fd, family, addr, gso, transport, fallback, guards, counts) -> bool\n\n"
             "Where this lane's frames go: protected with srtp_protect (its address `protect`) on `ctx` (the srtp_t\n"
             "of pylibsrtp's `session`, held), written to `addr` (parsed here, once) on socket `fd` of `family`,\n"
             "segmented (`gso`) or not; `fallback(data, segment, blocked)` takes what C cannot write. Taken by\n"
             "send_batch only while `transport.is_closing()` is false, `transport.get_write_buffer_size()` 0 (not\n"
             "asked where `transport` is None: the guards hold its state) and every (mapping, key, value) of `guards`\n"
             "holds; C's writes are added to `counts` (int64: datagrams,\n"
             "system calls, frames). False, and unbound, for an address it does not take.");

static PyObject *lane_bind(Lane *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "bind takes 11 arguments");
        return NULL;
    }
    unsigned long long ctx = PyLong_AsUnsignedLongLong(args[1]);
    unsigned long long protect = PyLong_AsUnsignedLongLong(args[2]);
    long fd = PyLong_AsLong(args[3]);
    long family = PyLong_AsLong(args[4]);
    int gso = PyObject_IsTrue(args[6]);
    if (check_limits(ctx, protect, TRAILER_ROOM_MIN, 1, 1, args[8]) != 0) {
        return NULL;
    }
    if (fd < 0 || fd > INT32_MAX || gso < 0 || !PyTuple_CheckExact(args[9])) {
        PyErr_SetString(PyExc_ValueError, "bind: a bad socket, or guards not a tuple");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[9]); i++) {
        PyObject *g = PyTuple_GET_ITEM(args[9], i);
        if (!PyTuple_CheckExact(g) || PyTuple_GET_SIZE(g) != 3 || !PyDict_Check(PyTuple_GET_ITEM(g, 0))) {
            PyErr_SetString(PyExc_ValueError, "bind: each guard is (dict, key, value)");
            return NULL;
        }
    }
    lane_unbind_(self);
    if (PyObject_GetBuffer(args[10], &self->counts, PyBUF_WRITABLE | PyBUF_FORMAT) != 0) {
        return NULL;
    }
    self->has_counts = 1;
    if (self->counts.len != COUNTS * (Py_ssize_t)sizeof(long long) || self->counts.itemsize != sizeof(long long) ||
        self->counts.format == NULL || strcmp(self->counts.format, "q") != 0) {
        lane_unbind_(self);
        PyErr_SetString(PyExc_ValueError, "bind: counts must be array('q') of 3");
        return NULL;
    }
    if (parse_address((int)family, args[5], &self->to, &self->tolen) != 0) {
        lane_unbind_(self);
        Py_RETURN_FALSE;
    }
    self->protect.protect = (srtp_protect_fn)(uintptr_t)protect;
    self->protect.ctx = (void *)(uintptr_t)ctx;
    self->fd = (int)fd;
    self->gso = gso;
    self->session = Py_NewRef(args[0]);
    self->transport = Py_NewRef(args[7]);
    self->fallback = Py_NewRef(args[8]);
    self->guards = Py_NewRef(args[9]);
    memset(self->seen, 0, sizeof self->seen);
    self->binds++;
    self->bound = 1;
    Py_RETURN_TRUE;
}

static PyObject *lane_unbind(Lane *self, PyObject *unused) {
    (void)unused;
    lane_unbind_(self);
    Py_RETURN_NONE;
}

/* lane_ready_'s checks, on `guards` and `transport` held by the caller (each value compared also held). */
static int lane_check_(PyObject *guards, PyObject *transport, uint64_t *seen) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(guards); i++) {
        PyObject *g = PyTuple_GET_ITEM(guards, i);
        PyObject *mapping = PyTuple_GET_ITEM(g, 0);
#ifdef GUARD_VERSIONS
        /* unchanged since this guard last held by identity: holds (the same dict in the same state, the values
           compared alive in it and in the guard) */
        uint64_t version = ((PyDictObject *)mapping)->ma_version_tag;
        if (i < GUARDS_SEEN && version != 0 && seen[i] == version) {
            continue;
        }
#else
        (void)seen;
#endif
        PyObject *value = PyDict_GetItemWithError(mapping, PyTuple_GET_ITEM(g, 1));
        if (value == NULL) {
            return PyErr_Occurred() ? -1 : 0;
        }
        PyObject *expected = PyTuple_GET_ITEM(g, 2);
#ifdef GUARD_VERSIONS
        if (value == expected && i < GUARDS_SEEN) {
            seen[i] = version;
        }
#endif
        if (value != expected) { /* held only through its __eq__ (Python): asked again every time */
            Py_INCREF(value); /* borrowed from a dict that the comparison's Python may change */
            int same = PyObject_RichCompareBool(value, expected, Py_EQ);
            Py_DECREF(value);
            if (same <= 0) {
                return same;
            }
        }
    }
    if (transport == Py_None) { /* the guards read the transport's state themselves (borrowed.route_lane) */
        return 1;
    }
    PyObject *closing = PyObject_CallMethodNoArgs(transport, str_is_closing);
    if (closing == NULL) {
        return -1;
    }
    int is_closing = PyObject_IsTrue(closing);
    Py_DECREF(closing);
    if (is_closing != 0) {
        return is_closing < 0 ? -1 : 0;
    }
    PyObject *size = PyObject_CallMethodNoArgs(transport, str_get_write_buffer_size);
    if (size == NULL) {
        return -1;
    }
    int queued = PyObject_IsTrue(size);
    Py_DECREF(size);
    return queued < 0 ? -1 : !queued;
}

/* 1: bound, every guard holds and the transport open with nothing queued; 0: not; -1: an error (set). */
static int lane_ready_(Lane *self) {
    if (!self->bound || self->header_len == 0 || self->clock_rate <= 0) { /* a Lane never __init__ed: no clock */
        return 0;
    }
    /* Held for the call: a guard's __eq__, is_closing() or get_write_buffer_size() is Python, which may unbind
       this lane (and drop the lane's references to them) */
    PyObject *guards = Py_NewRef(self->guards), *transport = Py_NewRef(self->transport);
    /* The versions the check notes are kept only if no bind or unbind ran meanwhile (a guard's __eq__ may rebind
       the lane: the old guards' versions must not be taken for the new guards') */
    uint64_t seen[GUARDS_SEEN], binds = self->binds;
    memcpy(seen, self->seen, sizeof seen);
    int ready = lane_check_(guards, transport, seen);
    if (self->binds == binds) {
        memcpy(self->seen, seen, sizeof seen);
    }
    Py_DECREF(guards);
    Py_DECREF(transport);
    return ready > 0 && !self->bound ? 0 : ready; /* unbound meanwhile: not ready */
}

static PyObject *lane_ready(Lane *self, PyObject *unused) {
    (void)unused;
    int ready = lane_ready_(self);
    if (ready < 0) {
        return NULL;
    }
    return PyBool_FromLong(ready);
}

PyDoc_STRVAR(take_counts_doc, "take_counts() -> (ntp, rtp_timestamp, octets, packets, protected) | None: what\n"
                              "send_batch sent since the last take, for aiortc's sender reports and stats.");

static PyObject *lane_take_counts(Lane *self, PyObject *unused) {
    (void)unused;
    if (!self->counted) {
        Py_RETURN_NONE;
    }
    PyObject *out = Py_BuildValue("(KkKKK)", (unsigned long long)self->ntp, (unsigned long)self->rtp_timestamp,
                                  self->octets, self->packets, self->protected_bytes);
    if (out != NULL) {
        self->counted = 0;
        self->octets = self->packets = self->protected_bytes = 0;
    }
    return out;
}

/* A frame sent into the history (a reference to its payload list kept), the oldest let go while the rest
   still hold `history` packets. */
static void lane_remember_(Lane *self, uint16_t first, uint32_t timestamp, PyObject *payloads) {
    if (!self->history) {
        return;
    }
    Py_ssize_t n = PyList_GET_SIZE(payloads);
    if (self->ring_len == HISTORY_FRAMES_MAX) { /* full: the oldest goes (the rest hold more than `history`) */
        Sent *old = &self->ring[self->ring_start];
        self->held -= PyList_GET_SIZE(old->payloads);
        Py_CLEAR(old->payloads);
        self->ring_start = (self->ring_start + 1) % HISTORY_FRAMES_MAX;
        self->ring_len -= 1;
    }
    Sent *entry = &self->ring[(self->ring_start + self->ring_len) % HISTORY_FRAMES_MAX];
    entry->first = first;
    entry->timestamp = timestamp;
    entry->payloads = Py_NewRef(payloads);
    self->ring_len += 1;
    self->held += n;
    while (self->ring_len > 1) {
        Sent *old = &self->ring[self->ring_start];
        Py_ssize_t oldest = PyList_GET_SIZE(old->payloads);
        if (self->held - oldest < self->history) {
            break;
        }
        self->held -= oldest;
        Py_CLEAR(old->payloads);
        self->ring_start = (self->ring_start + 1) % HISTORY_FRAMES_MAX;
        self->ring_len -= 1;
    }
}

PyDoc_STRVAR(remember_doc, "remember(sequence, timestamp, payloads) -> None: a frame sent another way (the per-viewer\n"
                           "path), kept for NACKs as send_batch keeps its own.");

static PyObject *lane_remember(Lane *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "remember(sequence, timestamp, payloads: list)");
        return NULL;
    }
    unsigned long sequence = PyLong_AsUnsignedLong(args[0]);
    unsigned long timestamp = PyLong_AsUnsignedLong(args[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (sequence > 0xFFFF || timestamp > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_ValueError, "remember: sequence or timestamp out of range");
        return NULL;
    }
    lane_remember_(self, (uint16_t)sequence, (uint32_t)timestamp, args[2]);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(find_doc, "find(sequence) -> (timestamp, marker, payload, payload_type) | None: the packet numbered\n"
                       "`sequence` (a NACK's, from the network: any int), if still held.");

static PyObject *lane_find(Lane *self, PyObject *arg) {
    int overflow = 0;
    long sequence = PyLong_AsLongAndOverflow(arg, &overflow);
    if (sequence == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow || sequence < 0 || sequence > 0xFFFF) {
        Py_RETURN_NONE;
    }
    for (Py_ssize_t k = self->ring_len - 1; k >= 0; k--) { /* newest first, as SentFrames.find */
        Sent *entry = &self->ring[(self->ring_start + k) % HISTORY_FRAMES_MAX];
        Py_ssize_t n = PyList_GET_SIZE(entry->payloads);
        Py_ssize_t index = (Py_ssize_t)(((unsigned long)sequence - entry->first) & 0xFFFFu);
        if (index < n) {
            return Py_BuildValue("(kOOi)", (unsigned long)entry->timestamp, index == n - 1 ? Py_True : Py_False,
                                 PyList_GET_ITEM(entry->payloads, index),
                                 self->header_len ? (int)(self->header[1] & 0x7F) : -1);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *lane_get_timeline(Lane *self, void *closure) {
    (void)closure;
    if (!self->has_last) {
        return Py_BuildValue("(OL)", Py_None, self->offset);
    }
    return Py_BuildValue("(LL)", self->last, self->offset);
}

static int lane_set_timeline(Lane *self, PyObject *value, void *closure) {
    (void)closure;
    PyObject *last;
    long long offset;
    if (value == NULL || !PyArg_ParseTuple(value, "OL", &last, &offset)) {
        if (value == NULL) {
            PyErr_SetString(PyExc_TypeError, "timeline cannot be deleted");
        }
        return -1;
    }
    if (last == Py_None) {
        self->has_last = 0;
    } else {
        long long v = PyLong_AsLongLong(last);
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        self->has_last = 1;
        self->last = v;
    }
    self->offset = offset;
    return 0;
}

static PyObject *lane_get_sequence(Lane *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->sequence);
}

static int lane_set_sequence(Lane *self, PyObject *value, void *closure) {
    (void)closure;
    long v = value ? PyLong_AsLong(value) : -1;
    if (v == -1 && (value == NULL || PyErr_Occurred())) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "sequence cannot be deleted");
        }
        return -1;
    }
    self->sequence = (uint16_t)((unsigned long)v & 0xFFFFu);
    return 0;
}

static PyObject *lane_get_frames(Lane *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->frames);
}

static PyObject *lane_get_batch(Lane *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->batch);
}

static PyObject *lane_get_bound(Lane *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->bound);
}

static PyGetSetDef lane_getset[] = {
    {"timeline", (getter)lane_get_timeline, (setter)lane_set_timeline,
     "(last timestamp or None, offset): the viewer's RtpTimeline, before the origin", NULL},
    {"sequence", (getter)lane_get_sequence, (setter)lane_set_sequence, "the next packet's sequence number", NULL},
    {"frames", (getter)lane_get_frames, NULL, "frames send_batch sent, all time", NULL},
    {"bound", (getter)lane_get_bound, NULL, "whether it has a route (bind)", NULL},
    {"batch", (getter)lane_get_batch, NULL, "the serial of the last send_batch call that took a frame for it", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef lane_methods[] = {
    {"set_header", (PyCFunction)(void (*)(void))lane_set_header, METH_FASTCALL, set_header_doc},
    {"bind", (PyCFunction)(void (*)(void))lane_bind, METH_FASTCALL, bind_doc},
    {"unbind", (PyCFunction)lane_unbind, METH_NOARGS, "unbind() -> None: no route; send_batch declines it"},
    {"ready", (PyCFunction)lane_ready, METH_NOARGS, "ready() -> bool: send_batch would take it now"},
    {"take_counts", (PyCFunction)lane_take_counts, METH_NOARGS, take_counts_doc},
    {"remember", (PyCFunction)(void (*)(void))lane_remember, METH_FASTCALL, remember_doc},
    {"find", (PyCFunction)lane_find, METH_O, find_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "relay.webrtc._fastsend.Lane",
    .tp_doc = PyDoc_STR("Lane(origin, sequence, clock_rate, history): one viewer's sender as send_batch sends to it"),
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lane_init,
    .tp_dealloc = (destructor)lane_dealloc,
    .tp_traverse = (traverseproc)lane_traverse,
    .tp_clear = (inquiry)lane_clear,
    .tp_methods = lane_methods,
    .tp_getset = lane_getset,
};

/* 64-bit NTP time of `unix_ns`, to the microsecond, as rtpsend.ntp_at (aiortc's). */
static uint64_t ntp_at(long long unix_ns) {
    long long floor_us = unix_ns / 1000 - (unix_ns % 1000 < 0); /* floor, as Python's // */
    long long micros = floor_us + (long long)NTP_UNIX_OFFSET * 1000000LL;
    long long seconds = micros / 1000000LL, rest = micros % 1000000LL;
    if (rest < 0) {
        rest += 1000000LL;
        seconds -= 1;
    }
    return ((uint64_t)seconds << 32) | (((uint64_t)rest << 32) / 1000000ULL);
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* floor(a * b / c) for the capture time of a pts, exact in 128 bits (|a| <= PTS_LIMIT, |b| < 2^31: no overflow
   there), clamped to +-CAPTURE_NS_LIMIT so that the long long it returns, and ntp_at on it, cannot overflow */
static long long scale(long long a, long long b, long long c) {
    __int128 v = (__int128)a * b;
    __int128 q = v / c;
    if ((v % c != 0) && ((v < 0) != (c < 0))) {
        q -= 1;
    }
    if (q > CAPTURE_NS_LIMIT) {
        return CAPTURE_NS_LIMIT;
    }
    return q < -CAPTURE_NS_LIMIT ? -CAPTURE_NS_LIMIT : (long long)q;
}

PyDoc_STRVAR(send_batch_doc,
             "send_batch(lanes, payloads, pts, published_at, buffer, trailer_room, max_segments, max_bytes,\n"
             "           abs_send_time, serial, delays) -> (declined, failed, sent)\n\n"
             "One frame to every lane of `lanes` that takes it now: `payloads` (a list of bytes, shared) with each\n"
             "lane's header, its timestamp (origin + `pts` + its offset), its sequence numbers, protected with its\n"
             "session in `buffer` and written to its peer, as send_frame does for one. A lane is declined (its\n"
             "index in `declined`, nothing sent, nothing changed) while unbound, not ready (bind's guards), or\n"
             "where its timestamp would not advance; one that fails mid-frame is unbound and named in `failed`\n"
             "as (index, exception, taken), the others go on: `taken`, some of its packets were protected (their\n"
             "sequence numbers spent), and the frame is the lane's as if sent (numbered on, remembered for NACKs); a lane\n"
             "taken, sent or in part, keeps `serial` (its `batch`: whom a call that raised had reached). `delays`: a\n"
             "writable buffer of doubles, one a lane at least, given for each lane sent, in turn, the seconds from\n"
             "`published_at` (the wall clock) to its frame's last write (no float object a lane); `sent`: how many.\n"
             "`abs_send_time`: 24 bits, or -1: the clock, per lane.");

static PyObject *send_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "send_batch takes 11 arguments");
        return NULL;
    }
    PyObject *lanes = args[0], *payloads = args[1];
    long long pts = PyLong_AsLongLong(args[2]);
    double published_at = PyFloat_AsDouble(args[3]);
    Py_ssize_t trailer_room = PyLong_AsSsize_t(args[5]);
    Py_ssize_t max_segments = PyLong_AsSsize_t(args[6]);
    Py_ssize_t max_bytes = PyLong_AsSsize_t(args[7]);
    long long abs_send_time = PyLong_AsLongLong(args[8]);
    unsigned long long serial = PyLong_AsUnsignedLongLong(args[9]);
    if (check_limits(1, 1, trailer_room, max_segments, max_bytes, NULL) != 0) {
        return NULL;
    }
    if (!PyList_CheckExact(lanes) || !PyList_CheckExact(payloads) || PyList_GET_SIZE(payloads) == 0) {
        PyErr_SetString(PyExc_TypeError, "send_batch: lanes and payloads must be lists, payloads not empty");
        return NULL;
    }
    if (abs_send_time < -1 || abs_send_time > 0xFFFFFF || pts < -PTS_LIMIT || pts > PTS_LIMIT) {
        PyErr_SetString(PyExc_ValueError, "send_batch: pts or abs_send_time out of range");
        return NULL;
    }
    unsigned long long octets = 0;
    Py_ssize_t largest = largest_payload(payloads, &octets);
    if (largest < 0) {
        PyErr_SetString(PyExc_TypeError, "send_batch: every payload must be bytes");
        return NULL;
    }
    Py_buffer buffer, delays;
    if (PyObject_GetBuffer(args[10], &delays, PyBUF_WRITABLE | PyBUF_FORMAT) != 0) {
        return NULL;
    }
    if (delays.itemsize != sizeof(double) || delays.format == NULL || strcmp(delays.format, "d") != 0 ||
        delays.len / (Py_ssize_t)sizeof(double) < PyList_GET_SIZE(lanes)) {
        PyBuffer_Release(&delays);
        PyErr_SetString(PyExc_ValueError, "send_batch: delays must be array('d') of one a lane at least");
        return NULL;
    }
    /* The lanes may not outgrow it while a fallback's Python runs: each write is checked against its size. */
    double *delay_at = (double *)delays.buf;
    long long ntp_rate = 0; /* no lane's: a Lane's clock rate is positive */
    uint64_t ntp = 0;
    Py_ssize_t delay_room = delays.len / (Py_ssize_t)sizeof(double), sent_count = 0;
    if (PyObject_GetBuffer(args[4], &buffer, PyBUF_WRITABLE) != 0) {
        PyBuffer_Release(&delays);
        return NULL;
    }
    size_t room = (size_t)buffer.len > (size_t)trailer_room ? (size_t)buffer.len - (size_t)trailer_room : 0;
    Py_ssize_t n = PyList_GET_SIZE(payloads);
    PyObject *declined = PyList_New(0), *failed = PyList_New(0), *result = NULL;
    if (declined == NULL || failed == NULL) {
        goto done;
    }
    /* The lists' sizes are read anew each time round: a fallback runs Python (the batcher's writer, which touches
       neither), and nothing read from them may be out of bounds whatever it does. */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lanes); i++) {
        PyObject *item = PyList_GET_ITEM(lanes, i);
        if (Py_TYPE(item) != &LaneType) {
            PyErr_SetString(PyExc_TypeError, "send_batch: lanes must be Lane objects");
            goto done;
        }
        Lane *lane = (Lane *)Py_NewRef(item); /* held: a fallback's Python may drop the caller's list */
        long long stamp;
        int ready = 0;
        if (!__builtin_add_overflow(pts, lane->offset, &stamp) && !(lane->has_last && stamp <= lane->last)) {
            ready = lane_ready_(lane);
        }
        if (ready < 0) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) { /* KeyboardInterrupt, SystemExit: raised as they are */
                Py_DECREF(lane);
                goto done;
            }
            PyErr_Clear(); /* a guard that cannot be read: declined, the per-viewer path finds out why */
            ready = 0;
        }
        /* read again here, whatever a guard's Python did (unbind, set_header): still bound, the abs-send-time
           within the header */
        Py_ssize_t at = lane->abs_send_time_at;
        size_t header_len = lane->header_len;
        if (!ready || !lane->bound || header_len < RTP_HEADER_MIN || header_len > HEADER_MAX ||
            (at >= 0 && (at < RTP_HEADER_MIN || (size_t)at + ABS_SEND_TIME_BYTES > header_len)) ||
            header_len + (size_t)largest > room || (size_t)largest > RTP_PACKET_MAX - header_len) {
            PyObject *index = PyLong_FromSsize_t(i);
            int bad = index == NULL || PyList_Append(declined, index) != 0;
            Py_XDECREF(index);
            Py_DECREF(lane);
            if (bad) {
                goto done;
            }
            continue;
        }
        unsigned char header[HEADER_MAX];
        memcpy(header, lane->header, header_len);
        uint32_t timestamp = (uint32_t)((uint64_t)lane->origin + (uint64_t)stamp);
        header[4] = (unsigned char)(timestamp >> 24);
        header[5] = (unsigned char)(timestamp >> 16);
        header[6] = (unsigned char)(timestamp >> 8);
        header[7] = (unsigned char)timestamp;
        if (at >= 0) {
            uint32_t ast = abs_send_time >= 0 ? (uint32_t)abs_send_time
                                              : (uint32_t)((ntp_at(now_ns()) >> 14) & 0xFFFFFFu);
            header[at] = (unsigned char)(ast >> 16);
            header[at + 1] = (unsigned char)(ast >> 8);
            header[at + 2] = (unsigned char)ast;
        }
        Route r = {.fd = lane->fd, .to = &lane->to, .tolen = lane->tolen, .gso = lane->gso, .fallen = 0,
                   .blocked = 0, .fallback = lane->fallback, .session = lane->session, .held = 0,
                   .base = (unsigned char *)buffer.buf, .datagrams = 0, .syscalls = 0, .packets = 0,
                   .protected_bytes = 0, .octets = 0};
        Protect p = lane->protect;
        p.room = room;
        p.trailer_room = trailer_room;
        p.max_segments = max_segments;
        p.max_bytes = max_bytes;
        size_t sent = 0;
        uint16_t first = lane->sequence; /* before the fallback's Python runs, which may set it */
        /* a fallback may unbind the lane: its session (whose srtp_t is being used) and the fallback are held from
           its first call on (write_run), and let go here */
        int status = send_packets(&r, &p, header, header_len, payloads, first, &sent);
        if (r.held) {
            Py_DECREF(r.fallback);
            Py_DECREF(r.session);
        }
        long long *counters = lane->has_counts ? (long long *)lane->counts.buf : NULL;
        if (counters != NULL) { /* counted whatever happened next: they were written */
            counters[0] += r.datagrams;
            counters[1] += r.syscalls;
            counters[2] += status == 0;
        }
        /* Taken (sent, or partly): its packets' sequence numbers are spent in the SRTP session (protecting them
           again would be a replay), so the frame is this lane's as if sent whole: numbered on, remembered (a NACK
           of a packet that did not leave is answered from the history), counted as protected. */
        int taken = status == 0 || r.packets > 0;
        if (taken) {
            lane->sequence = (uint16_t)((first + (unsigned long)n) & 0xFFFFu);
            lane->has_last = 1;
            lane->last = stamp;
            lane->frames += 1;
            lane->batch = serial;
            if (lane->clock_rate != ntp_rate) { /* the frame's capture time: once a call, its lanes' clocks alike */
                ntp_rate = lane->clock_rate;
                ntp = ntp_at(scale(pts, 1000000000LL, ntp_rate));
            }
            lane->ntp = ntp;
            lane->rtp_timestamp = timestamp;
            lane->octets += status == 0 ? octets : r.octets;
            lane->packets += (unsigned long long)r.packets;
            lane->protected_bytes += r.protected_bytes;
            lane->counted = 1;
            lane_remember_(lane, first, timestamp, payloads);
        }
        if (status != 0) {
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            PyErr_NormalizeException(&type, &value, &traceback);
            lane_unbind_(lane);
            PyObject *entry = Py_BuildValue("(nOO)", i, value ? value : Py_None, taken ? Py_True : Py_False);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(traceback);
            int bad = entry == NULL || PyList_Append(failed, entry) != 0;
            Py_XDECREF(entry);
            Py_DECREF(lane);
            if (bad) {
                goto done;
            }
            continue;
        }
        Py_DECREF(lane);
        if (sent_count < delay_room) {
            delay_at[sent_count++] = (double)now_ns() / 1e9 - published_at;
        }
    }
    result = Py_BuildValue("(OOn)", declined, failed, sent_count);
done:
    Py_XDECREF(declined);
    Py_XDECREF(failed);
    PyBuffer_Release(&buffer);
    PyBuffer_Release(&delays);
    return result;
}

static PyMethodDef methods[] = {
    {"send_frame", (PyCFunction)(void (*)(void))send_frame, METH_FASTCALL, send_frame_doc},
    {"send_batch", (PyCFunction)(void (*)(void))send_batch, METH_FASTCALL, send_batch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay.webrtc._fastsend",
    .m_doc = "A viewer's frame, or a stream's frame for every viewer, made, SRTP-protected and sent in one call "
             "(relay/webrtc/rtpsend.py's C path).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastsend(void) {
    if (PyType_Ready(&LaneType) < 0) {
        return NULL;
    }
    if (str_is_closing == NULL) {
        str_is_closing = PyUnicode_InternFromString("is_closing");
        str_get_write_buffer_size = PyUnicode_InternFromString("get_write_buffer_size");
        if (str_is_closing == NULL || str_get_write_buffer_size == NULL) {
            return NULL;
        }
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (SrtpError == NULL) {
        SrtpError = PyErr_NewException("relay.webrtc._fastsend.SrtpError", NULL, NULL);
    }
    if (SrtpError == NULL || PyModule_AddObjectRef(module, "SrtpError", SrtpError) != 0 ||
        PyModule_AddObjectRef(module, "Lane", (PyObject *)&LaneType) != 0 ||
        PyModule_AddIntConstant(module, "TRAILER_ROOM_MIN", TRAILER_ROOM_MIN) != 0 ||
        PyModule_AddIntConstant(module, "HISTORY_FRAMES_MAX", HISTORY_FRAMES_MAX) != 0 ||
        PyModule_AddIntConstant(module, "API_VERSION", API_VERSION) != 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
