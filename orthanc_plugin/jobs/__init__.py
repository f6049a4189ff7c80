"""Durable state: the job store, the delivery outbox and the database both live in.

Owns: the SQLite/PostgreSQL database layer (``database``, ``sqlite_db``), jobs with leases,
retries and history (``store``), deliveries to the EHR queued in the job's own transaction
(``outbox``).

May import: ``core``.
"""
