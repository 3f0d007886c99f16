/* The function tracer's recorder in C: the same frames and text as cwm_exec.tracer's
 * _FunctionRecorder (the reference implementation, kept in Python), at a fraction of the cost.
 *
 * Why C: a sys.settrace callback written in Python pays, at every event, the trampoline's sync of
 * fast locals to a dict and back plus a Python call, and then our per-local loop in bytecode.
 * Installed with _PyEval_SetTrace, this recorder is called directly by the interpreter, reads the
 * locals once per event, and runs the per-local change detection in C. What it records, and
 * every rule for how (identity-based unchanged values, container prefix snapshots, capped reprs,
 * callee scopes written in full after a return, limits), is documented on the Python side;
 * tests/traces/test_ctracer.py checks that both produce identical results.
 *
 * Only events of the innermost traced scope's frame are recorded (a frame that was refused at
 * its call event never is); once the trace is done, stopped by a limit, or broken by an error,
 * every later event is ignored, as CPython does by switching a Python tracer off.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>
#include <structmember.h>

/* ---- configuration shared with cwm_exec.tracer (set once by configure()) ------------------ */
static PyObject *FrameType;          /* trace_format.Frame (a named tuple) */
static PyObject *LimitExceeded;      /* tracer.TraceLimitExceeded */
static PyObject *EncodeString;       /* json.encoder.encode_basestring (for escapes) */
static PyObject *Unchanged;          /* ".." */
static PyObject *TruncationMarker;   /* "...<truncated>" */
static PyObject *CallSep, *LineSep, *ReturnSep, *ExceptionSep, *ActionSep, *ArgSep, *FrameSep;
/* made here */
static PyObject *EvCall, *EvLine, *EvReturn, *EvException, *Def, *AsyncDef, *Empty;

/* Unlike tracer._MIN_SNAPSHOT (8: in Python, a short container reprs faster than it compares),
 * every container gets a snapshot here: comparing pointers in C beats any repr. The output is
 * the same either way (equal snapshots imply equal reprs). */
#define MIN_SNAPSHOT 0


static int
is_atom(PyTypeObject *t)    /* tracer._ATOMS */
{
    return t == &PyLong_Type || t == &PyBool_Type || t == Py_TYPE(Py_None) || t == &PyFloat_Type;
}

static int
is_atom_type(PyTypeObject *t)    /* tracer._ATOM_TYPES: immutable items worth a snapshot */
{
    return is_atom(t) || t == &PyUnicode_Type || t == &PyBytes_Type || t == &PyComplex_Type;
}

static int
is_immutable(PyTypeObject *t)    /* tracer._IMMUTABLE: the same object has the same repr */
{
    return is_atom_type(t) || t == &PyRange_Type;
}

static int
is_container(PyTypeObject *t)    /* tracer._CONTAINERS */
{
    return t == &PyList_Type || t == &PyTuple_Type || t == &PyDict_Type;
}

/* ---- values ------------------------------------------------------------------------------- */

/* Room for need items of item_size bytes in the array *items of *capacity items (grown to twice
 * need, at least minimum); -1 with MemoryError set when memory runs out. */
