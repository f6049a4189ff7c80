"""Tensors to Triton and back.

Owns: the Triton client (binary tensors over HTTP/gRPC, system shared memory on the same host,
model metadata and readiness) (``triton``) and sliding-window inference over a predictor
(``sliding_window``).

May import: ``core``.
"""
