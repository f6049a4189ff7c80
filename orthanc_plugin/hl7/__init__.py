"""HL7 v2: the ORU^R01 result message for RIS, its MLLP transport and its delivery from the outbox.

Owns: building and validating the v2.5 ORU^R01 of a job's results with hl7apy (``message``),
sending one message over MLLP, optionally inside TLS, and reading the receiver's ACK (``mllp``),
and delivering queued messages from the ``hl7_outbox`` with retries (``delivery``).

May import: ``core``, ``jobs``.
"""