static int
reserve(void **items, Py_ssize_t *capacity, Py_ssize_t need, Py_ssize_t minimum, size_t item_size)
{
    if (need <= *capacity)
        return 0;
    Py_ssize_t grown = need < minimum ? minimum : 2 * need;
    void *more = PyMem_Realloc(*items, grown * item_size);
    if (more == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *items = more;
    *capacity = grown;
    return 0;
}

/* A reference to text cut to cap characters plus the marker (text itself when it is short enough);
 * steals the reference to text. */
static PyObject *
truncated(PyObject *text, Py_ssize_t cap)
{
    if (PyUnicode_GET_LENGTH(text) <= cap)
        return text;
    PyObject *head = PyUnicode_Substring(text, 0, cap);
    Py_DECREF(text);
    if (head == NULL)
        return NULL;
    text = PyUnicode_Concat(head, TruncationMarker);
    Py_DECREF(head);
    return text;
}

/* tracer.capped_repr: repr cut to cap characters plus the marker; long containers repr'd from a
 * prefix; a failing __repr__ becomes "<repr failed: Name>" (a limit's exception propagates). */
static PyObject *
capped_repr(PyObject *obj, Py_ssize_t cap)
{
    PyTypeObject *kind = Py_TYPE(obj);
    Py_ssize_t prefix = cap / 3 + 2;
    PyObject *text = NULL;
    if (kind == &PyList_Type || kind == &PyTuple_Type || kind == &PyBytes_Type
            || kind == &PyUnicode_Type) {
        Py_ssize_t n = Py_SIZE(obj);
        if (kind == &PyUnicode_Type)
            n = PyUnicode_GET_LENGTH(obj);
        if (n > prefix) {
            PyObject *part;
            if (kind == &PyList_Type)
                part = PyList_GetSlice(obj, 0, prefix);
            else if (kind == &PyTuple_Type)
                part = PyTuple_GetSlice(obj, 0, prefix);
            else if (kind == &PyBytes_Type)
                part = PyBytes_FromStringAndSize(PyBytes_AS_STRING(obj), prefix);
            else
                part = PyUnicode_Substring(obj, 0, cap + 1);
            if (part != NULL) {
                text = PyObject_Repr(part);
                Py_DECREF(part);
            }
            goto done;
        }
    }
    else if (kind == &PyDict_Type && PyDict_GET_SIZE(obj) > prefix) {
        PyObject *part = PyDict_New(), *key, *value;
        Py_ssize_t pos = 0, taken = 0;
        if (part == NULL)
            goto done;
        while (taken < prefix && PyDict_Next(obj, &pos, &key, &value)) {
            Py_INCREF(key);
            Py_INCREF(value);
            int rc = PyDict_SetItem(part, key, value);
            Py_DECREF(key);
            Py_DECREF(value);
            if (rc < 0) {
                Py_DECREF(part);
                goto done;
            }
            taken++;
        }
        text = PyObject_Repr(part);
        Py_DECREF(part);
        goto done;
    }
    text = PyObject_Repr(obj);
done:
    if (text == NULL) {
        if (PyErr_ExceptionMatches(LimitExceeded))
            return NULL;
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        PyObject *name = value != NULL ? PyType_GetName(Py_TYPE(value)) : NULL;
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        if (name == NULL)
            return NULL;
        text = PyUnicode_FromFormat("<repr failed: %U>", name);
        Py_DECREF(name);
        return text;
    }
    return truncated(text, cap);
}

/* The text of a value not seen before: plain repr for atoms and short strings (the common
 * case), capped_repr for the rest. */
static PyObject *
value_text(PyObject *obj, Py_ssize_t cap)
{
    PyTypeObject *kind = Py_TYPE(obj);
    if (is_atom(kind) || (kind == &PyUnicode_Type && PyUnicode_GET_LENGTH(obj) < cap / 2)) {
        PyObject *text = PyObject_Repr(obj);
        if (text == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_ValueError))   /* an int too long to convert */
                return NULL;
            PyErr_Clear();
            return capped_repr(obj, cap);
        }
        if (PyUnicode_GET_LENGTH(text) > cap) {
            Py_DECREF(text);
            return capped_repr(obj, cap);
        }
        return text;
    }
    return capped_repr(obj, cap);
}

static int
all_atoms(PyObject **items, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (!is_atom_type(Py_TYPE(items[i])))
            return 0;
    return 1;
}

/* tracer._snapshot: the first span items of a list, tuple or dict when they are all immutable
 * atoms; Py_None when not worth it or not possible. New reference. */
static PyObject *
snapshot(PyObject *obj, PyTypeObject *kind, Py_ssize_t span)
{
    if (kind == &PyDict_Type) {
        if (PyDict_GET_SIZE(obj) < MIN_SNAPSHOT)
            Py_RETURN_NONE;
        Py_ssize_t n = PyDict_GET_SIZE(obj) < span ? PyDict_GET_SIZE(obj) : span;
        PyObject *keys = PyList_New(n), *values = PyList_New(n), *key, *value;
        if (keys == NULL || values == NULL) {
            Py_XDECREF(keys);
            Py_XDECREF(values);
            return NULL;
        }
        Py_ssize_t pos = 0, i = 0;
        while (i < n && PyDict_Next(obj, &pos, &key, &value)) {
            PyList_SET_ITEM(keys, i, Py_NewRef(key));
            PyList_SET_ITEM(values, i, Py_NewRef(value));
            i++;
        }
        if (!all_atoms(((PyListObject *)keys)->ob_item, n)
                || !all_atoms(((PyListObject *)values)->ob_item, n)) {
            Py_DECREF(keys);
            Py_DECREF(values);
            Py_RETURN_NONE;
        }
        PyObject *snap = PyTuple_Pack(2, keys, values);
        Py_DECREF(keys);
        Py_DECREF(values);
        return snap;
    }
    if (Py_SIZE(obj) < MIN_SNAPSHOT)
        Py_RETURN_NONE;
    PyObject *prefix = kind == &PyList_Type ? PyList_GetSlice(obj, 0, span)
                                            : PyTuple_GetSlice(obj, 0, span);
    if (prefix == NULL)
        return NULL;
    PyObject **items = kind == &PyList_Type ? ((PyListObject *)prefix)->ob_item
                                            : ((PyTupleObject *)prefix)->ob_item;
    if (!all_atoms(items, Py_SIZE(prefix))) {
        Py_DECREF(prefix);
        Py_RETURN_NONE;
    }
    return prefix;
}

