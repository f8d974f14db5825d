/* An RTSP camera's RTP packets into the access unit being gathered, in C: the depacketizer's per-packet step.

   relay/rtspin.py's H264Depacketizer.push_frames reads a playing connection's
   interleaved frames where they lie in what was read; most of them, the next
   packet in sequence of the unit being gathered (an FU-A's start or its
   next fragment, a single NAL unit), it takes with no object of its own.
   take() below does that same step for a run of such frames in one call: it
   appends each one's bytes to the unit (a bytearray, Annex B), each NAL
   unit's type and place to the unit's lists, and stops, without taking it,
   at the first frame it would not take (another channel, a packet out of
   sequence, a new timestamp, an SSRC or payload type not the video's, an RTP
   header with padding, an extension or CSRCs, STAP-A, a NAL unit that breaks
   the unit's cap or an FU-A's order, a frame cut off at the end of the read),
   and after the packet that carries the marker bit.  The next packet in
   sequence that starts a new unit, once the last one was finished at its
   marker, it starts as the Python step does (its timestamp unwrapped) and
   takes.  The caller (Python)
   decides every such frame exactly as before: nothing but what the Python
   step took is taken here, and its state comes back to the caller whole.

   Nothing from the network reaches a size or an index unchecked: each frame's
   length is checked against what was read before a byte of it is looked at,
   and the unit's cap (MAX_UNIT_BYTES, the caller's) before a byte is added.
   The GIL is held throughout (the bytearray and the lists are Python's). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* take()'s arguments and results as this file has them: relay/rtspin.py uses the module only when its
   RTPIN_API is the same (an editable install's built module is not rebuilt when the source changes). */
#define API_VERSION 3
#define INTERLEAVED_HEADER 4 /* "$", channel, length (RFC 2326 10.12) */
#define RTP_HEADER 12        /* version to SSRC, with no CSRC */
/* An interleaved frame's header, its RTP packet's fixed header and two bytes of payload (an FU-A's indicator and
   header): what is read of a frame before deciding (rtspin.FRAME_HEAD). */
#define FRAME_HEAD (INTERLEAVED_HEADER + RTP_HEADER + 2)
#define DOLLAR 0x24
#define RTP_VERSION_ONLY 0x80 /* version 2, no padding, no extension, no CSRC */
#define NAL_IDR 5
#define NAL_FU_A 28
#define NAL_OVERHEAD 64 /* rtspin.NAL_OVERHEAD: what a NAL unit held costs beyond its bytes, counted in the cap */
#define SEQUENCE_MOD 65536
#define TIMESTAMP_MOD 4294967296LL

static const char START_CODE[4] = {0, 0, 0, 1};

/* `more` bytes of `data` at the end of bytearray `unit`; -1 with an exception set where it cannot grow (it
   is exported: a view of it is held). */
static int append(PyObject *unit, const void *data, Py_ssize_t more) {
    Py_ssize_t size = PyByteArray_GET_SIZE(unit);
    if (PyByteArray_Resize(unit, size + more) < 0) {
        return -1;
    }
    memcpy(PyByteArray_AS_STRING(unit) + size, data, (size_t)more);
    return 0;
}

static int append_int(PyObject *list, long value) {
    PyObject *number = PyLong_FromLong(value);
    if (number == NULL) {
        return -1;
    }
    int result = PyList_Append(list, number);
    Py_DECREF(number);
    return result;
}

