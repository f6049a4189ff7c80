"""Model monitoring: how reviewers judge each model version and whether its inputs or outputs drift.

Owns: the drift statistics (``drift``: population stability index for categories, two-sample
Kolmogorov-Smirnov for measurements, the alert rule) and the per-model report built from the
job store and the reviews (``report``), which the API, the metrics and the admin page show.
Computation over stored records only: no DICOM, no network, light enough for Orthanc's process.

May import: ``core``, ``jobs``.
"""
