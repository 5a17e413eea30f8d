/* Per-record work of preprocessing, in C: the validation-split digests, the record CRCs and
 * the views of chat records.
 *
 * Each exists in Python too (data_pipeline/preprocess.py validation_mask, data_pipeline/shards.py
 * _record_crcs, data_pipeline/sources.py ViewSpec._messages_block) and gives the same result;
 * this module only removes the Python work per record (a hash object, a bytes, a slice, a dict):
 * on 156k short records, 0.09 CPU s of ~0.7 (0.15 of ~1.1 for chat records). It is built by
 * `pip install -e .` (setup.py); where no C compiler is found the Python paths run instead.
 *
 *   split_digests(texts, n_views) -> bytes
 *       8 bytes per record: BLAKE2b with an 8-byte digest (hashlib.blake2b(data,
 *       digest_size=8).digest()) of the record's views, n_views consecutive strings of `texts`,
 *       joined by U+001F and encoded as UTF-8.
 *   record_crcs(data, ends) -> bytes
 *       4 bytes (little-endian) per record: zlib.crc32 of data[ends[i-1]:ends[i]] (from 0 for
 *       the first); `ends` a buffer of native int64 byte offsets, non-decreasing.
 *   messages_views(records, prefix) -> list | None
 *       The user and assistant views of decoded chat records (data_pipeline/sources.py
 *       ViewSpec._messages_block, which defines them), back to back; None where that gives None
 *       or a view is blank (empty or whitespace: sources._none_if_blank).
 *   field_views(records, names) -> list | None
 *       The attributes `names` (str) of each record, back to back; None where one is not a str
 *       or is blank.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* BLAKE2b, unkeyed (RFC 7693)                                                                */

static const uint64_t blake2b_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