/* take(view, pos, channel, payload_type, unit, kinds, starts, next_seq, next_ts, next_ssrc, fu, size, keyframe,
        limit, last_ts) -> (pos, taken, next_seq, next_ts, last_ts, started, fu, size, keyframe, marker, more)

   The frames of `view` (a buffer: what was read) from `pos` on that H264Depacketizer.push_frames would take
   where they lie, taken: each one's payload into bytearray `unit`, each NAL unit it starts into `kinds` (its
   type) and `starts` (where its header byte is in `unit`).  `next_seq`, `next_ts`, `next_ssrc`: the packet that
   may be taken (the next in sequence of the unit being gathered); `fu`: where the FU-A being gathered starts in
   `unit`, -1 when none is; `size`: the unit's whole NAL units' bytes, each with NAL_OVERHEAD; `keyframe`: one of
   them is an IDR slice; `limit`: the unit's cap; `last_ts`: the last packet's timestamp, unwrapped.  Returns
   where it stopped (the first frame not taken, or the one after a marker), how many it took, and the state after
   them; `started` is true when a new unit was started (its timestamp `next_ts`, unwrapped `last_ts`: the unit's
   own, even where its first packet was then not taken), `marker` when the last one taken carried the marker bit
   (the unit is whole: the caller finishes it), `more` when a whole frame (or what is no frame) lies at `pos` for
   the caller to decide, and not only the start of one cut off at the end of what was read. */
