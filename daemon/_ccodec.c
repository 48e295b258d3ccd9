/* Compiled decoder for the sections of a segment body (docs/format.md, section 6).
 *
 * daemon/codec.py is the reference: this file decodes the same bytes into the same
 * objects and raises the same SegmentFormatError messages, in the same order, for every
 * defect (tests/unit/test_accel.py proves it on generated and on corrupted bodies).
 * The manifest and the event sections (JSON) stay in Python; this walks the sections and
 * decodes the Kafka batches, which is where the per-record time goes.
 *
 * Two outputs:
 *   records  KafkaBatch objects holding KafkaRecord objects, equal to codec.decode_body's;
 *   produce  ProduceBatch objects: per record only what Producer.produce() takes (key,
 *            value, the final header list with the sink's own headers appended, a
 *            timestamp >= 0), no record object, no offset object.
 *
 * Hostile input: every length is checked against the section before a byte is read,
 * sums are computed in 64 bits (128 for the blob total) so nothing wraps, and reads that
 * the reference would clamp (Python slicing) are clamped to the body.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#ifndef __SIZEOF_INT128__
#error "the compiled decoder needs 128-bit integers; the pure-Python codec is used instead"
#endif
typedef __int128 i128;

#if PY_VERSION_HEX >= 0x030C0000
#define MEMBER_OBJECT_EX Py_T_OBJECT_EX
#define MEMBER_READONLY Py_READONLY
#else
#define MEMBER_OBJECT_EX T_OBJECT_EX
#define MEMBER_READONLY READONLY
#endif

#define SECTION_KAFKA 1
#define SECTION_EVENTS 2
#define SECTION_HEADER 9 /* u8 type, u64 payload length */
#define KAFKA_FIXED 12   /* i32 partition, u32 records, u32 headers */
#define PER_RECORD 29    /* offset 8, timestamp 8, key len 4, value len 4, header count 4, ts type 1 */
#define PER_HEADER 8     /* key len 4, value len 4 */
#define MAX_TS_TYPE 2

/* Configured once from Python (configure()): the classes the output is made of. */
static PyObject *FormatError;  /* daemon.errors.SegmentFormatError */
static PyTypeObject *RecordType;
static PyObject *BatchType;    /* KafkaBatch(stream, topic, partition, records) */
static PyObject *ProduceType;  /* ProduceBatch(stream, topic, partition, last_offset,
                                  timestamps, keys, values, headers) */
enum { F_OFFSET, F_TIMESTAMP, F_TS_TYPE, F_KEY, F_VALUE, F_HEADERS, N_FIELDS };
static const char *const FIELDS[N_FIELDS] = {
    "offset", "timestamp", "timestamp_type", "key", "value", "headers"};
static Py_ssize_t field_offset[N_FIELDS]; /* byte offset of each slot in a KafkaRecord */

static inline uint16_t ld_u16(const unsigned char *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}
static inline uint32_t ld_u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}
static inline uint64_t ld_u64(const unsigned char *p) {
    return (uint64_t)ld_u32(p) | ((uint64_t)ld_u32(p + 4) << 32);
}
static inline int32_t ld_i32(const unsigned char *p) { return (int32_t)ld_u32(p); }
static inline int64_t ld_i64(const unsigned char *p) { return (int64_t)ld_u64(p); }

/* Raise SegmentFormatError(message); with a pending exception, chain it as the cause
 * (the reference's `raise ... from e`). Always returns NULL. */
static PyObject *fail(const char *fmt, ...) {
    PyObject *cause = NULL, *ctype, *ctb;
    if (PyErr_Occurred()) {
        PyErr_Fetch(&ctype, &cause, &ctb);
        PyErr_NormalizeException(&ctype, &cause, &ctb);
        if (cause != NULL && ctb != NULL) PyException_SetTraceback(cause, ctb);
        Py_XDECREF(ctype);
        Py_XDECREF(ctb);
    }
    va_list ap;
    va_start(ap, fmt);
    PyObject *msg = PyUnicode_FromFormatV(fmt, ap);
    va_end(ap);
    if (msg != NULL) {
        PyObject *exc = PyObject_CallOneArg(FormatError, msg);
        Py_DECREF(msg);
        if (exc != NULL) {
            if (cause != NULL) {
                PyException_SetCause(exc, cause); /* steals */
                PyException_SetContext(exc, Py_NewRef(cause));
                cause = NULL;
            }
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
    }
    Py_XDECREF(cause);
    return NULL;
}

/* "... is not valid UTF-8: <the UnicodeDecodeError>", or the error itself if it is not
 * a decode error (MemoryError). */
static PyObject *fail_utf8(const char *what) {
    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) return NULL;
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    PyObject *text = PyObject_Str(v);
    PyErr_Restore(t, v, tb);
    if (text == NULL) return NULL;
    fail("%s is not valid UTF-8: %U", what, text);
    Py_DECREF(text);
    return NULL;
}