/* The message word schedule of the rounds (round r takes row r % 10). */
static const uint8_t blake2b_sigma[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

typedef struct {
    uint64_t h[8];
    uint64_t bytes;   /* compressed so far */
    size_t fill;      /* bytes waiting in block */
    uint8_t block[128];
} blake2b_state;

static inline uint64_t rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64_le(const uint8_t *p) {
    uint64_t x;
    memcpy(&x, p, 8);  /* one load */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    x = __builtin_bswap64(x);
#endif
    return x;
}

#define G(a, b, c, d, x, y)                  \
    do {                                     \
        v[a] = v[a] + v[b] + (x);            \
        v[d] = rotr64(v[d] ^ v[a], 32);      \
        v[c] = v[c] + v[d];                  \
        v[b] = rotr64(v[b] ^ v[c], 24);      \
        v[a] = v[a] + v[b] + (y);            \
        v[d] = rotr64(v[d] ^ v[a], 16);      \
        v[c] = v[c] + v[d];                  \
        v[b] = rotr64(v[b] ^ v[c], 63);      \
    } while (0)

static void blake2b_compress(blake2b_state *s, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load64_le(s->block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = blake2b_iv[i];
    }
    v[12] ^= s->bytes;  /* the high word of the 128-bit counter stays 0: < 2^64 bytes */
    if (last) v[14] = ~v[14];
#define ROUND(r)                                                   \
    do {                                                           \
        const uint8_t *z = blake2b_sigma[(r) % 10];                \
        G(0, 4, 8, 12, m[z[0]], m[z[1]]);                          \
        G(1, 5, 9, 13, m[z[2]], m[z[3]]);                          \
        G(2, 6, 10, 14, m[z[4]], m[z[5]]);                         \
        G(3, 7, 11, 15, m[z[6]], m[z[7]]);                         \
        G(0, 5, 10, 15, m[z[8]], m[z[9]]);                         \
        G(1, 6, 11, 12, m[z[10]], m[z[11]]);                       \
        G(2, 7, 8, 13, m[z[12]], m[z[13]]);                        \
        G(3, 4, 9, 14, m[z[14]], m[z[15]]);                        \
    } while (0)
    /* spelled out: constant rounds let the compiler resolve the schedule (~15% faster here) */
    ROUND(0); ROUND(1); ROUND(2); ROUND(3); ROUND(4); ROUND(5);
    ROUND(6); ROUND(7); ROUND(8); ROUND(9); ROUND(10); ROUND(11);
#undef ROUND
    for (int i = 0; i < 8; i++) s->h[i] ^= v[i] ^ v[i + 8];
}

static void blake2b_init(blake2b_state *s, size_t digest_bytes) {
    memcpy(s->h, blake2b_iv, sizeof s->h);
    s->h[0] ^= 0x01010000ULL | digest_bytes;  /* parameter block: depth 1, fanout 1, no key */
    s->bytes = 0;
    s->fill = 0;
}

static void blake2b_update(blake2b_state *s, const uint8_t *p, size_t n) {
    while (n > 0) {
        if (s->fill == 128) {  /* a full block is compressed only once more input follows it */
            s->bytes += 128;
            blake2b_compress(s, 0);
            s->fill = 0;
        }
        size_t take = 128 - s->fill < n ? 128 - s->fill : n;
        memcpy(s->block + s->fill, p, take);
        s->fill += take;
        p += take;
        n -= take;
    }
}

static uint64_t blake2b_final64(blake2b_state *s) {  /* the first 8 bytes of the digest */
    s->bytes += s->fill;
    memset(s->block + s->fill, 0, 128 - s->fill);
    blake2b_compress(s, 1);
    return s->h[0];
}

static PyObject *split_digests(PyObject *self, PyObject *args) {
    PyObject *arg, *texts, *out = NULL;
    Py_ssize_t n_views;
    (void)self;
    if (!PyArg_ParseTuple(args, "On", &arg, &n_views)) return NULL;
    if ((texts = PySequence_Fast(arg, "texts: not a sequence")) == NULL) return NULL;
    Py_ssize_t n_texts = PySequence_Fast_GET_SIZE(texts);
    if (n_views < 1 || n_texts % n_views) {
        PyErr_Format(PyExc_ValueError, "%zd texts are not records of %zd views", n_texts, n_views);
        goto done;
    }
    if ((out = PyBytes_FromStringAndSize(NULL, (n_texts / n_views) * 8)) == NULL) goto done;
    uint8_t *digest = (uint8_t *)PyBytes_AS_STRING(out);
    static const uint8_t separator = 0x1f;
    blake2b_state s;
    for (Py_ssize_t i = 0; i < n_texts; i += n_views) {
        blake2b_init(&s, 8);
        for (Py_ssize_t j = 0; j < n_views; j++) {
            PyObject *text = PySequence_Fast_GET_ITEM(texts, i + j);
            Py_ssize_t size;
            /* UTF-8 as str.encode gives it (cached in the str, often there already: the
               tokenizer reads it too); a lone surrogate raises UnicodeEncodeError. */
            const char *utf8 = PyUnicode_Check(text) ? PyUnicode_AsUTF8AndSize(text, &size) : NULL;
            if (utf8 == NULL) {
                if (!PyErr_Occurred())
                    PyErr_Format(PyExc_TypeError, "text %zd is a %.100s, not a str", i + j,
                                 Py_TYPE(text)->tp_name);
                Py_CLEAR(out);
                goto done;
            }
            if (j > 0) blake2b_update(&s, &separator, 1);
            blake2b_update(&s, (const uint8_t *)utf8, (size_t)size);
        }
        uint64_t h = blake2b_final64(&s);
        for (int k = 0; k < 8; k++) *digest++ = (uint8_t)(h >> (8 * k));
    }
done:
    Py_DECREF(texts);
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* CRC-32 (zlib's: reflected polynomial 0xEDB88320), eight bytes per step ("slicing by 8")    */

static uint32_t crc_table[8][256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int i = 0; i < 256; i++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

static inline uint32_t load32_le(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint32_t crc32_of(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (; n >= 8; p += 8, n -= 8) {
        uint32_t a = c ^ load32_le(p), b = load32_le(p + 4);
        c = crc_table[7][a & 0xff] ^ crc_table[6][(a >> 8) & 0xff] ^
            crc_table[5][(a >> 16) & 0xff] ^ crc_table[4][a >> 24] ^
            crc_table[3][b & 0xff] ^ crc_table[2][(b >> 8) & 0xff] ^
            crc_table[1][(b >> 16) & 0xff] ^ crc_table[0][b >> 24];
    }
    for (; n > 0; p++, n--) c = crc_table[0][(c ^ *p) & 0xff] ^ (c >> 8);
    return ~c;
}

static PyObject *record_crcs(PyObject *self, PyObject *args) {
    Py_buffer data, ends;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*", &data, &ends)) return NULL;
    PyObject *out = NULL;
    if (ends.len % 8) {
        PyErr_SetString(PyExc_ValueError, "ends: not a buffer of int64");
        goto done;
    }
    Py_ssize_t n = ends.len / 8;
    const uint8_t *bytes = data.buf;
    int64_t start = 0;
    if ((out = PyBytes_FromStringAndSize(NULL, n * 4)) == NULL) goto done;
    uint8_t *crc = (uint8_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t end;
        memcpy(&end, (const uint8_t *)ends.buf + 8 * i, 8);
        if (end < start || end > data.len) {
            PyErr_Format(PyExc_ValueError, "record %zd ends at byte %lld, outside [%lld, %zd]", i,
                         (long long)end, (long long)start, data.len);
            Py_CLEAR(out);
            goto done;
        }
        uint32_t c = crc32_of(bytes + start, (size_t)(end - start));
        for (int k = 0; k < 4; k++) *crc++ = (uint8_t)(c >> (8 * k));
        start = end;
    }
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&ends);
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* Decoded records → views                                                                    */

static PyObject *str_messages, *str_role, *str_content, *str_user, *str_assistant, *str_system;

static int is_blank(PyObject *s) {  /* `not s or s.isspace()` */
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, i))) return 0;
    return 1;
}

#define MAX_ROLES 8 /* a record with more messages is left to the Python path */

/* The views of one record appended to `out`: 1, or 0 for "no views" (a role twice, user or
   assistant missing, a blank view, too many messages), -1 on error. */
static int append_views(PyObject *out, PyObject *record, int prefix) {
    PyObject *roles[MAX_ROLES], *user = NULL, *assistant = NULL, *system = NULL;
    int result = -1;
    Py_ssize_t n = 0;  /* roles held */
    PyObject *messages = PyObject_GetAttr(record, str_messages);
    if (messages == NULL) return -1;
    if (!PyList_Check(messages) || PyList_GET_SIZE(messages) > MAX_ROLES) {
        result = 0;
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(messages); i++) {
        PyObject *m = PyList_GET_ITEM(messages, i), *role, *content;
        if ((role = PyObject_GetAttr(m, str_role)) == NULL) goto done;
        roles[n++] = role;
        if (!PyUnicode_Check(role)) {
            result = 0;
            goto done;
        }
        for (Py_ssize_t k = 0; k < n - 1; k++) {
            if (PyUnicode_Compare(roles[k], role) == 0) {  /* (str and str: no error) */
                result = 0;
                goto done;
            }
        }
        if ((content = PyObject_GetAttr(m, str_content)) == NULL) goto done;
        if (!PyUnicode_Check(content)) {
            Py_DECREF(content);
            result = 0;
            goto done;
        }
        PyObject **slot = PyUnicode_Compare(role, str_user) == 0        ? &user
                          : PyUnicode_Compare(role, str_assistant) == 0 ? &assistant
                          : PyUnicode_Compare(role, str_system) == 0    ? &system
                                                                        : NULL;
        if (slot != NULL)
            *slot = content;  /* (a role appears once: nothing to release) */
        else
            Py_DECREF(content);
    }
    if (user == NULL || assistant == NULL) {
        result = 0;
        goto done;
    }
    if (prefix && system != NULL && !is_blank(system)) {
        if (is_blank(user)) {
            result = 0;
            goto done;
        }
        PyObject *joined = PyUnicode_FromFormat("%U\n\n%U", system, user);
        if (joined == NULL) goto done;
        Py_SETREF(user, joined);
    }
    if (is_blank(user) || is_blank(assistant))
        result = 0;
    else
        result = PyList_Append(out, user) || PyList_Append(out, assistant) ? -1 : 1;
done:
    for (Py_ssize_t k = 0; k < n; k++) Py_DECREF(roles[k]);
    Py_XDECREF(user);
    Py_XDECREF(assistant);
    Py_XDECREF(system);
    Py_DECREF(messages);
    return result;
}

static PyObject *messages_views(PyObject *self, PyObject *args) {
    PyObject *arg, *records, *out;
    int prefix;
    (void)self;
    if (!PyArg_ParseTuple(args, "Op", &arg, &prefix)) return NULL;
    if ((records = PySequence_Fast(arg, "records: not a sequence")) == NULL) return NULL;
    if ((out = PyList_New(0)) != NULL) {
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(records); i++) {
            int got = append_views(out, PySequence_Fast_GET_ITEM(records, i), prefix);
            if (got <= 0) {
                Py_SETREF(out, got == 0 ? Py_NewRef(Py_None) : NULL);
                break;
            }
        }
    }
    Py_DECREF(records);
    return out;
}

static PyObject *field_views(PyObject *self, PyObject *args) {
    PyObject *arg, *names, *records, *out;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO!", &arg, &PyTuple_Type, &names)) return NULL;
    if ((records = PySequence_Fast(arg, "records: not a sequence")) == NULL) return NULL;
    Py_ssize_t n_records = PySequence_Fast_GET_SIZE(records), n_names = PyTuple_GET_SIZE(names);
    if ((out = PyList_New(n_records * n_names)) == NULL) goto done;
    for (Py_ssize_t i = 0; i < n_records; i++) {
        PyObject *record = PySequence_Fast_GET_ITEM(records, i);
        for (Py_ssize_t j = 0; j < n_names; j++) {
            PyObject *view = PyObject_GetAttr(record, PyTuple_GET_ITEM(names, j));
            if (view == NULL) {
                Py_CLEAR(out);
                goto done;
            }
            PyList_SET_ITEM(out, i * n_names + j, view);  /* (the list owns it, even on None) */
            if (!PyUnicode_Check(view) || is_blank(view)) {
                Py_SETREF(out, Py_NewRef(Py_None));
                goto done;
            }
        }
    }
done:
    Py_DECREF(records);
    return out;
}

static PyMethodDef methods[] = {
    {"split_digests", split_digests, METH_VARARGS,
     "split_digests(texts, n_views) -> bytes: 8-byte BLAKE2b of each record's views joined by "
     "U+001F (UTF-8)."},
    {"record_crcs", record_crcs, METH_VARARGS,
     "record_crcs(data, ends) -> bytes: little-endian CRC32 of each record's bytes; ends: int64 "
     "byte offsets."},
    {"messages_views", messages_views, METH_VARARGS,
     "messages_views(records, prefix) -> list | None: the user and assistant views of decoded "
     "chat records."},
    {"field_views", field_views, METH_VARARGS,
     "field_views(records, names) -> list | None: the attributes `names` of each record."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Per-record preprocessing work in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    crc_init();
    struct { PyObject **name; const char *text; } names[] = {
        {&str_messages, "messages"}, {&str_role, "role"}, {&str_content, "content"},
        {&str_user, "user"}, {&str_assistant, "assistant"}, {&str_system, "system"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL) return NULL;
    return PyModule_Create(&module);
}
