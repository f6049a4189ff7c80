"""The shared kernel: settings and pipeline definitions, codes, derived UIDs, result types, logs.

Owns: the typed configuration (``config``), DICOM/SNOMED/UCUM codes (``codes``), the radiomics feature table (``features``), job keys and
output UIDs derived from them (``uids``), the typed results handed from the worker to the output
writers (``results``), the typed hand-offs between processes (``handoff``), logging, TLS options,
process helpers and install paths.

May import: nothing of this product (only the standard library and third-party packages).
"""
