"""Result writers: label maps and measurements become DICOM objects.

Owns: DICOM SEG (``seg``, with the fast BINARY encoder ``seg_binary``) and the TID 1500
Comprehensive 3D SR (``sr``). A new output kind (key images, PDF, RTSTRUCT) is a module here
taking the same typed results (``core.results``) and returning a pydicom Dataset; the worker's
pipeline (``worker.pipeline``) calls it and stores what it returns.

May import: ``core``, ``imaging``.
"""
