"""Pixels to volumes to model tensors and back: geometry, conforming, pre- and post-processing.

Owns: building a correctly oriented volume from a series (``volume``), conforming to a model's
grid (``conform``), intensity windows and resizing (``preprocess``), label maps from model
outputs (``postprocess``), roles as channels and the tensor a model gets (``model_input``).
No I/O: everything here is computation on arrays and DICOM headers.

May import: ``core``.
"""
