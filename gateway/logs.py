"""Logging set-up: JSON lines (python-json-logger) or plain text, never a secret.

aiohttp's own access log is off (it would print query strings, which can carry a code);
``gateway.access`` writes one line per request with the path only.

Every record is one line whatever a client sent: control characters and every other
non-printable character (``str.isprintable``: C0/C1 controls, DEL, line and paragraph
separators, zero-width and bidi format characters) in the message, in every extra field and in
exception text are written as ``\\n``, ``\\t``, ``\\xNN`` or ``\\uNNNN``, and a backslash as
``\\\\``, in both formats. A traceback's own lines are escaped one by one: indented under the
record in text, a list of strings in JSON. Timestamps are ISO-8601 in UTC.

``WarnLimiter`` is the rate-limited warning (one line per cause per interval, with a count
of what it held back, and a line when the cause has gone away).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import IO, Any

import aiohttp
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

LogRecordMaker = Callable[[], logging.LogRecord]
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def escape(text: str, backslash: bool = True) -> str:
    """``text`` with every non-printable character (and the backslash, unless told not to)
    written as an escape."""
    if text.isprintable() and (not backslash or "\\" not in text):
        return text
    out = []
    for ch in text:
        if ch == "\\" and not backslash:
            out.append(ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            n = ord(ch)
            out.append(
                f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"
            )
    return "".join(out)


def _clean(value: Any) -> Any:
    """A field value with every string in it escaped (numbers, booleans and None kept)."""
    kind = type(value)
    if kind is str:  # the usual field: a printable string without a backslash stays as it is
        return value if value.isprintable() and "\\" not in value else escape(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {escape(str(k)): _clean(v) for k, v in value.items()}
    return escape(str(value))


def _iso_time(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@functools.lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def iso_time(created: float) -> str:
    """``2026-11-28T21:40:00.123Z``.

    The date and time of day are formatted once per second and kept; only the milliseconds
    are added per call. The rounding is ``datetime.fromtimestamp``'s (to the microsecond,
    half to even), so the text is the same as ``datetime``'s own.
    """
    if not 0 <= created < 253402300799:  # before 1970 or after 9999: datetime's own way
        return _iso_time(created)
    fraction, whole = math.modf(created)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second += 1
        micros -= 1_000_000
    return f"{_second_text(second)}.{micros // 1000:03d}Z"


def format_exception(exc: BaseException | None) -> list[str]:
    """A traceback as lines, each escaped: the messages of the exception and of every
    exception chained to it are escaped before they are laid out, so a newline in a
    message can never start a line of its own."""
    if exc is None:
        return []
    te = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    todo = [te]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(getattr(item, "_str", None), str):
            item._str = escape(item._str)  # type: ignore[attr-defined]
        notes = getattr(item, "__notes__", None)
        if isinstance(notes, list):
            item.__notes__ = [escape(str(n)) for n in notes]
        todo.extend(x for x in (item.__cause__, item.__context__) if x is not None)
        todo.extend(getattr(item, "exceptions", None) or ())
    # The messages are escaped already; what is left to escape is the layout's own text.
    return [
        escape(line, backslash=False)
        for chunk in te.format()
        for line in chunk.rstrip("\n").split("\n")
    ]


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a record got through ``extra=``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE key=value ...`` on one line; a traceback follows, each of
    its lines escaped and indented by four spaces (so no line of it can pass for a record)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"{iso_time(record.created)} {record.levelname} {escape(record.name)}: "
            f"{escape(record.getMessage())}"
        ]
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                parts.append(f"{escape(key)}={_logfmt(value)}")
        line = " ".join(parts)
        tail = format_exception(record.exc_info[1]) if record.exc_info else []
        if record.stack_info:
            tail += [escape(x) for x in self.formatStack(record.stack_info).split("\n")]
        for extra_line in tail:
            line += "\n    " + extra_line
        return line


def _logfmt(value: Any) -> str:
    kind = type(value)
    if kind is int or kind is float:  # digits, sign, ".", "e", "inf", "nan": nothing to escape
        return repr(value)
    text = escape(value if kind is str else str(value))
    if not text or " " in text or '"' in text or "=" in text:
        return '"' + text.replace('"', '\\"') + '"'
    return text


# What python-json-logger leaves out of a line: the record's own attributes and the fields
# of the format (which come first, renamed).
_JSON_SKIP = frozenset(RESERVED_ATTRS) | {"asctime", "levelname", "name", "message"}


def json_line(
    created: float, level: str, logger: str, message: str, fields: Iterable[tuple[str, Any]]
) -> str:
    """The JSON line of a record without exception or stack (``EscapingJsonFormatter``):
    time, level, logger and message first, then ``fields`` in order, every string escaped."""
    data: dict[str, Any] = {
        "time": iso_time(created),
        "level": _clean(level),
        "logger": _clean(logger),
        "message": _clean(message),
    }
    for key, value in fields:
        if type(value) is not str or not value.isprintable() or "\\" in value:
            value = _clean(value)
        data[key if key.isprintable() and "\\" not in key else escape(key)] = value
    return json.dumps(data)


def json_stream_handler(logger: logging.Logger) -> logging.StreamHandler[Any] | None:
    """The handler an INFO record of ``logger`` reaches, when that is all that happens to it:
    one plain ``StreamHandler`` with the ``EscapingJsonFormatter``, no filter on the way, no
    other handler. None otherwise (a test's capture, a filter, the text format...): the
    record must then take the ``logging`` way."""
    if logger.filters or logger.disabled:
        return None
    found: list[logging.Handler] = []
    node: logging.Logger | None = logger
    while node is not None:
        found += node.handlers
        if not node.propagate:
            break
        node = node.parent
    if len(found) != 1:
        return None
    handler = found[0]
    if (
        type(handler) is not logging.StreamHandler
        or handler.filters
        or handler.level > logging.INFO
        or type(handler.formatter) is not EscapingJsonFormatter
    ):
        return None
    return handler


def write_line(handler: logging.StreamHandler[Any], line: str, record: LogRecordMaker) -> None:
    """What ``Handler.handle`` and ``StreamHandler.emit`` do with a formatted record: the
    line and the terminator written and flushed under the handler's lock; a failure goes to
    ``handleError`` with the record ``record()`` makes, as ``emit`` would report it. A
    ``CoalescedStream`` is not flushed here: it writes the iteration's lines together."""
    with handler.lock:  # type: ignore[union-attr]
        try:
            stream = handler.stream
            stream.write(line + handler.terminator)
            if type(stream) is not CoalescedStream:
                stream.flush()
        except Exception:
            handler.handleError(record())


class CoalescedStream:
    """The log stream ``configure_logging`` sets up around the real one (stderr).

    Text written while an event loop runs in this thread is collected and reaches the real
    stream in one write and one flush in the loop's next iteration (one ``call_soon``
    however many lines were written), or sooner when ``flush`` is called: every record that
    takes the ``logging`` way is flushed by its handler, and what was collected before it
    goes first, so lines stay whole and in order. Without a running loop (start-up, other
    threads, the CLI) text is written and flushed at once, after anything collected.
    ``flush_logs`` flushes what is left when a process stops serving.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._pending: list[str] = []
        self._lock = threading.Lock()
        # The loop whose next iteration writes ``_pending`` (None once written): a loop that
        # stopped before that iteration (a closed test loop) leaves it to the next one.
        self._flusher: asyncio.AbstractEventLoop | None = None

    @property
    def name(self) -> Any:
        return getattr(self.stream, "name", "")

    def write(self, text: str) -> int:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            if loop is not None:
                if self._flusher is not loop:
                    loop.call_soon(self._flush_soon)
                    self._flusher = loop
                self._pending.append(text)
                return len(text)
            self._write(text)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._write("")

    def _write(self, text: str) -> None:  # under the lock
        self._flusher = None
        if self._pending:
            text = "".join(self._pending) + text
            self._pending.clear()  # first: a failing stream does not get them again
        if text:
            self.stream.write(text)
        self.stream.flush()

    def _flush_soon(self) -> None:
        try:
            self.flush()
        except Exception:  # what ``Handler.handleError`` does for a record it cannot write
            if logging.raiseExceptions:
                with contextlib.suppress(Exception):
                    traceback.print_exc(file=sys.__stderr__)


def flush_logs() -> None:
    """Flush the root logger's handlers (what a ``CoalescedStream`` still holds)."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()


class EscapingJsonFormatter(JsonFormatter):
    """JSON lines whose string values hold no control character even once decoded.

    A record without exception, stack or dict message (every access-log line) takes a short
    way to the same line: the fields python-json-logger would gather, in its order, escaped
    the same way, through the same ``json.dumps`` settings. The others go through
    python-json-logger itself.
    """

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            exc_info_as_array=True,
            stack_info_as_array=True,
        )

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info or isinstance(record.msg, dict):
            return super().format(record)
        message = record.message = record.getMessage()
        fields = (
            (k, v) for k, v in vars(record).items() if k not in _JSON_SKIP and not k.startswith("_")
        )
        return json_line(record.created, record.levelname, record.name, message, fields)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record.created)

    def formatException(self, ei: Any) -> list[str]:  # type: ignore[override]
        return format_exception(ei[1])

    def formatStack(self, stack_info: str) -> list[str]:  # type: ignore[override]
        return [escape(line, backslash=False) for line in stack_info.split("\n")]

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        # exc_info and stack_info are lists of lines escaped already (format_exception).
        return {
            escape(str(k)): v if k in ("exc_info", "stack_info") else _clean(v)
            for k, v in log_data.items()
        }


