"""Errors that a request can meet, shared by every layer that serves the REST API.

The API answers :class:`NotFound` with 404 and :class:`BadRequest` with 400, with the message
as the error text; every other exception is a bug and becomes a logged 500 that shows only an
error id (never exception text). Raise these on purpose; a stray ``KeyError`` is a 500.
"""

from __future__ import annotations


class NotFound(LookupError):
    """A job, study, pipeline or resource named in a request does not exist."""


class BadRequest(ValueError):
    """A request the caller must change: bad JSON, an unknown filter value, a limit out of range."""
