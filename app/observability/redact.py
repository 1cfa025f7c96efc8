"""Value-based redaction: once a secret value is registered, no log line shows it in any common form.

Lessons taken from Airflow's SecretsMasker (see docs/observability.md):

* match *values*, not key names: a value is masked wherever it appears, whatever it is called;
* values shorter than ``MIN_LENGTH`` are ignored, so an empty or tiny value can never mask
  every character of every line (apache/airflow#16007);
* a value is also matched in the encodings it is likely to be logged in: URL-quoted
  (``quote`` and ``quote_plus``), JSON- and ``repr``-escaped, hex, and base64 (standard and
  URL-safe, at the three byte alignments, matched inside a longer base64 run as in
  tests/support/leaks.py: the characters that depend only on the value, less the last two; the
  neighbouring characters that carry some of the value's bits are masked with it);
* the registry is bounded, by count and by size (least recently registered values are
  forgotten first), and thread-safe; reads take no lock.

Values live in a :class:`Registry`. The module keeps one process-wide instance for log
handlers: a worker registers each value it resolves (``register(value)``); handlers get
:class:`RedactingFilter` (``app.observability.logs`` installs it). The web tier registers nothing
process-wide: a web request runs in a scope (``push_scope`` / ``pop_scope``) whose own registry
(``register_scoped``) the filter also consults, and which is dropped at teardown. An agent run
masks what its user reads back with a registry of its own (the values resolved in that run).
"""

from __future__ import annotations

import base64
import json
import logging
import string
import threading
import urllib.parse
from collections import OrderedDict
from contextvars import ContextVar, Token
from typing import Final

MIN_LENGTH: Final = 8
MAX_VALUES: Final = 10_000
# And at most this many characters of forms in all (a value can be up to 64 KiB, and has ~14 forms).
MAX_CHARS: Final = 64 * 1024 * 1024
MASK: Final = "***"

# Index: every form is at least _SHORTEST characters long. Any _STRIDE consecutive positions
# of an occurrence include exactly one multiple of _STRIDE, so each form is indexed by its
# _STRIDE consecutive _GRAM-character grams (with their offsets) and redact() probes only
# every _STRIDE-th position of the text (_GRAM + _STRIDE - 1 <= _SHORTEST).
_SHORTEST: Final = 8
_GRAM: Final = 5
_STRIDE: Final = 4
_B64_CHARS: Final = frozenset(string.ascii_letters + string.digits + "+/-_")
_MARK: Final = "_latchkey_redacted"
# A form's window is moved off the middle when the middle's buckets hold more entries than this,
# to the least crowded of at most _WINDOWS windows.
_CROWDED: Final = 8
_WINDOWS: Final = 32
assert MIN_LENGTH >= _SHORTEST, "shorter values would have forms the index cannot find"

# (text, lead, tail): how many base64 characters just before / after a match carry bits of the value.
_Form = tuple[str, int, int]
# (text, offset of the gram in it, lead, tail)
_Entry = tuple[str, int, int, int]