/* tracer._unchanged: the same container still starts with the very same items. */
static int
unchanged(PyObject *obj, PyTypeObject *kind, PyObject *snap, Py_ssize_t span)
{
    if (kind == &PyDict_Type) {
        PyObject *keys = PyTuple_GET_ITEM(snap, 0), *values = PyTuple_GET_ITEM(snap, 1);
        Py_ssize_t n = PyDict_GET_SIZE(obj) < span ? PyDict_GET_SIZE(obj) : span;
        if (n != PyList_GET_SIZE(keys))
            return 0;
        PyObject *key, *value;
        Py_ssize_t pos = 0, i = 0;
        while (i < n && PyDict_Next(obj, &pos, &key, &value)) {
            if (key != PyList_GET_ITEM(keys, i) || value != PyList_GET_ITEM(values, i))
                return 0;
            i++;
        }
        return 1;
    }
    Py_ssize_t n = Py_SIZE(obj) < span ? Py_SIZE(obj) : span;
    if (n != Py_SIZE(snap))
        return 0;
    PyObject **now = kind == &PyList_Type ? ((PyListObject *)obj)->ob_item
                                          : ((PyTupleObject *)obj)->ob_item;
    PyObject **then = kind == &PyList_Type ? ((PyListObject *)snap)->ob_item
                                           : ((PyTupleObject *)snap)->ob_item;
    for (Py_ssize_t i = 0; i < n; i++)
        if (now[i] != then[i])
            return 0;
    return 1;
}

/* ---- the recorder ------------------------------------------------------------------------- */

/* What a scope last showed of one local: the object, its text, and (for a list, tuple or dict
 * of immutable items) a snapshot of its leading items, or NULL. All strong references. */
typedef struct {
    PyObject *name, *obj, *text, *snap;
} Slot;

/* A traced frame. Its slots follow the order of the frame's locals at the last state frame, so
 * the next one finds each name's slot at the same index (a name that moved or is new is looked
 * up; names that are gone are dropped). */
typedef struct {
    PyFrameObject *frame;
    Slot *slots;
    Py_ssize_t nslots, capacity;
    int fresh;     /* write every value in full at the next line (a callee just returned) */
    int raised;    /* the last event was an exception */
} Scope;

typedef struct {
    PyObject *code;       /* a code object seen at a call event */
    PyObject *call_line;  /* its call frame's line text, or NULL when it is never traced */
} CodeInfo;

typedef struct {
    PyObject_HEAD
    PyObject *entry_code;
    PyObject *filename;      /* only code compiled under this file name is traced */
    PyObject *lines;         /* line texts, indexed by line number */
    PyObject *skipped;       /* code names that are never scopes (comprehensions, ...) */
    PyObject *rng_random;    /* random.Random(seed).random, or NULL when every callee is entered */
    double step_in;
    Py_ssize_t max_depth, cap, span, max_events, max_bytes;
    CodeInfo *codes;
    Py_ssize_t ncodes, codes_capacity;
    Scope *scopes;
    Py_ssize_t nscopes, scopes_capacity;
    Slot *scratch;           /* the next state frame's slots, swapped into its scope */
    Py_ssize_t scratch_capacity;
    PyObject *frames;        /* list of Frame */
    PyObject *pieces;        /* the trace text after the prompt, in fragments */
    Py_ssize_t size;         /* characters of text so far, prompt included */
    PyObject *truncated;     /* None, or the limit that stopped the trace */
    char done, stopped;
} Recorder;

static PyTypeObject RecorderType;

/* The call frame's line: the def line (a decorated function's code starts at its first
 * decorator), as tracer.def_line_number finds it. New reference. */
static PyObject *
def_line(PyObject *lines, PyCodeObject *code)
{
    Py_ssize_t count = PyList_GET_SIZE(lines), number = code->co_firstlineno;
    for (Py_ssize_t index = number; index < count && index < number + 50; index++) {
        PyObject *text = PyList_GET_ITEM(lines, index);
        if (!PyUnicode_Check(text))
            continue;
        Py_ssize_t n = PyUnicode_GET_LENGTH(text), i = 0;
        int kind = PyUnicode_KIND(text);
        const void *data = PyUnicode_DATA(text);
        while (i < n && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, i)))
            i++;
        if (PyUnicode_Tailmatch(text, Def, i, n, -1) || PyUnicode_Tailmatch(text, AsyncDef, i, n, -1)) {
            number = index;
            break;
        }
    }
    return Py_NewRef(number >= 0 && number < count ? PyList_GET_ITEM(lines, number) : Empty);
}

