"""orthanc-ai: imaging-AI plugin for Orthanc (AGPL-3.0-or-later)."""