/* Header keys repeat (content-type, trace-id ...): share one str per distinct key. */
#define KEY_CACHE 8
#define KEY_CACHE_MAX_LEN 64
typedef struct {
    PyObject *str[KEY_CACHE];
    Py_ssize_t len[KEY_CACHE];
    unsigned char bytes[KEY_CACHE][KEY_CACHE_MAX_LEN];
    int next;
} KeyCache;

static void key_cache_clear(KeyCache *c) {
    for (int i = 0; i < KEY_CACHE; i++) Py_CLEAR(c->str[i]);
}

static PyObject *header_key(KeyCache *c, const unsigned char *p, Py_ssize_t n) {
    if (n > KEY_CACHE_MAX_LEN) {
        PyObject *s = PyUnicode_DecodeUTF8((const char *)p, n, "strict");
        return s != NULL ? s : fail_utf8("header key");
    }
    for (int i = 0; i < KEY_CACHE; i++) {
        if (c->str[i] != NULL && c->len[i] == n && memcmp(c->bytes[i], p, (size_t)n) == 0)
            return Py_NewRef(c->str[i]);
    }
    PyObject *s = PyUnicode_DecodeUTF8((const char *)p, n, "strict");
    if (s == NULL) return fail_utf8("header key");
    int slot = c->next;
    c->next = (c->next + 1) % KEY_CACHE;
    Py_XSETREF(c->str[slot], Py_NewRef(s));
    c->len[slot] = n;
    memcpy(c->bytes[slot], p, (size_t)n);
    return s;
}

/* bytes of n (n >= 0) at *p, or None for n == -1; advances *p. */
static inline PyObject *nullable(const unsigned char **p, int32_t n) {
    if (n < 0) Py_RETURN_NONE;
    PyObject *b = PyBytes_FromStringAndSize((const char *)*p, n);
    *p += n;
    return b;
}

static PyObject *read_short_str(const unsigned char *base, Py_ssize_t *pos, Py_ssize_t end,
                                const char *what) {
    if (end - *pos < 2) return fail("%s length runs past the end of its section", what);
    uint16_t n = ld_u16(base + *pos);
    *pos += 2;
    if (end - *pos < n)
        return fail("%s (%u bytes) runs past the end of its section", what, (unsigned)n);
    PyObject *s = PyUnicode_DecodeUTF8((const char *)base + *pos, n, "strict");
    if (s == NULL) return fail_utf8(what);
    *pos += n;
    return s;
}

static PyObject *i128_long(i128 v) {
    char buf[48], *q = buf + sizeof buf - 1;
    int neg = v < 0;
    unsigned __int128 u = neg ? -(unsigned __int128)v : (unsigned __int128)v;
    *q = '\0';
    do {
        *--q = (char)('0' + (int)(u % 10));
        u /= 10;
    } while (u);
    if (neg) *--q = '-';
    return PyLong_FromString(q, NULL, 10);
}

/* The column pointers of one Kafka batch, whose lengths are known to fit its section. */
typedef struct {
    uint32_t n, nh;
    const unsigned char *offsets, *timestamps, *key_lens, *value_lens, *header_counts,
        *hkey_lens, *hval_lens, *ts_types, *data;
} Columns;

static int any_below_minus_one(const unsigned char *col, uint32_t n) {
    for (uint32_t i = 0; i < n; i++)
        if (ld_i32(col + 4 * (size_t)i) < -1) return 1;
    return 0;
}

/* sum(lens) + lens.count(-1) for an i32 column: the bytes its non-null entries take when
 * every entry is >= -1 (the reference's formula, kept for negative entries too). */
