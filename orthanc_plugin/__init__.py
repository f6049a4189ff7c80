"""orthanc-ai: the Orthanc plugin that routes studies to AI pipelines on Triton.

The subpackages follow the path of a study, from the bottom up:
``core`` (shared kernel) -> ``jobs`` (durable state) -> ``intake`` (change log, routing) ->
``imaging`` (volumes, tensors) -> ``inference`` (Triton) -> ``outputs`` (SEG, SR) ->
``fhir`` / ``orthanc_rest`` (deliver, store) -> ``worker`` (the pipeline run) ->
``server`` (inside Orthanc). Each package's docstring says what it owns and what it may import;
``tests/unit/test_layout.py`` enforces it.
"""
