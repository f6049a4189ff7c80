"""The highdicom IOD look-up cache: installed only by an explicit call, never by an import."""

from __future__ import annotations

import subprocess
import sys

import highdicom._standard_utils as utils

from orthanc_plugin.outputs import highdicom_cache


def test_importing_the_product_patches_nothing() -> None:
    # A fresh interpreter: this test process may have installed the cache already.
    code = (
        "import highdicom._standard_utils as u\n"
        "import orthanc_plugin.outputs.seg, orthanc_plugin.outputs.sr, orthanc_plugin.worker.pipeline\n"
        "print(getattr(u.is_attribute_in_iod, 'orthanc_ai_memoised', False))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_cache_gives_highdicoms_answers() -> None:
    original = utils.is_attribute_in_iod
    was_installed = getattr(original, "orthanc_ai_memoised", False)
    assert highdicom_cache.install_iod_cache() is True
    cached = utils.is_attribute_in_iod
    assert getattr(cached, "orthanc_ai_memoised", False)
    seg_class = "1.2.840.10008.5.1.4.1.1.66.4"
    for attribute in ("PatientID", "SegmentSequence", "RTROIObservationsSequence"):
        expected = original(attribute, seg_class) if not was_installed else cached(attribute, seg_class)
        assert cached(attribute, seg_class) == expected
    assert highdicom_cache.install_iod_cache() is True  # a second call keeps the one cache


def test_an_unchecked_highdicom_release_is_left_alone(monkeypatch) -> None:
    monkeypatch.setattr(highdicom_cache.importlib.metadata, "version", lambda name: "9.9.9")
    before = utils.is_attribute_in_iod
    assert highdicom_cache.install_iod_cache() is False
    assert utils.is_attribute_in_iod is before