static PyObject *
code_call_line(Recorder *r, PyCodeObject *code)
{
    for (Py_ssize_t i = 0; i < r->ncodes; i++)
        if (r->codes[i].code == (PyObject *)code)
            return r->codes[i].call_line;
    PyObject *line = NULL;
    int traced = PyUnicode_Check(code->co_filename)
                 && PyUnicode_Compare(code->co_filename, r->filename) == 0;
    if (traced && (PyObject *)code != r->entry_code) {
        int skip = PySet_Contains(r->skipped, code->co_name);
        if (skip < 0)
            return NULL;
        traced = !skip;
    }
    if (traced)
        line = def_line(r->lines, code);
    if (reserve((void **)&r->codes, &r->codes_capacity, r->ncodes + 1, 8,
                sizeof(CodeInfo)) < 0) {
        Py_XDECREF(line);
        return NULL;
    }
    r->codes[r->ncodes].code = Py_NewRef((PyObject *)code);
    r->codes[r->ncodes].call_line = line;
    r->ncodes++;
    return line;
}

static PyObject *
line_text(Recorder *r, PyFrameObject *frame)
{
    int number = PyFrame_GetLineNumber(frame);
    if (number < 0 || number >= PyList_GET_SIZE(r->lines)) {
        PyErr_Format(PyExc_IndexError, "line %d is outside the traced source", number);
        return NULL;
    }
    return PyList_GET_ITEM(r->lines, number);
}

/* The frame's locals as a dict (a snapshot copy where the interpreter gives a proxy). */
static PyObject *
frame_locals(PyFrameObject *frame)
{
    PyObject *locals = PyFrame_GetLocals(frame);
    if (locals == NULL || PyDict_CheckExact(locals))
        return locals;
    PyObject *copy = PyDict_New();
    if (copy != NULL && PyDict_Update(copy, locals) < 0)
        Py_CLEAR(copy);
    Py_DECREF(locals);
    return copy;
}

/* ---- slots --------------------------------------------------------------------------------- */

static void
clear_slots(Slot *slots, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_CLEAR(slots[i].name);
        Py_CLEAR(slots[i].obj);
        Py_CLEAR(slots[i].text);
        Py_CLEAR(slots[i].snap);
    }
}

/* Room for n slots in the recorder's scratch array. */
static int
reserve_scratch(Recorder *r, Py_ssize_t n)
{
    return reserve((void **)&r->scratch, &r->scratch_capacity, n, 16, sizeof(Slot));
}

/* Make the n filled scratch slots the scope's slots (the old ones are released). */
static void
commit_slots(Recorder *r, Scope *s, Py_ssize_t n)
{
    clear_slots(s->slots, s->nslots);
    Slot *old = s->slots;
    Py_ssize_t old_capacity = s->capacity;
    s->slots = r->scratch;
    s->capacity = r->scratch_capacity;
    s->nslots = n;
    r->scratch = old;
    r->scratch_capacity = old_capacity;
}

/* The slot a scope holds for name: usually at the same index as before. */
static Slot *
find_slot(Scope *s, Py_ssize_t index, PyObject *name)
{
    if (index < s->nslots && s->slots[index].name == name)
        return &s->slots[index];
    for (Py_ssize_t i = 0; i < s->nslots; i++)
        if (s->slots[i].name == name)
            return &s->slots[i];
    for (Py_ssize_t i = 0; i < s->nslots; i++)   /* an equal name that is another object */
        if (PyUnicode_Check(name) && PyUnicode_Check(s->slots[i].name)
                && PyUnicode_Compare(s->slots[i].name, name) == 0)
            return &s->slots[i];
    return NULL;
}

/* ---- frame text: one writer per frame ---------------------------------------------------- */

typedef _PyUnicodeWriter Writer;

static void
writer_init(Writer *w)
{
    _PyUnicodeWriter_Init(w);
    w->overallocate = 1;
    w->min_length = 128;
}

#define WRITE(w, s) _PyUnicodeWriter_WriteStr((w), (s))
#define WRITE_ASCII(w, lit) _PyUnicodeWriter_WriteASCIIString((w), (lit), sizeof(lit) - 1)

/* text as a JSON string, exactly as encode_basestring_ascii (json.dumps' default, which CWM's
 * traces use) writes it: text with nothing to escape (printable ASCII but '"' and '\\') is
 * written between quotes directly. */
static int
write_json(Writer *w, PyObject *text)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c < 0x20 || c > 0x7e || c == '"' || c == '\\') {
            PyObject *encoded = PyObject_CallOneArg(EncodeString, text);
            if (encoded == NULL)
                return -1;
            int rc = WRITE(w, encoded);
            Py_DECREF(encoded);
            return rc;
        }
    }
    if (WRITE_ASCII(w, "\"") < 0 || WRITE(w, text) < 0)
        return -1;
    return WRITE_ASCII(w, "\"");
}

/* One local of a state frame: ', ' between locals, the name's JSON string and the value's, or
 * ".." when text is NULL (unchanged). An ASCII name is an identifier: nothing to escape. */
