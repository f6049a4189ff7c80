"""The review loop's worker side: what an accepted, edited or rejected AI result produces.

Owns: applying a recorded review (``apply``): the verified SR version stored in the study,
for an edit the measurements and the agreement recomputed on the revised SEG, the FHIR update
(final, amended or entered-in-error) queued through the outbox, the study's review label.
Reviews are recorded by ``jobs.reviews`` (the API, the intake); a worker applies them.

May import: ``core``, ``jobs``, ``imaging``, ``outputs``, ``fhir``, ``orthanc_rest``.
"""
