"""Bring your own model: inspect an ONNX file and add it to the Triton repository.

Owns: the ``model add|list`` command (``cli``) and a minimal ONNX protobuf encoder/decoder
(``onnx_proto``).

May import: ``core``.
"""