static int
write_local(Writer *w, PyObject *name, PyObject *text, int first)
{
    if (!PyUnicode_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "a local's name is not a str");
        return -1;
    }
    if (!first && WRITE_ASCII(w, ", ") < 0)
        return -1;
    if (PyUnicode_IS_ASCII(name)) {
        if (WRITE_ASCII(w, "\"") < 0 || WRITE(w, name) < 0 || WRITE_ASCII(w, "\": ") < 0)
            return -1;
    }
    else if (write_json(w, name) < 0 || WRITE_ASCII(w, ": ") < 0)
        return -1;
    return text == NULL ? WRITE_ASCII(w, "\"..\"") : write_json(w, text);
}

/* Append a Frame and its text; past a limit, drop both, record why and raise
 * TraceLimitExceeded into the program (returns -1). Steals piece. */
static int
add_frame(Recorder *r, PyObject *event, PyObject *values, PyObject *line, PyObject *value,
          PyObject *piece)
{
    if (piece == NULL)
        return -1;
    PyObject *frame = ((PyTypeObject *)FrameType)->tp_alloc((PyTypeObject *)FrameType, 4);
    if (frame == NULL) {
        Py_DECREF(piece);
        return -1;
    }
    PyTuple_SET_ITEM(frame, 0, Py_NewRef(event));
    PyTuple_SET_ITEM(frame, 1, Py_NewRef(values ? values : Py_None));
    PyTuple_SET_ITEM(frame, 2, Py_NewRef(line));
    PyTuple_SET_ITEM(frame, 3, Py_NewRef(value ? value : Py_None));
    int rc = PyList_Append(r->frames, frame);
    Py_DECREF(frame);
    if (rc == 0)
        rc = PyList_Append(r->pieces, piece);
    Py_ssize_t length = PyUnicode_GET_LENGTH(piece);
    Py_DECREF(piece);
    if (rc < 0)
        return -1;
    r->size += length;
    Py_ssize_t count = PyList_GET_SIZE(r->frames);
    if (count <= r->max_events && r->size <= r->max_bytes)
        return 0;
    PyObject *reason = count > r->max_events
        ? PyUnicode_FromFormat("max_events (%zd)", r->max_events)
        : PyUnicode_FromFormat("max_bytes (%zd)", r->max_bytes);
    if (reason == NULL)
        return -1;
    if (PyList_SetSlice(r->frames, count - 1, count, NULL) < 0
            || PyList_SetSlice(r->pieces, count - 1, count, NULL) < 0) {
        Py_DECREF(reason);
        return -1;
    }
    r->size -= length;
    Py_SETREF(r->truncated, reason);
    r->stopped = 1;
    PyErr_SetObject(LimitExceeded, reason);
    return -1;
}

/* The end of a state frame's text: '}', the action and the frame separator. */
static PyObject *
finish_state(Writer *w, PyObject *line)
{
    if (WRITE_ASCII(w, "}") < 0 || WRITE(w, ActionSep) < 0 || WRITE(w, line) < 0
            || WRITE(w, FrameSep) < 0) {
        _PyUnicodeWriter_Dealloc(w);
        return NULL;
    }
    return _PyUnicodeWriter_Finish(w);
}

/* A call or line frame. In full, every value written out (tracer._Recorder._full_frame: a
 * scope's first frame, and its first line after a callee returned); otherwise unchanged values
 * found by identity before any repr (the closure made by tracer._Recorder._tracers). */
static int
state_frame(Recorder *r, Scope *s, PyObject *token, PyObject *event, PyFrameObject *frame,
            PyObject *line, int full)
{
    PyObject *locals = frame_locals(frame);
    if (locals == NULL)
        return -1;
    Py_ssize_t n = 0, pos = 0, expected = PyDict_GET_SIZE(locals);
    PyObject *name, *obj, *values = NULL;
    Writer w;
    writer_init(&w);
    if (reserve_scratch(r, expected) < 0 || (values = _PyDict_NewPresized(expected)) == NULL
            || WRITE(&w, token) < 0 || WRITE_ASCII(&w, "{") < 0)
        goto error;
    while (PyDict_Next(locals, &pos, &name, &obj)) {
        PyTypeObject *kind = Py_TYPE(obj);
        Slot *prev = full ? NULL : find_slot(s, n, name);
        Slot *slot = &r->scratch[n++];
        slot->name = Py_NewRef(name);
        slot->obj = Py_NewRef(obj);
        slot->text = slot->snap = NULL;
        int changed = 1;
        if (prev != NULL && prev->obj == obj) {
            /* the same object: unchanged when immutable, or when a container still starts
             * with the very same immutable items; otherwise compare its text */
            slot->snap = Py_XNewRef(prev->snap);
            if (is_immutable(kind) || (prev->snap != NULL && prev->snap != Py_None
                                       && unchanged(obj, kind, prev->snap, r->span)))
                changed = 0;
            else {
                if ((slot->text = capped_repr(obj, r->cap)) == NULL)
                    goto error;
                if (is_container(kind)) {
                    Py_XSETREF(slot->snap, snapshot(obj, kind, r->span));
                    if (slot->snap == NULL)
                        goto error;
                }
            }
        }
        else {
            if ((slot->text = value_text(obj, r->cap)) == NULL)
                goto error;
            /* a snapshot belongs to the object it was taken of */
            if (is_container(kind) && (slot->snap = snapshot(obj, kind, r->span)) == NULL)
                goto error;
        }
        if (changed && prev != NULL) {
            int same = PyObject_RichCompareBool(slot->text, prev->text, Py_EQ);
            if (same < 0)
                goto error;
            changed = !same;
        }
        if (!changed)
            Py_XSETREF(slot->text, Py_NewRef(prev->text));
        if (PyDict_SetItem(values, name, changed ? slot->text : Unchanged) < 0
                || write_local(&w, name, changed ? slot->text : NULL, n == 1) < 0)
            goto error;
        if (PyDict_GET_SIZE(locals) != expected) {
            PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during iteration");
            goto error;
        }
    }
    commit_slots(r, s, n);   /* names deleted since the last frame are dropped here */
    int rc = add_frame(r, event, values, line, NULL, finish_state(&w, line));
    Py_DECREF(values);
    Py_DECREF(locals);
    return rc;
error:
    clear_slots(r->scratch, n);
    _PyUnicodeWriter_Dealloc(&w);
    Py_XDECREF(values);
    Py_DECREF(locals);
    return -1;
}

