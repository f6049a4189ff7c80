"""The viewer side: the gateway that puts the OHIF viewer and Orthanc's DICOMweb on one origin.

Owns: serving OHIF's prebuilt files and the site's ``app-config.js``, forwarding DICOMweb and
WADO reads to Orthanc, and letting through the one write a reviewer makes in the viewer (STOW-RS
of a corrected segmentation) only from the viewer's own pages (``gateway``). Runs as its own
process (``python -m orthanc_plugin viewer``), never inside Orthanc.

May import: nothing of this product.
"""