static int64_t blob_i32(const unsigned char *col, uint32_t n) {
    int64_t s = 0;
    for (uint32_t i = 0; i < n; i++) {
        int32_t v = ld_i32(col + 4 * (size_t)i);
        s += v == -1 ? 0 : v;
    }
    return s;
}

/* The reference decodes header keys from Python slices of the body, which clamp at its
 * end. When a header value length below -1 makes the columns account for bytes the body
 * does not have, the keys' region may run past it: the reference still reports the first
 * key that is not UTF-8 (before refusing the negative length), so the same clamped reads
 * are done here. Returns 0, or -1 with the error set. */
static int check_keys_clamped(const unsigned char *base, Py_ssize_t size, i128 start,
                              const Columns *c) {
    i128 end = start;
    for (uint32_t i = 0; i < c->nh; i++) end += ld_u32(c->hkey_lens + 4 * (size_t)i);
    i128 lo = start < size ? start : size, hi = end < size ? end : size;
    int ascii = 1;
    for (i128 i = lo; i < hi; i++)
        if (base[(Py_ssize_t)i] & 0x80) { ascii = 0; break; }
    if (ascii) return 0;
    i128 at = start;
    for (uint32_t i = 0; i < c->nh; i++) {
        i128 a = at < size ? at : size;
        at += ld_u32(c->hkey_lens + 4 * (size_t)i);
        i128 b = at < size ? at : size;
        PyObject *s = PyUnicode_DecodeUTF8((const char *)base + (Py_ssize_t)a,
                                           (Py_ssize_t)(b - a), "strict");
        if (s == NULL) {
            fail_utf8("header key");
            return -1;
        }
        Py_DECREF(s);
    }
    return 0;
}

/* Checks of one Kafka batch, in the order the reference makes them; on success every
 * length is >= -1 and the lengths account for exactly the bytes up to `end`. */
static int check_kafka(const unsigned char *base, Py_ssize_t size, Py_ssize_t end,
                       const Columns *c) {
    for (uint32_t i = 0; i < c->n; i++)
        if (c->ts_types[i] > MAX_TS_TYPE) {
            fail("timestamp type out of range (0..2)");
            return -1;
        }
    uint64_t counted = 0;
    for (uint32_t i = 0; i < c->n; i++) counted += ld_u32(c->header_counts + 4 * (size_t)i);
    if (counted != c->nh) {
        fail("header counts sum to %llu, batch declares %u", (unsigned long long)counted,
             (unsigned)c->nh);
        return -1;
    }
    int64_t keys = blob_i32(c->key_lens, c->n), values = blob_i32(c->value_lens, c->n);
    int64_t hvals = blob_i32(c->hval_lens, c->nh);
    uint64_t hkeys = 0;
    for (uint32_t i = 0; i < c->nh; i++) hkeys += ld_u32(c->hkey_lens + 4 * (size_t)i);
    i128 blob = (i128)keys + values + (i128)hkeys + hvals;
    Py_ssize_t have = end - (Py_ssize_t)(c->data - base);
    if (blob != have) {
        PyObject *described = i128_long(blob);
        if (described != NULL) {
            fail("Kafka batch data is %zd bytes, its columns describe %S", have, described);
            Py_DECREF(described);
        }
        return -1;
    }
    if (any_below_minus_one(c->key_lens, c->n) || any_below_minus_one(c->value_lens, c->n)) {
        fail("negative length in a column");
        return -1;
    }
    if (c->nh && any_below_minus_one(c->hval_lens, c->nh)) {
        if (check_keys_clamped(base, size, (i128)(c->data - base) + keys + values, c) < 0)
            return -1;
        fail("negative length in a column");
        return -1;
    }
    return 0;
}

typedef struct {
    PyObject *tail;          /* produce mode: tuple of header tuples appended to each list */
    PyObject *offset_header; /* produce mode: str name of the source offset header, or NULL */
} ProduceSpec;

/* b"%d" % v: snprintf took a sixth of the produce form's instructions. */
static size_t format_i64(char out[24], int64_t v) {
    char tmp[24];
    size_t n = 0, len = 0;
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + (int)(u % 10));
        u /= 10;
    } while (u);
    if (v < 0) out[len++] = '-';
    while (n) out[len++] = tmp[--n];
    return len;
}