/* A return or exception frame (tracer._Recorder._value_frame); steals value. */
static int
value_frame(Recorder *r, PyObject *token, PyObject *event, PyObject *line, PyObject *value)
{
    if (value == NULL)
        return -1;
    Writer w;
    writer_init(&w);
    PyObject *piece = NULL;
    if (WRITE(&w, token) == 0 && WRITE(&w, ActionSep) == 0 && WRITE(&w, line) == 0
            && WRITE(&w, ArgSep) == 0 && write_json(&w, value) == 0 && WRITE(&w, FrameSep) == 0)
        piece = _PyUnicodeWriter_Finish(&w);
    else
        _PyUnicodeWriter_Dealloc(&w);
    int rc = add_frame(r, event, NULL, line, value, piece);
    Py_DECREF(value);
    return rc;
}

static int
push_scope(Recorder *r, PyFrameObject *frame)
{
    if (reserve((void **)&r->scopes, &r->scopes_capacity, r->nscopes + 1, 8, sizeof(Scope)) < 0)
        return -1;
    Scope *s = &r->scopes[r->nscopes++];
    s->frame = (PyFrameObject *)Py_NewRef(frame);
    s->slots = NULL;
    s->nslots = s->capacity = 0;
    s->fresh = s->raised = 0;
    return 0;
}

static void
pop_scope(Recorder *r)
{
    Scope *s = &r->scopes[--r->nscopes];
    Py_CLEAR(s->frame);
    clear_slots(s->slots, s->nslots);
    PyMem_Free(s->slots);
    s->slots = NULL;
    s->nslots = s->capacity = 0;
}

