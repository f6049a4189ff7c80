"""The AI worker: claims a job and runs the pipeline's stages, one function per stage.

Owns: the job lifecycle (claim, heartbeat, succeed, fail, retry) (``loop``), the stages of a
pipeline run from fetch to store (``pipeline``), the supervisor that keeps local worker processes
alive (``supervisor``) and the worker-host command (``remote``); between jobs it applies the
recorded reviews (``review``).

May import: ``core``, ``jobs``, ``imaging``, ``inference``, ``outputs``, ``fhir``, ``hl7``,
``orthanc_rest``, ``review``.
"""
