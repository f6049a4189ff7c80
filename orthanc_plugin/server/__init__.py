"""Inside Orthanc: the plugin entry, the ``/ai/`` REST API, audit, metrics and the admin page.

Owns: wiring Orthanc's callbacks (``plugin``), the REST routes (``api``), the audit trail
(``audit``), Prometheus metrics (``metrics``) and the admin UI files (``ui/``, Chart.js installed
by ``scripts/install.sh`` into ``ui/vendor/node_modules``). Kept light: it runs
on Orthanc's one Python interpreter.

May import: ``core``, ``jobs``, ``intake``, ``monitoring``, ``fhir``, ``orthanc_rest``, ``inference``, ``worker``.
"""
