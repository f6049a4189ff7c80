"""Structured logs: one JSON object per line for the plugin and the workers.

Each record carries ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the process
role (``plugin`` or ``worker``) and its ``worker`` name (``host:pid``, the lease owner name),
and, when known, ``job_id``, ``study_uid``, ``series_uid`` and ``pipeline``. Those come from
``extra={...}`` on the call or from :func:`log_context` around a piece of work.

What is never logged: patient names, IDs or birth dates. Our messages hold Orthanc ids, UIDs,
job ids and configuration names only; a DICOM dataset is never put into a message. Messages of
other libraries (Python warnings included) have their quoted parts withheld, since those quote
attribute values. Logs are for
operations; the per-job audit record is ``GET /ai/jobs/{id}/audit``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.handlers
import os
import re
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT_LOGGER = "orthanc_ai"
OWN_LOGGERS = (ROOT_LOGGER, "orthanc_plugin")
# Library messages (pydicom, highdicom warnings...) may quote DICOM values, e.g. highdicom's
# warning about a one-component PatientName quotes the name: quoted text is withheld.
_QUOTED = re.compile(r'"[^"\n]*"|\'[^\'\n]*\'')
WITHHELD = '"<withheld>"'
CONTEXT_FIELDS = ("job_id", "study_uid", "series_uid", "pipeline")
PLUGIN_LOG = "plugin.log"

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "orthanc_ai_log_context", default=None
)


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Add ``job_id``/``study_uid``/``series_uid``/``pipeline`` to every record logged inside (this thread)."""
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context field(s): {', '.join(sorted(unknown))}")
    merged = {**(_context.get() or {}), **{k: str(v) for k, v in fields.items() if v}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (never several lines, even with a traceback)."""

    def __init__(self, role: str, worker: str | None = None) -> None:
        super().__init__()
        self.role = role
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.message(record),
            "process": self.role,
            "worker": self.worker,
            "thread": record.threadName,
        }
        context = _context.get() or {}
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None) or context.get(name)
            if value:
                out[name] = str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)

    @staticmethod
    def message(record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.name == ROOT_LOGGER or record.name.startswith(tuple(f"{n}." for n in OWN_LOGGERS)):
            return text
        return _QUOTED.sub(WITHHELD, text)


def setup_worker_logging(level: int = logging.INFO) -> None:
    """A worker process: JSON lines on stderr (the supervisor writes it to ``worker-<n>.log``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter("worker"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # Library warnings (pydicom, highdicom) become records too, instead of free text on stderr.
    logging.captureWarnings(True)


def add_plugin_log_file(log_dir: Path, level: int = logging.INFO) -> logging.Handler:
    """Inside Orthanc: also write ``orthanc_ai.*`` records as JSON lines to ``<log_dir>/plugin.log``.

    A ``WatchedFileHandler`` reopens the file after logrotate moved it.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.WatchedFileHandler(log_dir / PLUGIN_LOG, encoding="utf-8")
    handler.setFormatter(JsonFormatter("plugin"))
    handler.setLevel(level)
    logging.getLogger(ROOT_LOGGER).addHandler(handler)
    return handler