/* A new frame: step into it when it is traced source called by the innermost scope. */
static int
on_call(Recorder *r, PyFrameObject *frame)
{
    PyCodeObject *code = PyFrame_GetCode(frame);
    PyObject *call_line = code_call_line(r, code);
    Py_DECREF(code);
    if (call_line == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (r->nscopes == 0) {
        if ((PyObject *)code != r->entry_code)
            return 0;
    }
    else {
        PyFrameObject *back = PyFrame_GetBack(frame);
        int other = back != r->scopes[r->nscopes - 1].frame;
        Py_XDECREF(back);
        if (other || r->nscopes > r->max_depth)
            return 0;
        if (r->rng_random != NULL) {
            PyObject *draw = PyObject_CallNoArgs(r->rng_random);
            if (draw == NULL)
                return -1;
            double x = PyFloat_AsDouble(draw);
            Py_DECREF(draw);
            if (x == -1.0 && PyErr_Occurred())
                return -1;
            if (x >= r->step_in)
                return 0;
        }
    }
    Py_INCREF(call_line);   /* the code cache owns it; a frame's fields must outlive errors */
    int rc = push_scope(r, frame);
    if (rc == 0)
        rc = state_frame(r, &r->scopes[r->nscopes - 1], CallSep, EvCall, frame, call_line, 1);
    Py_DECREF(call_line);
    return rc;
}

static int
on_return(Recorder *r, Scope *s, PyFrameObject *frame, PyObject *arg)
{
    /* After an exception propagates, Python still reports "return None": recorded, as CWM's
     * debugger expects every scope to end with a return frame (trace_format). */
    PyObject *line = line_text(r, frame);
    if (line == NULL)
        return -1;
    PyObject *value = r->nscopes == 1 ? PyObject_Repr(arg) : capped_repr(arg, r->cap);
    if (value_frame(r, ReturnSep, EvReturn, line, value) < 0)
        return -1;
    pop_scope(r);
    if (r->nscopes)
        r->scopes[r->nscopes - 1].fresh = 1;
    else
        r->done = r->stopped = 1;
    return 0;
}

static PyObject *
exception_repr(PyObject *exc, Py_ssize_t cap)
{
    PyObject *text = PyObject_Repr(exc);
    if (text == NULL) {
        PyErr_Clear();
        PyObject *name = PyType_GetName(Py_TYPE(exc));
        if (name == NULL)
            return NULL;
        text = PyUnicode_FromFormat("%U(<repr failed>)", name);
        Py_DECREF(name);
        if (text == NULL)
            return NULL;
    }
    return cap >= 0 ? truncated(text, cap) : text;
}

static int
on_exception(Recorder *r, Scope *s, PyFrameObject *frame, PyObject *arg)
{
    PyObject *exc = PyTuple_Check(arg) && PyTuple_GET_SIZE(arg) > 1 ? PyTuple_GET_ITEM(arg, 1)
                                                                    : Py_None;
    if (PyObject_TypeCheck(exc, (PyTypeObject *)LimitExceeded))
        return 0;
    PyObject *line = line_text(r, frame);
    if (line == NULL)
        return -1;
    if (value_frame(r, ExceptionSep, EvException, line,
                    exception_repr(exc, r->nscopes == 1 ? -1 : r->cap)) < 0)
        return -1;
    s->raised = 1;
    return 0;
}

static int
on_line(Recorder *r, Scope *s, PyFrameObject *frame)
{
    s->raised = 0;
    PyObject *line = line_text(r, frame);
    if (line == NULL)
        return -1;
    int full = s->fresh;
    s->fresh = 0;
    return state_frame(r, s, LineSep, EvLine, frame, line, full);
}

static int
tracefunc(PyObject *self, PyFrameObject *frame, int what, PyObject *arg)
{
    Recorder *r = (Recorder *)self;
    if (r->stopped)
        return 0;
    int rc = 0;
    if (what == PyTrace_CALL)
        rc = on_call(r, frame);
    else if (r->nscopes && r->scopes[r->nscopes - 1].frame == frame) {
        Scope *s = &r->scopes[r->nscopes - 1];
        if (what == PyTrace_LINE)
            rc = on_line(r, s, frame);
        else if (what == PyTrace_RETURN)
            rc = on_return(r, s, frame, arg != NULL ? arg : Py_None);
        else if (what == PyTrace_EXCEPTION)
            rc = on_exception(r, s, frame, arg);
    }
    if (rc < 0)
        r->stopped = 1;   /* a Python tracer that raised is switched off: record nothing more */
    return rc;
}

/* ---- the Python type ---------------------------------------------------------------------- */

static int
Recorder_init(Recorder *r, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"entry_code", "filename", "lines", "skipped", "rng_random",
                            "step_in", "max_depth", "cap", "max_events", "max_bytes", NULL};
    PyObject *entry_code, *filename, *lines, *skipped, *rng_random;
    double step_in;
    Py_ssize_t max_depth, cap, max_events, max_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!UO!O!Odnnnn", names, &PyCode_Type,
                                     &entry_code, &filename, &PyList_Type, &lines,
                                     &PyFrozenSet_Type, &skipped, &rng_random,
                                     &step_in, &max_depth, &cap, &max_events, &max_bytes))
        return -1;
    if (FrameType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cwm_exec._ctracer.configure() was not called");
        return -1;
    }
    if (r->frames != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Recorder is initialised once");
        return -1;
    }
    r->entry_code = Py_NewRef(entry_code);
    r->filename = Py_NewRef(filename);
    r->lines = Py_NewRef(lines);
    r->skipped = Py_NewRef(skipped);
    r->rng_random = rng_random == Py_None ? NULL : Py_NewRef(rng_random);
    r->step_in = step_in;
    r->max_depth = max_depth;
    r->cap = cap;
    r->span = cap / 3 + 3;   /* tracer._span */
    r->max_events = max_events;
    r->max_bytes = max_bytes;
    r->frames = PyList_New(0);
    r->pieces = PyList_New(0);
    r->truncated = Py_NewRef(Py_None);
    return r->frames && r->pieces ? 0 : -1;
}

static int
Recorder_traverse(Recorder *r, visitproc visit, void *arg)
{
    Py_VISIT(r->entry_code);
    Py_VISIT(r->lines);
    Py_VISIT(r->rng_random);
    Py_VISIT(r->frames);
    for (Py_ssize_t i = 0; i < r->ncodes; i++) {
        Py_VISIT(r->codes[i].code);
        Py_VISIT(r->codes[i].call_line);
    }
    for (Py_ssize_t i = 0; i < r->nscopes; i++) {
        Py_VISIT(r->scopes[i].frame);
        for (Py_ssize_t j = 0; j < r->scopes[i].nslots; j++)
            Py_VISIT(r->scopes[i].slots[j].obj);
    }
    return 0;
}