def configure_logging(
    fmt: str = "json", level: str = "info", stream: IO[str] | None = None
) -> None:
    handler = logging.StreamHandler(CoalescedStream(stream or sys.stderr))
    handler.setFormatter(EscapingJsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class WarnLimiter:
    """One WARNING per cause per ``interval`` seconds, and one INFO when a cause recovers.

    ``warn(cause, msg, *args)`` logs at once the first time a cause is seen, then at most once
    per interval, adding ``suppressed=N`` (how many it held back). ``ok(cause, msg, *args)``
    logs that the cause went away, once, and only when it had been warned about. A cause is a
    short, stable text such as ``"upstream 127.0.0.1:8080 refused"``, never a secret.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_causes: int = 1000,
    ) -> None:
        self.log = logger
        self.interval = interval
        self._clock = clock
        self._max = max_causes
        self._causes: dict[str, tuple[float, int]] = {}  # cause -> (last logged, held back)

    def warn(self, cause: str, msg: str, *args: object, **fields: Any) -> bool:
        """Log ``msg`` for ``cause`` unless it was logged within the interval; True if logged."""
        now = self._clock()
        seen = self._causes.get(cause)
        if seen is not None and now - seen[0] < self.interval:
            self._causes[cause] = (seen[0], seen[1] + 1)
            return False
        if seen is None and len(self._causes) >= self._max:
            # A bounded table: a flood of distinct causes forgets the oldest ones.
            self._causes.pop(next(iter(self._causes)))
        extra = {"cause": cause, **fields}
        if seen is not None and seen[1]:
            extra["suppressed"] = seen[1]
        self._causes[cause] = (now, 0)
        self.log.warning(msg, *args, extra=extra, stacklevel=2)
        return True

    def ok(self, prefix: str, msg: str, *args: object) -> bool:
        """Log one recovery for every failing cause that starts with ``prefix``; True if
        anything had been failing (cheap when nothing is: called on every success)."""
        if not self._causes:
            return False
        gone = [c for c in self._causes if c.startswith(prefix)]
        if not gone:
            return False
        held = sum(self._causes.pop(c)[1] for c in gone)
        extra: dict[str, Any] = {"cause": ", ".join(gone)}
        if held:
            extra["suppressed"] = held
        self.log.info(msg, *args, extra=extra, stacklevel=2)
        return True

    @property
    def failing(self) -> tuple[str, ...]:
        return tuple(self._causes)


def transport_cause(exc: BaseException) -> str:
    """What went wrong on a connection, in a few words and without any URL or secret:
    ``connection refused``, ``connect timeout``, ``read timeout``, ``name not resolved``..."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect timeout"
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "read timeout"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "name not resolved"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return "connection refused"
        return (os_error.strerror or type(os_error).__name__).lower()
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "closed the connection without an answer"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, ValueError):
        return "not JSON"
    return type(exc).__name__