def _forms(value: str) -> dict[str, tuple[int, int]]:
    """Every form of ``value`` to look for: text -> (lead, tail)."""
    out: dict[str, tuple[int, int]] = {}

    def add(text: str, lead: int = 0, tail: int = 0) -> None:
        if len(text) < _SHORTEST:
            return
        old_lead, old_tail = out.get(text, (0, 0))
        out[text] = (max(lead, old_lead), max(tail, old_tail))

    add(value)
    add(urllib.parse.quote(value, safe=""))
    add(urllib.parse.quote(value))
    add(urllib.parse.quote_plus(value))
    add(json.dumps(value)[1:-1])
    add(json.dumps(value, ensure_ascii=False)[1:-1])
    add(repr(value)[1:-1])
    raw = value.encode("utf-8", "surrogatepass")
    add(raw.hex())
    add(raw.hex().upper())
    for pad in range(3):
        # Characters before `first` depend on the bytes before the value (the one just before
        # it partly on the value); the last two may depend on the bytes after it.
        first = -(-8 * pad // 6)
        lead = 1 if pad else 0
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = enc(b"\0" * pad + raw).decode().rstrip("=")
            add(encoded[first:-2], lead=lead, tail=2)
    if "\n" in value or "\r" in value:
        # A multi-line value (a PEM key) may be logged one line at a time.
        for line in value.splitlines():
            line = line.strip()
            if len(line) >= MIN_LENGTH:
                add(line)
    return out


def _grams(text: str, base: int) -> list[tuple[str, int]]:
    """The ``_STRIDE`` grams of ``text`` that start at ``base`` .. ``base + _STRIDE - 1``, with their offsets."""
    return [(text[o : o + _GRAM], o) for o in range(base, base + _STRIDE)]


def _middle(text: str) -> int:
    # Keys often share a prefix ("sk-proj-", "github_pat_"): the middle is the first window tried.
    return (len(text) - (_GRAM + _STRIDE - 1)) // 2


class Registry:
    """A bounded, thread-safe set of values to mask, with an index that makes :meth:`redact` cheap.

    The module keeps one process-wide instance (:data:`PROCESS`) for log handlers; a scope
    (:func:`push_scope`, a web request) or an agent run holds its own, dropped with it.
    ``max_values`` / ``max_chars`` default to the module's ``MAX_VALUES`` / ``MAX_CHARS``.

    Each form is indexed under the grams of one window of ``_STRIDE`` consecutive offsets (any
    window finds every occurrence). The middle one is used unless its buckets are crowded, as
    they are for values that differ only in a few characters (a counter, a date, a suffix): then
    the least crowded of up to ``_WINDOWS`` windows is taken, the first and the last among them.
    So a bucket holds few forms, and registering costs about the same whatever was registered
    before (it grew with every similar value before: a worker resolving thousands of edits of
    one secret spent most of its time here; bench/README.md, ``bench.many_workers``).
    """

    __slots__ = ("_chars", "_index", "_lock", "_max_chars", "_max_values", "_refs", "_values")

    def __init__(self, *, max_values: int | None = None, max_chars: int | None = None) -> None:
        self._lock = threading.Lock()
        self._max_values = max_values
        self._max_chars = max_chars
        # value -> its forms; insertion order is recency (the first entry is evicted first).
        self._values: OrderedDict[str, tuple[_Form, ...]] = OrderedDict()
        self._chars = 0  # total length of the forms in _values
        # form text -> [reference count, lead, tail, window] (two values can share a form).
        self._refs: dict[str, list[int]] = {}
        # gram -> entries. Read without the lock: a bucket is an immutable tuple, replaced (never
        # mutated) under the lock, and a dict lookup is atomic.
        self._index: dict[str, tuple[_Entry, ...]] = {}

    def _window(self, text: str) -> int:
        """Where the grams of a new form start: the middle, or the least crowded window (see the class doc)."""
        index = self._index
        best = _middle(text)
        best_load = sum([len(index.get(text[o : o + _GRAM], ())) for o in range(best, best + _STRIDE)])
        if best_load <= _CROWDED:
            return best
        last = len(text) - (_GRAM + _STRIDE - 1)
        if last < _WINDOWS:
            # Every window, from each gram's bucket size looked up once and a running sum.
            sizes = [len(index.get(text[o : o + _GRAM], ())) for o in range(last + _STRIDE)]
            load = sum(sizes[:_STRIDE])
            for base in range(last + 1):
                if base:
                    load += sizes[base + _STRIDE - 1] - sizes[base - 1]
                if load < best_load:
                    best, best_load = base, load
            return best
        step = -(-last // (_WINDOWS - 1))
        for base in (*range(0, last, step), last):
            load = sum([len(index.get(text[o : o + _GRAM], ())) for o in range(base, base + _STRIDE)])
            if load < best_load:
                best, best_load = base, load
        return best

    def _index_form(self, text: str, base: int, lead: int, tail: int) -> None:
        index = self._index
        for gram, offset in _grams(text, base):
            index[gram] = (*index.get(gram, ()), (text, offset, lead, tail))

    def _unindex_form(self, text: str, base: int) -> None:
        index = self._index
        for gram in {g for g, _o in _grams(text, base)}:
            kept = tuple(entry for entry in index.get(gram, ()) if entry[0] != text)
            if kept:
                index[gram] = kept
            else:
                index.pop(gram, None)

    def _add_form(self, text: str, lead: int, tail: int) -> None:
        ref = self._refs.get(text)
        if ref is None:
            base = self._window(text)
            self._refs[text] = [1, lead, tail, base]
            self._index_form(text, base, lead, tail)
            return
        ref[0] += 1
        if lead <= ref[1] and tail <= ref[2]:
            return
        # A second value with this form needs more of its neighbours masked.
        ref[1], ref[2] = max(ref[1], lead), max(ref[2], tail)
        self._unindex_form(text, ref[3])
        self._index_form(text, ref[3], ref[1], ref[2])

    def _remove_form(self, text: str) -> None:
        ref = self._refs[text]
        ref[0] -= 1
        if ref[0] > 0:
            return
        del self._refs[text]
        self._unindex_form(text, ref[3])

    def register(self, value: str) -> None:
        """Mask ``value`` (and its encodings) from now on; see the module function :func:`register`."""
        if not isinstance(value, str) or len(value) < MIN_LENGTH or not value.strip():
            return
        with self._lock:
            if value in self._values:
                self._values.move_to_end(value)
                return
        forms = tuple((text, lead, tail) for text, (lead, tail) in _forms(value).items())
        max_values = self._max_values or MAX_VALUES
        max_chars = self._max_chars or MAX_CHARS
        with self._lock:
            if value in self._values:
                self._values.move_to_end(value)
                return
            self._values[value] = forms
            self._chars += sum(len(text) for text, _lead, _tail in forms)
            for text, lead, tail in forms:
                self._add_form(text, lead, tail)
            while len(self._values) > max_values or (self._chars > max_chars and len(self._values) > 1):
                _old, old_forms = self._values.popitem(last=False)
                self._chars -= sum(len(text) for text, _lead, _tail in old_forms)
                for text, _lead, _tail in old_forms:
                    self._remove_form(text)

    def clear(self) -> None:
        """Forget every registered value."""
        with self._lock:
            self._chars = 0
            self._values.clear()
            self._refs.clear()
            self._index.clear()

    def size(self) -> int:
        """How many values are registered."""
        return len(self._values)

    def active(self) -> bool:
        """Whether anything is registered (when not, :meth:`redact` returns its input unchanged)."""
        return bool(self._index)

    def redact(self, text: str) -> str:
        """``text`` with every value of this registry, in every form, replaced by ``***``."""
        index = self._index
        if not index or not isinstance(text, str) or len(text) < _SHORTEST:
            return text
        n = len(text)
        hits = [j for j in range(0, n - _GRAM + 1, _STRIDE) if text[j : j + _GRAM] in index]
        if not hits:
            return text
        spans: list[tuple[int, int]] = []
        for j in hits:
            for form, offset, lead, tail in index.get(text[j : j + _GRAM], ()):
                start = j - offset
                if start >= 0 and text.startswith(form, start):
                    end = start + len(form)
                    while lead and start > 0 and text[start - 1] in _B64_CHARS:
                        start, lead = start - 1, lead - 1
                    while tail and end < n and text[end] in _B64_CHARS:
                        end, tail = end + 1, tail - 1
                    spans.append((start, end))
        if not spans:
            return text
        # Overlapping or touching matches become one mask.
        spans.sort()
        out: list[str] = []
        pos = 0
        cur_start, cur_end = spans[0]
        for start, end in spans[1:]:
            if start <= cur_end:
                cur_end = max(cur_end, end)
                continue
            out += (text[pos:cur_start], MASK)
            pos, cur_start, cur_end = cur_end, start, end
        out += (text[pos:cur_start], MASK, text[cur_end:])
        return "".join(out)


# The process-wide registry: what this process's log handlers mask. Workers register every
# value they resolve here. The web tier registers nothing here (it would keep every value
# ever submitted for the life of the process): it uses a scope, below.
PROCESS: Final = Registry()

# The registry of the current scope (a web request), consulted by the log filter with PROCESS.
_scope: ContextVar[Registry | None] = ContextVar("latchkey_redact_scope", default=None)


def register(value: str) -> None:
    """Mask ``value`` (and its encodings) in every redacted log line of this process from now on.

    Values shorter than ``MIN_LENGTH`` characters, or only whitespace, are ignored. At most
    ``MAX_VALUES`` values (and ``MAX_CHARS`` characters of their forms) are kept, the most
    recently registered; registering a known value again marks it recently used.
    """
    PROCESS.register(value)


def push_scope() -> Token[Registry | None]:
    """Start a scope with an empty registry of its own (a web request); returns the token for :func:`pop_scope`."""
    return _scope.set(Registry())


def pop_scope(token: Token[Registry | None]) -> None:
    """End the scope: its registry, and every value in it, is dropped."""
    scope = _scope.get()
    try:
        _scope.reset(token)
    except ValueError:  # the token belongs to another context: end whatever scope this one has
        _scope.set(None)
    if scope is not None:
        scope.clear()


def register_scoped(value: str) -> None:
    """Mask ``value`` in log lines of the current scope only (nothing happens outside a scope).

    The web tier uses this for submitted values: masked while the request runs, forgotten at
    its teardown, never added to the process-wide registry.
    """
    scope = _scope.get()
    if scope is not None:
        scope.register(value)


def clear() -> None:
    """Forget every value registered process-wide (tests)."""
    PROCESS.clear()


def size() -> int:
    """How many values are registered process-wide."""
    return PROCESS.size()


def active() -> bool:
    """Whether anything is registered, process-wide or in the current scope."""
    scope = _scope.get()
    return PROCESS.active() or (scope is not None and scope.active())


def redact(text: str) -> str:
    """``text`` with every value registered process-wide or in the current scope replaced by ``***``."""
    text = PROCESS.redact(text)
    scope = _scope.get()
    return scope.redact(text) if scope is not None else text


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
STANDARD_RECORD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_exc_formatter = logging.Formatter()


def format_message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, or a fallback when the arguments do not fit the message.

    logging's own error path would print the raw arguments to stderr, unredacted.
    """
    try:
        return record.getMessage()
    except Exception:
        try:
            return f"{record.msg!s} (log arguments did not match the message: {record.args!r})"
        except Exception:
            return "(unformattable log record)"


def redact_record(record: logging.LogRecord) -> None:
    """Rewrite ``record`` in place: message, arguments, exception and stack text, string extras."""
    if not active() or getattr(record, _MARK, False):
        return
    record.msg = redact(format_message(record))
    record.args = ()
    if "message" in record.__dict__:
        # Set by a formatter that ran before this filter (a handler without it).
        record.message = record.msg
    if record.exc_info:
        if not record.exc_text and isinstance(record.exc_info, tuple) and record.exc_info[0] is not None:
            record.exc_text = _exc_formatter.formatException(record.exc_info)
        # Formatters print exc_text when exc_info is unset; the live traceback (and its frames) goes.
        record.exc_info = None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    for key, value in list(record.__dict__.items()):
        if key not in STANDARD_RECORD_ATTRS and isinstance(value, str):
            setattr(record, key, redact(value))
    setattr(record, _MARK, True)


def is_redacted(record: logging.LogRecord) -> bool:
    return bool(getattr(record, _MARK, False))


class RedactingFilter(logging.Filter):
    """A handler filter that masks registered values in everything the handler will print."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True