static int
Recorder_clear(Recorder *r)
{
    while (r->nscopes)
        pop_scope(r);
    for (Py_ssize_t i = 0; i < r->ncodes; i++) {
        Py_CLEAR(r->codes[i].code);
        Py_CLEAR(r->codes[i].call_line);
    }
    r->ncodes = 0;
    Py_CLEAR(r->entry_code);
    Py_CLEAR(r->filename);
    Py_CLEAR(r->lines);
    Py_CLEAR(r->skipped);
    Py_CLEAR(r->rng_random);
    Py_CLEAR(r->frames);
    Py_CLEAR(r->pieces);
    Py_CLEAR(r->truncated);
    return 0;
}

static void
Recorder_dealloc(Recorder *r)
{
    PyObject_GC_UnTrack(r);
    Recorder_clear(r);
    PyMem_Free(r->codes);
    PyMem_Free(r->scopes);
    PyMem_Free(r->scratch);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *
Recorder_start(Recorder *r, PyObject *Py_UNUSED(ignored))
{
    if (r->frames == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Recorder not initialised");
        return NULL;
    }
    /* Audited as sys.settrace; unlike PyEval_SetTrace, a refusal is raised, not printed. */
    if (_PyEval_SetTrace(PyThreadState_Get(), tracefunc, (PyObject *)r) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef Recorder_methods[] = {
    {"start", (PyCFunction)Recorder_start, METH_NOARGS,
     "Trace this thread from now on (sys.settrace(None) stops)."},
    {NULL}
};

static PyMemberDef Recorder_members[] = {
    {"frames", T_OBJECT, offsetof(Recorder, frames), READONLY, "the recorded Frames"},
    {"pieces", T_OBJECT, offsetof(Recorder, pieces), READONLY,
     "the trace text after the prompt, in fragments (join them)"},
    {"size", T_PYSSIZET, offsetof(Recorder, size), 0,
     "characters of trace text so far; set it to the prompt's length before starting"},
    {"truncated", T_OBJECT, offsetof(Recorder, truncated), 0,
     "None, or why the trace stopped early (a limit)"},
    {"done", T_BOOL, offsetof(Recorder, done), READONLY,
     "execution left the entry scope"},
    {"stopped", T_BOOL, offsetof(Recorder, stopped), READONLY,
     "nothing more is recorded (done, truncated, or an error in the recorder)"},
    {NULL}
};

static PyTypeObject RecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cwm_exec._ctracer.Recorder",
    .tp_doc = "Records one traced call as CWM frames (see cwm_exec.tracer.trace_call).",
    .tp_basicsize = sizeof(Recorder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Recorder_init,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_traverse = (traverseproc)Recorder_traverse,
    .tp_clear = (inquiry)Recorder_clear,
    .tp_methods = Recorder_methods,
    .tp_members = Recorder_members,
};

/* ---- module ------------------------------------------------------------------------------- */

static PyObject *
configure(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"frame_type", "limit_exceeded", "encode_string", "unchanged",
                            "truncation_marker", "tokens", NULL};
    PyObject *frame_type, *limit_exceeded, *encode, *unchanged_text, *marker;
    PyObject *call, *line, *ret, *exc, *action, *arg, *sep;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!OUU(UUUUUUU)", names, &PyType_Type,
                                     &frame_type, &PyType_Type, &limit_exceeded, &encode,
                                     &unchanged_text, &marker, &call, &line, &ret, &exc,
                                     &action, &arg, &sep))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)frame_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "frame_type must be a tuple subclass");
        return NULL;
    }
    PyObject **globals[] = {&FrameType, &LimitExceeded, &EncodeString, &Unchanged,
                            &TruncationMarker, &CallSep, &LineSep, &ReturnSep, &ExceptionSep,
                            &ActionSep, &ArgSep, &FrameSep};
    PyObject *values[] = {frame_type, limit_exceeded, encode, unchanged_text, marker, call, line,
                          ret, exc, action, arg, sep};
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++)
        Py_XSETREF(*globals[i], Py_NewRef(values[i]));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "Set the trace format's constants (called once by cwm_exec.tracer)."},
    {NULL}
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "cwm_exec._ctracer",
    "C recorder for cwm_exec.tracer (same output as its Python _FunctionRecorder).", -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__ctracer(void)
{
    if (PyType_Ready(&RecorderType) < 0)
        return NULL;
    EvCall = PyUnicode_InternFromString("call");
    EvLine = PyUnicode_InternFromString("line");
    EvReturn = PyUnicode_InternFromString("return");
    EvException = PyUnicode_InternFromString("exception");
    Def = PyUnicode_InternFromString("def ");
    AsyncDef = PyUnicode_InternFromString("async def ");
    Empty = PyUnicode_InternFromString("");
    if (!EvCall || !EvLine || !EvReturn || !EvException || !Def || !AsyncDef || !Empty)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Recorder", (PyObject *)&RecorderType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
