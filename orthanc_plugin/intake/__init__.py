"""From Orthanc's change log to queued jobs: what arrived, which pipelines it matches.

Owns: the routing rules evaluated on series and studies (``routing``) and the change-log reader
that catches up after a restart and enqueues one job per (study, pipeline, input), superseding
a job whose series changed (``changes``); when a series being received is complete (``series``).

May import: ``core``, ``jobs``.
"""
