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
#define API_VERSION 1
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
    PyObject *fallback;  /* fallback(data, segment): the Python path's writer */
    unsigned char *base; /* the buffer */
    Py_ssize_t datagrams, syscalls; /* written here (the fallback counts its own) */
} Route;

/* One sendmsg of `len` bytes at `data`: a segmented write of `segment`-byte datagrams, or one datagram
   (segment 0). 0: sent; -1: not (errno says why). */
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
    return n < 0 ? -1 : 0;
}

/* A run of `count` datagrams of `segment` bytes (the last may be shorter) at [start, end) of the buffer: one
   segmented write, else one write a datagram; what cannot be written here goes to the fallback. -1: the
   fallback raised (the exception is set). */
static int write_run(Route *r, size_t start, size_t end, size_t segment, Py_ssize_t count) {
    if (!r->fallen) {
        if (count > 1 && r->gso && segment <= UINT16_MAX) {
            if (send_once(r, r->base + start, end - start, (uint16_t)segment) == 0) {
                r->datagrams += count;
                r->syscalls += 1;
                return 0;
            }
            r->fallen = 1; /* the Python path tries it again and decides: queue, give up GSO, or drop */
        } else {
            for (; start < end; start += segment) {
                size_t len = end - start < segment ? end - start : segment;
                if (send_once(r, r->base + start, len, 0) != 0) {
                    r->fallen = 1;
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
    PyObject *view = PyMemoryView_FromMemory((char *)r->base + start, (Py_ssize_t)(end - start), PyBUF_READ);
    if (view == NULL) {
        return -1;
    }
    PyObject *segment_obj = PyLong_FromSize_t(segment);
    if (segment_obj == NULL) {
        Py_DECREF(view);
        return -1;
    }
    PyObject *args[2] = {view, segment_obj};
    PyObject *result = PyObject_Vectorcall(r->fallback, args, 2, NULL);
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

PyDoc_STRVAR(send_frame_doc,
             "send_frame(buffer, ctx, protect, trailer_room, fd, family, addr, header, payloads, sequence,\n"
             "           max_segments, max_bytes, gso, fallback) -> (protected, datagrams, syscalls) | None\n\n"
             "One frame: `header` with each of `payloads` (numbered from `sequence`, the marker on the last) in\n"
             "`buffer` (writable), protected with srtp_protect (its address `protect`, the session `ctx`), each\n"
             "run of equal-size datagrams (at most `max_segments`, `max_bytes`) written to `addr` on socket\n"
             "`fd` of `family` as soon as it ends: segmented (`gso`) or one datagram a write. What cannot be\n"
             "written goes, from there on, to `fallback(data, segment)`. Returns the bytes protected and the\n"
             "datagrams and system calls written here; None, before anything is done, for an address or a\n"
             "payload it does not take (the caller's Python path does).");

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
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (ctx_address == 0 || protect_address == 0 || fd < 0 || fd > INT32_MAX || gso < 0 || max_segments < 1 ||
        max_bytes < 1 || trailer_room < TRAILER_ROOM_MIN || !PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_ValueError, "send_frame: a bad session, socket, limit or fallback");
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

    Route r = {.fd = (int)fd, .to = &to, .tolen = tolen, .gso = gso, .fallen = 0, .fallback = fallback,
               .base = (unsigned char *)buffer.buf, .datagrams = 0, .syscalls = 0};
    srtp_protect_fn protect = (srtp_protect_fn)(uintptr_t)protect_address;
    void *ctx = (void *)(uintptr_t)ctx_address;
    unsigned char pt = header[1] & 0x7F;
    size_t used = 0, start = 0, segment = 0, sent = 0;
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *data;
        size_t len;
        /* The list is the caller's, and only the fallback's writer runs Python meanwhile, which does not touch
           it; checked again all the same, and the payload held while it is read (a fallback may run first). */
        PyObject *item = i < PyList_GET_SIZE(payloads_obj) ? PyList_GET_ITEM(payloads_obj, i) : NULL;
        if (item == NULL || payload_of(item, &data, &len) != 0 || header_len + len > room) {
            PyErr_SetString(PyExc_RuntimeError, "send_frame: the payloads changed while sending");
            goto done;
        }
        Py_INCREF(item);
        if (used + header_len + len > room && used) { /* the buffer is full: what it holds leaves, then again */
            if (write_run(&r, start, used, segment, count) != 0) {
                Py_DECREF(item);
                goto done;
            }
            used = start = 0;
            count = 0;
        }
        unsigned char *packet = r.base + used;
        memcpy(packet, header, header_len);
        memcpy(packet + header_len, data, len);
        Py_DECREF(item);
        uint16_t number = (uint16_t)((unsigned long)(sequence + i) & 0xFFFFu);
        packet[1] = (unsigned char)(i == n - 1 ? pt | 0x80 : pt);
        packet[2] = (unsigned char)(number >> 8);
        packet[3] = (unsigned char)(number & 0xFF);
        int length = (int)(header_len + len);
        int status = protect(ctx, packet, &length);
        if (status != 0) {
            PyObject *code = PyLong_FromLong(status);
            if (code != NULL) {
                PyErr_SetObject(SrtpError, code);
                Py_DECREF(code);
            }
            goto done;
        }
        if (length < (int)(header_len + len) || (size_t)length > header_len + len + (size_t)trailer_room) {
            PyErr_SetString(PyExc_RuntimeError, "send_frame: srtp_protect returned a length out of bounds");
            goto done;
        }
        size_t protected_len = (size_t)length;
        if (count && protected_len <= segment && used - start == (size_t)count * segment && count < max_segments &&
            used - start + protected_len <= (size_t)max_bytes) {
            count += 1;
        } else {
            if (count && write_run(&r, start, used, segment, count) != 0) {
                goto done;
            }
            start = used;
            count = 1;
            segment = protected_len;
        }
        used += protected_len;
        sent += protected_len;
    }
    if (count && write_run(&r, start, used, segment, count) != 0) {
        goto done;
    }
    result = Py_BuildValue("(nnn)", (Py_ssize_t)sent, r.datagrams, r.syscalls);
done:
    PyBuffer_Release(&buffer);
    PyBuffer_Release(&header_view);
    return result;
}

static PyMethodDef methods[] = {
    {"send_frame", (PyCFunction)(void (*)(void))send_frame, METH_FASTCALL, send_frame_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay.webrtc._fastsend",
    .m_doc = "A viewer's frame made, SRTP-protected and sent in one call (relay/webrtc/rtpsend.py's C path).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastsend(void) {
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (SrtpError == NULL) {
        SrtpError = PyErr_NewException("relay.webrtc._fastsend.SrtpError", NULL, NULL);
    }
    if (SrtpError == NULL || PyModule_AddObjectRef(module, "SrtpError", SrtpError) != 0 ||
        PyModule_AddIntConstant(module, "TRAILER_ROOM_MIN", TRAILER_ROOM_MIN) != 0 ||
        PyModule_AddIntConstant(module, "API_VERSION", API_VERSION) != 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