/* The header list of one record: its own headers, then (produce mode) the spec's. */
static PyObject *header_list(KeyCache *kc, const Columns *c, uint32_t count, uint32_t *h,
                             const unsigned char **hk, const unsigned char **hv,
                             const ProduceSpec *spec, int64_t offset) {
    Py_ssize_t extra = 0;
    if (spec != NULL)
        extra = PyTuple_GET_SIZE(spec->tail) + (spec->offset_header != NULL ? 1 : 0);
    PyObject *list = PyList_New((Py_ssize_t)count + extra);
    if (list == NULL) return NULL;
    for (uint32_t j = 0; j < count; j++, (*h)++) {
        uint32_t klen = ld_u32(c->hkey_lens + 4 * (size_t)*h);
        PyObject *k = header_key(kc, *hk, klen);
        if (k == NULL) goto error;
        *hk += klen;
        PyObject *v = nullable(hv, ld_i32(c->hval_lens + 4 * (size_t)*h));
        if (v == NULL) {
            Py_DECREF(k);
            goto error;
        }
        PyObject *pair = PyTuple_New(2);
        if (pair == NULL) {
            Py_DECREF(k);
            Py_DECREF(v);
            goto error;
        }
        PyTuple_SET_ITEM(pair, 0, k);
        PyTuple_SET_ITEM(pair, 1, v);
        PyList_SET_ITEM(list, j, pair);
    }
    if (spec != NULL) {
        Py_ssize_t at = count, ntail = PyTuple_GET_SIZE(spec->tail);
        for (Py_ssize_t t = 0; t < ntail; t++)
            PyList_SET_ITEM(list, at++, Py_NewRef(PyTuple_GET_ITEM(spec->tail, t)));
        if (spec->offset_header != NULL) {
            char digits[24];
            size_t len = format_i64(digits, offset);
            PyObject *v = PyBytes_FromStringAndSize(digits, (Py_ssize_t)len);
            if (v == NULL) goto error;
            PyObject *pair = PyTuple_Pack(2, spec->offset_header, v);
            Py_DECREF(v);
            if (pair == NULL) goto error;
            PyList_SET_ITEM(list, at, pair);
        }
    }
    return list;
error:
    Py_DECREF(list);
    return NULL;
}

/* Where the keys, values, header keys and header values start (checked lengths). */
static void data_regions(const Columns *c, const unsigned char **keys,
                         const unsigned char **values, const unsigned char **hkeys,
                         const unsigned char **hvals) {
    *keys = c->data;
    *values = *keys + blob_i32(c->key_lens, c->n);
    *hkeys = *values + blob_i32(c->value_lens, c->n);
    const unsigned char *p = *hkeys;
    for (uint32_t i = 0; i < c->nh; i++) p += ld_u32(c->hkey_lens + 4 * (size_t)i);
    *hvals = p;
}

static PyObject *new_record(PyObject *values[N_FIELDS]) {
    PyObject *r = RecordType->tp_alloc(RecordType, 0);
    if (r == NULL) return NULL;
    for (int f = 0; f < N_FIELDS; f++) *(PyObject **)((char *)r + field_offset[f]) = values[f];
    return r;
}

/* KafkaRecord objects for the batch (records mode). */
static PyObject *build_records(KeyCache *kc, const Columns *c) {
    PyObject *records = PyList_New(c->n);
    if (records == NULL) return NULL;
    const unsigned char *kp, *vp, *hk, *hv;
    data_regions(c, &kp, &vp, &hk, &hv);
    uint32_t h = 0;
    for (uint32_t i = 0; i < c->n; i++) {
        PyObject *f[N_FIELDS] = {NULL};
        f[F_OFFSET] = PyLong_FromLongLong(ld_i64(c->offsets + 8 * (size_t)i));
        f[F_TIMESTAMP] = PyLong_FromLongLong(ld_i64(c->timestamps + 8 * (size_t)i));
        f[F_TS_TYPE] = PyLong_FromLong(c->ts_types[i]);
        f[F_KEY] = nullable(&kp, ld_i32(c->key_lens + 4 * (size_t)i));
        f[F_VALUE] = nullable(&vp, ld_i32(c->value_lens + 4 * (size_t)i));
        f[F_HEADERS] = header_list(kc, c, ld_u32(c->header_counts + 4 * (size_t)i), &h, &hk,
                                   &hv, NULL, 0);
        PyObject *r = NULL;
        int ok = 1;
        for (int j = 0; j < N_FIELDS; j++) ok &= f[j] != NULL;
        if (ok) r = new_record(f);
        if (r == NULL) {
            for (int j = 0; j < N_FIELDS; j++) Py_XDECREF(f[j]);
            Py_DECREF(records);
            return NULL;
        }
        PyList_SET_ITEM(records, i, r);
    }
    return records;
}

