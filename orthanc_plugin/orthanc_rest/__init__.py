"""Talking to Orthanc over its REST API from outside its process.

Owns: the REST client the workers use to read series and store results (``client``) and
forwarding of results to other DICOM/DICOMweb destinations (``forwarding``), the AI state as
study labels where Orthanc has them (``labels``).

May import: ``core``, ``jobs``, ``imaging`` (pixel decoding).
"""