static PyObject *take(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 15) {
        PyErr_Format(PyExc_TypeError, "take() takes 15 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *unit = args[4], *kinds = args[5], *starts = args[6];
    if (!PyByteArray_CheckExact(unit) || !PyList_CheckExact(kinds) || !PyList_CheckExact(starts)) {
        PyErr_SetString(PyExc_TypeError, "take(): unit must be a bytearray, kinds and starts lists");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    long channel = PyLong_AsLong(args[2]);
    long payload_type = PyLong_AsLong(args[3]);
    long next_seq = PyLong_AsLong(args[7]);
    unsigned long next_ts = PyLong_AsUnsignedLong(args[8]);
    unsigned long next_ssrc = PyLong_AsUnsignedLong(args[9]);
    Py_ssize_t fu = PyLong_AsSsize_t(args[10]);
    Py_ssize_t size = PyLong_AsSsize_t(args[11]);
    int keyframe = PyObject_IsTrue(args[12]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[13]);
    long long last_ts = PyLong_AsLongLong(args[14]);
    if (PyErr_Occurred() || keyframe < 0) {
        return NULL;
    }
    if (pos < 0 || next_seq < 0 || next_seq >= SEQUENCE_MOD || fu < -1 || fu > PyByteArray_GET_SIZE(unit)) {
        PyErr_SetString(PyExc_ValueError, "take(): pos, next_seq or fu out of range");
        return NULL;
    }
    Py_buffer buffer;
    if (PyObject_GetBuffer(args[0], &buffer, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *data = buffer.buf;
    Py_ssize_t end_of_data = buffer.len;
    long taken = 0;
    int marker = 0, failed = 0, started = 0, more = 0;
    for (;;) {
        if (pos > end_of_data - FRAME_HEAD) { /* a frame too short for the fields read, or one cut off */
            more = pos <= end_of_data - INTERLEAVED_HEADER &&
                   (data[pos] != DOLLAR ||
                    pos + INTERLEAVED_HEADER + (data[pos + 2] << 8 | data[pos + 3]) <= end_of_data);
            break;
        }
        const unsigned char *f = data + pos;
        Py_ssize_t length = (Py_ssize_t)f[2] << 8 | f[3];
        Py_ssize_t start = pos + INTERLEAVED_HEADER, end = start + length;
        more = f[0] != DOLLAR || end <= end_of_data;
        if (!more || f[0] != DOLLAR || f[1] != channel) {
            break;
        }
        const unsigned char *rtp = f + INTERLEAVED_HEADER;
        long seq = (long)rtp[2] << 8 | rtp[3];
        unsigned long ts =
            (unsigned long)rtp[4] << 24 | (unsigned long)rtp[5] << 16 | (unsigned long)rtp[6] << 8 | rtp[7];
        unsigned long ssrc =
            (unsigned long)rtp[8] << 24 | (unsigned long)rtp[9] << 16 | (unsigned long)rtp[10] << 8 | rtp[11];
        /* Long enough for the fields read; version 2 with no padding, extension or CSRC; the video; the next packet in
           sequence. */
        if (!(length > RTP_HEADER + 2 && seq == next_seq && rtp[0] == RTP_VERSION_ONLY && ssrc == next_ssrc &&
              (rtp[1] & 0x7F) == payload_type)) {
            break;
        }
        if (ts != next_ts) {
            if (PyByteArray_GET_SIZE(unit) != 0 || fu >= 0) {
                break; /* the unit being gathered is not finished: push decides */
            }
            /* The first of a new unit after the last was finished: its timestamp unwrapped as _unwrap does. */
            long long delta = ((long long)ts - (long long)next_ts) % TIMESTAMP_MOD;
            if (delta < 0) {
                delta += TIMESTAMP_MOD;
            }
            if (delta >= TIMESTAMP_MOD / 2) {
                delta -= TIMESTAMP_MOD;
            }
            last_ts += delta;
            next_ts = ts;
            started = 1;
        }
        Py_ssize_t at = start + RTP_HEADER;
        unsigned char indicator = data[at], header = data[at + 1];
        int kind = indicator & 0x1F;
        if (kind == NAL_FU_A && (fu < 0) == ((header & 0x80) != 0)) { /* a start, or one goes on */
            Py_ssize_t whole = (fu >= 0 ? PyByteArray_GET_SIZE(unit) - fu : 1) + end - at - 2; /* the NAL unit's */
            if (whole + size + ((header & 0x40) ? NAL_OVERHEAD : 0) > limit) {
                break;
            }
            if (fu < 0) {
                unsigned char nal_header = (indicator & 0xE0) | (header & 0x1F);
                if (append(unit, START_CODE, sizeof START_CODE) < 0 ||
                    append_int(starts, (long)PyByteArray_GET_SIZE(unit)) < 0 ||
                    append(unit, &nal_header, 1) < 0 || append_int(kinds, header & 0x1F) < 0) {
                    failed = 1;
                    break;
                }
                fu = PyByteArray_GET_SIZE(unit) - 1;
            }
            if (append(unit, data + at + 2, end - at - 2) < 0) {
                failed = 1;
                break;
            }
            if (header & 0x40) { /* its end */
                fu = -1;
                size += whole + NAL_OVERHEAD;
                keyframe = keyframe || (header & 0x1F) == NAL_IDR;
            }
        } else if (kind >= 1 && kind <= 23 && fu < 0 && size + end - at + NAL_OVERHEAD <= limit) {
            if (append(unit, START_CODE, sizeof START_CODE) < 0 ||
                append_int(starts, (long)PyByteArray_GET_SIZE(unit)) < 0 || append(unit, data + at, end - at) < 0 ||
                append_int(kinds, kind) < 0) {
                failed = 1;
                break;
            }
            size += end - at + NAL_OVERHEAD;
            keyframe = keyframe || kind == NAL_IDR;
        } else {
            break;
        }
        taken += 1;
        next_seq = (seq + 1) % SEQUENCE_MOD;
        pos = end;
        if (rtp[1] & 0x80) { /* its marker: the unit is whole */
            marker = 1;
            break;
        }
    }
    PyBuffer_Release(&buffer);
    if (failed) {
        /* Only where memory ran out (the unit is the depacketizer's own, never exported): as a MemoryError in
           the Python step, the unit being gathered is then not to be trusted. */
        return NULL;
    }
    return Py_BuildValue("(nllkLOnnOOO)", pos, taken, next_seq, next_ts, last_ts, started ? Py_True : Py_False, fu,
                         size, keyframe ? Py_True : Py_False, marker ? Py_True : Py_False, more ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"take", (PyCFunction)(void (*)(void))take, METH_FASTCALL,
     "take(view, pos, channel, payload_type, unit, kinds, starts, next_seq, next_ts, next_ssrc, fu, size, keyframe, "
     "limit, last_ts) -> (pos, taken, next_seq, next_ts, last_ts, started, fu, size, keyframe, marker, more): the next "
     "packets of the unit being gathered, taken where they lie in what was read"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "relay._rtpin", "An RTSP camera's RTP packets into access units: the per-packet step in C.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rtpin(void) {
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "API_VERSION", API_VERSION) != 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