/* Columns of produce() arguments (produce mode): timestamps, keys, values, headers. */
static int build_produce(KeyCache *kc, const Columns *c, const ProduceSpec *spec,
                         PyObject *out[4]) {
    for (int j = 0; j < 4; j++) {
        out[j] = PyList_New(c->n);
        if (out[j] == NULL) goto error;
    }
    const unsigned char *kp, *vp, *hk, *hv;
    data_regions(c, &kp, &vp, &hk, &hv);
    uint32_t h = 0;
    for (uint32_t i = 0; i < c->n; i++) {
        int64_t ts = ld_i64(c->timestamps + 8 * (size_t)i);
        PyObject *t = PyLong_FromLongLong(ts >= 0 ? ts : 0);
        if (t == NULL) goto error;
        PyList_SET_ITEM(out[0], i, t);
        PyObject *k = nullable(&kp, ld_i32(c->key_lens + 4 * (size_t)i));
        if (k == NULL) goto error;
        PyList_SET_ITEM(out[1], i, k);
        PyObject *v = nullable(&vp, ld_i32(c->value_lens + 4 * (size_t)i));
        if (v == NULL) goto error;
        PyList_SET_ITEM(out[2], i, v);
        PyObject *hl = header_list(kc, c, ld_u32(c->header_counts + 4 * (size_t)i), &h, &hk,
                                   &hv, spec, ld_i64(c->offsets + 8 * (size_t)i));
        if (hl == NULL) goto error;
        PyList_SET_ITEM(out[3], i, hl);
    }
    return 0;
error:
    for (int j = 0; j < 4; j++) Py_CLEAR(out[j]);
    return -1;
}

typedef struct {
    PyObject *batches; /* list */
    uint64_t count;
    int have_ts;
    int64_t lo, hi;
} Totals;

/* One Kafka section [pos, end): appends its batch to t->batches. */
static int decode_kafka(const unsigned char *base, Py_ssize_t size, Py_ssize_t pos,
                        Py_ssize_t end, const ProduceSpec *spec, KeyCache *kc, Totals *t) {
    PyObject *stream = NULL, *topic = NULL, *partition = NULL, *batch = NULL;
    stream = read_short_str(base, &pos, end, "stream");
    if (stream == NULL) goto error;
    topic = read_short_str(base, &pos, end, "topic");
    if (topic == NULL) goto error;
    if (end - pos < KAFKA_FIXED) {
        fail("Kafka batch header runs past the end of its section");
        goto error;
    }
    Columns c;
    int32_t part = ld_i32(base + pos);
    c.n = ld_u32(base + pos + 4);
    c.nh = ld_u32(base + pos + 8);
    pos += KAFKA_FIXED;
    if ((uint64_t)c.n * PER_RECORD + (uint64_t)c.nh * PER_HEADER > (uint64_t)(end - pos)) {
        fail("Kafka batch columns (%u records, %u headers) run past its section",
             (unsigned)c.n, (unsigned)c.nh);
        goto error;
    }
    c.offsets = base + pos;
    c.timestamps = c.offsets + 8 * (size_t)c.n;
    c.key_lens = c.timestamps + 8 * (size_t)c.n;
    c.value_lens = c.key_lens + 4 * (size_t)c.n;
    c.header_counts = c.value_lens + 4 * (size_t)c.n;
    c.hkey_lens = c.header_counts + 4 * (size_t)c.n;
    c.hval_lens = c.hkey_lens + 4 * (size_t)c.nh;
    c.ts_types = c.hval_lens + 4 * (size_t)c.nh;
    c.data = c.ts_types + c.n;
    if (check_kafka(base, size, end, &c) < 0) goto error;
    partition = PyLong_FromLong(part);
    if (partition == NULL) goto error;
    if (spec == NULL) {
        PyObject *records = build_records(kc, &c);
        if (records == NULL) goto error;
        batch = PyObject_CallFunction(BatchType, "OOON", stream, topic, partition, records);
    } else {
        PyObject *cols[4];
        if (build_produce(kc, &c, spec, cols) < 0) goto error;
        PyObject *last = c.n ? PyLong_FromLongLong(ld_i64(c.offsets + 8 * ((size_t)c.n - 1)))
                             : Py_NewRef(Py_None);
        if (last == NULL) {
            for (int j = 0; j < 4; j++) Py_DECREF(cols[j]);
            goto error;
        }
        batch = PyObject_CallFunction(ProduceType, "OOONNNNN", stream, topic, partition, last,
                                      cols[0], cols[1], cols[2], cols[3]);
    }
    if (batch == NULL || PyList_Append(t->batches, batch) < 0) goto error;
    for (uint32_t i = 0; i < c.n; i++) {
        int64_t ts = ld_i64(c.timestamps + 8 * (size_t)i);
        if (!t->have_ts) {
            t->lo = t->hi = ts;
            t->have_ts = 1;
        } else if (ts < t->lo) {
            t->lo = ts;
        } else if (ts > t->hi) {
            t->hi = ts;
        }
    }
    t->count += c.n;
    Py_DECREF(stream);
    Py_DECREF(topic);
    Py_DECREF(partition);
    Py_DECREF(batch);
    return 0;
error:
    Py_XDECREF(stream);
    Py_XDECREF(topic);
    Py_XDECREF(partition);
    Py_XDECREF(batch);
    return -1;
}

