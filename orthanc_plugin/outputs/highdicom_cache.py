"""A cache for highdicom's "is this attribute in that IOD" look-up, installed by an explicit call.

highdicom asks it once per source image when it makes a SEG or an SR image region, and each
answer walks the standard's module tables: 1.5 ms, so 0.1 s for a 64-slice SEG and 0.5 s for
the SEG and SR of 320 slices. The answer is a pure function of its arguments, so caching it
changes no output. Replacing a function inside another library is only safe on the releases
it was checked with: :func:`install_iod_cache` does it on those (``CHECKED_HIGHDICOM``) and
otherwise leaves highdicom alone (the outputs are the same, only slower). The worker calls it
once at start; importing this package changes nothing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
from collections.abc import Sequence

log = logging.getLogger("orthanc_ai.outputs")

#: highdicom releases whose ``is_attribute_in_iod`` has the signature and purity relied on here
CHECKED_HIGHDICOM = ("0.28.",)
_MODULES = ("highdicom._standard_utils", "highdicom.base", "highdicom.sr.content")


def install_iod_cache() -> bool:
    """Memoise highdicom's IOD look-up; returns whether the cache is in place."""
    version = importlib.metadata.version("highdicom")
    if not version.startswith(CHECKED_HIGHDICOM):
        log.info("highdicom %s is not one the IOD look-up cache was checked with: not installed", version)
        return False
    utils = importlib.import_module("highdicom._standard_utils")
    original = getattr(utils, "is_attribute_in_iod", None)
    if original is None:
        log.info("highdicom %s has no is_attribute_in_iod: IOD look-up cache not installed", version)
        return False
    if getattr(original, "orthanc_ai_memoised", False):
        return True

    @functools.lru_cache(maxsize=1024)
    def cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return bool(original(attribute, sop_class_uid, list(exclude) if exclude is not None else None))

    def is_attribute_in_iod(
        attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
    ) -> bool:
        exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
        return cached(attribute, str(sop_class_uid), exclude)

    is_attribute_in_iod.orthanc_ai_memoised = True  # type: ignore[attr-defined]
    for name in _MODULES:
        module = importlib.import_module(name)
        if getattr(module, "is_attribute_in_iod", None) is original:
            module.is_attribute_in_iod = is_attribute_in_iod  # type: ignore[attr-defined]
    return True
