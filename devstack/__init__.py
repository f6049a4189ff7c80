"""The local stack and the test services: never part of the product.

Starts Orthanc, Triton (the tritonserver from the nvidia-pytriton wheel with the CPU stand-in
backend), the OHIF viewer proxy, PostgreSQL and a small FHIR server for ``make up``, ``make demo``
and the tests. May import ``orthanc_plugin``; the product never imports this package.
"""