/* One event section: events(data, pos, end) -> (EventBatch, number of events). */
static int decode_events(PyObject *events, PyObject *data, Py_ssize_t pos, Py_ssize_t end,
                         Totals *t) {
    PyObject *res = PyObject_CallFunction(events, "Onn", data, pos, end);
    if (res == NULL) return -1;
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_TypeError, "events() must return (batch, count)");
        return -1;
    }
    unsigned long long n = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(res, 1));
    if (PyErr_Occurred() || PyList_Append(t->batches, PyTuple_GET_ITEM(res, 0)) < 0) {
        Py_DECREF(res);
        return -1;
    }
    t->count += n;
    Py_DECREF(res);
    return 0;
}

static PyObject *sections(PyObject *data, Py_ssize_t pos, PyObject *events,
                          const ProduceSpec *spec) {
    if (FormatError == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "daemon._ccodec.configure() was not called");
        return NULL;
    }
    if (!PyBytes_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "data must be bytes");
        return NULL;
    }
    const unsigned char *base = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (pos < 0 || pos > size) {
        PyErr_SetString(PyExc_ValueError, "pos is outside the body");
        return NULL;
    }
    Totals t = {PyList_New(0), 0, 0, 0, 0};
    if (t.batches == NULL) return NULL;
    KeyCache kc;
    memset(&kc, 0, sizeof kc);
    while (pos < size) {
        if (size - pos < SECTION_HEADER) {
            fail("section header at byte %zd runs past the end of the body", pos);
            goto error;
        }
        unsigned kind = base[pos];
        uint64_t plen = ld_u64(base + pos + 1);
        pos += SECTION_HEADER;
        if (plen > (uint64_t)(size - pos)) {
            fail("section at byte %zd (%llu bytes) runs past the end of the body", pos,
                 (unsigned long long)plen);
            goto error;
        }
        Py_ssize_t end = pos + (Py_ssize_t)plen;
        int rc;
        if (kind == SECTION_KAFKA) {
            rc = decode_kafka(base, size, pos, end, spec, &kc, &t);
        } else if (kind == SECTION_EVENTS) {
            rc = decode_events(events, data, pos, end, &t);
        } else {
            fail("unknown section type %u at byte %zd", kind, pos - SECTION_HEADER);
            rc = -1;
        }
        if (rc < 0) goto error;
        pos = end;
    }
    key_cache_clear(&kc);
    if (!t.have_ts) return Py_BuildValue("(NKOO)", t.batches, (unsigned long long)t.count, Py_None, Py_None);
    return Py_BuildValue("(NKLL)", t.batches, (unsigned long long)t.count, (long long)t.lo, (long long)t.hi);
error:
    key_cache_clear(&kc);
    Py_DECREF(t.batches);
    return NULL;
}

