"""FHIR: the DiagnosticReport bundle, its delivery to the EHR and the read API.

Owns: building the transaction Bundle (DiagnosticReport, Observations, Device) from a job's
results (``report``), delivering queued bundles from the outbox with retries (``delivery``),
and reading stored reports back for ``/ai/fhir`` (``read_api``).

May import: ``core``, ``jobs``.
"""