PyDoc_STRVAR(decode_sections_doc,
"decode_sections(data, pos, events) -> (batches, count, min_ts, max_ts)\n\n"
"The sections of body `data` from byte `pos` (after the manifest): KafkaBatch objects as\n"
"daemon.codec decodes them, events(data, start, end) -> (EventBatch, count) for the event\n"
"sections; count and min/max_ts over every record (None without Kafka records).");

static PyObject *decode_sections(PyObject *self, PyObject *args) {
    PyObject *data, *events;
    Py_ssize_t pos;
    if (!PyArg_ParseTuple(args, "OnO:decode_sections", &data, &pos, &events)) return NULL;
    return sections(data, pos, events, NULL);
}

PyDoc_STRVAR(decode_produce_doc,
"decode_produce(data, pos, events, tail, offset_header) -> (batches, count, min_ts, max_ts)\n\n"
"Like decode_sections, with a ProduceBatch per Kafka section: each record's header list\n"
"ends with the header tuples of `tail` and, unless offset_header is None,\n"
"(offset_header, b'<source offset>'); timestamps below 0 become 0.");

static PyObject *decode_produce(PyObject *self, PyObject *args) {
    PyObject *data, *events, *tail, *offset_header;
    Py_ssize_t pos;
    if (!PyArg_ParseTuple(args, "OnOO!O:decode_produce", &data, &pos, &events, &PyTuple_Type,
                          &tail, &offset_header))
        return NULL;
    if (offset_header != Py_None && !PyUnicode_Check(offset_header)) {
        PyErr_SetString(PyExc_TypeError, "offset_header must be a str or None");
        return NULL;
    }
    ProduceSpec spec = {tail, offset_header == Py_None ? NULL : offset_header};
    return sections(data, pos, events, &spec);
}

/* The record class must be a slotted class whose slots are exactly FIELDS: its objects
 * are then made here without calling __init__ (a dataclass __init__ only assigns them). */
static int configure_record(PyObject *cls) {
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "record type must be a class");
        return -1;
    }
    PyTypeObject *tp = (PyTypeObject *)cls;
    if (tp->tp_dictoffset != 0 || PyObject_HasAttrString(cls, "__post_init__")) {
        PyErr_SetString(PyExc_TypeError, "record type must have slots and no __post_init__");
        return -1;
    }
    for (int f = 0; f < N_FIELDS; f++) {
        PyObject *d = PyDict_GetItemString(tp->tp_dict, FIELDS[f]);
        if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type) ||
            ((PyDescrObject *)d)->d_type != tp) {
            PyErr_Format(PyExc_TypeError, "record type has no slot %s", FIELDS[f]);
            return -1;
        }
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != MEMBER_OBJECT_EX || (m->flags & MEMBER_READONLY)) {
            PyErr_Format(PyExc_TypeError, "slot %s is not a writable object slot", FIELDS[f]);
            return -1;
        }
        field_offset[f] = m->offset;
    }
    Py_XSETREF(RecordType, (PyTypeObject *)Py_NewRef(cls));
    return 0;
}

PyDoc_STRVAR(configure_doc,
"configure(record_type, batch_type, produce_type, error_type)\n\n"
"The classes decoded bodies are made of (daemon.codec's KafkaRecord and KafkaBatch,\n"
"daemon.accel's ProduceBatch) and the error raised for a malformed body.");

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *rec, *batch, *produce, *err;
    if (!PyArg_ParseTuple(args, "OOOO:configure", &rec, &batch, &produce, &err)) return NULL;
    if (!PyExceptionClass_Check(err) || !PyCallable_Check(batch) || !PyCallable_Check(produce)) {
        PyErr_SetString(PyExc_TypeError, "configure() needs classes");
        return NULL;
    }
    if (configure_record(rec) < 0) return NULL;
    Py_XSETREF(BatchType, Py_NewRef(batch));
    Py_XSETREF(ProduceType, Py_NewRef(produce));
    Py_XSETREF(FormatError, Py_NewRef(err));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_sections", decode_sections, METH_VARARGS, decode_sections_doc},
    {"decode_produce", decode_produce, METH_VARARGS, decode_produce_doc},
    {"configure", configure, METH_VARARGS, configure_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ccodec",
    "Compiled decoder of segment body sections (reference: daemon/codec.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__ccodec(void) { return PyModule_Create(&module); }
