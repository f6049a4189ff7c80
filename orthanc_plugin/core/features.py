"""The radiomics features the product computes: IBSI identifier, name, family and unit.

The table lives in the shared kernel so that a pipeline's configuration can name features
(``classify.inputs``) and be checked without the imaging code; the computation is
:mod:`orthanc_plugin.imaging.radiomics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class FeatureDef:
    """One feature: its IBSI identifier and name, family and unit (UCUM, "1" for none)."""

    id: str
    name: str
    family: Literal["morphology", "intensity", "glcm"]
    unit: str = "1"


_MM, _MM2, _MM3, _PER_MM = "mm", "mm2", "mm3", "/mm"
FEATURES: tuple[FeatureDef, ...] = (
    FeatureDef("morph.vol", "Volume (mesh)", "morphology", _MM3),
    FeatureDef("morph.approx.vol", "Volume (voxel counting)", "morphology", _MM3),
    FeatureDef("morph.area", "Surface area (mesh)", "morphology", _MM2),
    FeatureDef("morph.av", "Surface to volume ratio", "morphology", _PER_MM),
    FeatureDef("morph.comp.1", "Compactness 1", "morphology"),
    FeatureDef("morph.comp.2", "Compactness 2", "morphology"),
    FeatureDef("morph.sph.dispr", "Spherical disproportion", "morphology"),
    FeatureDef("morph.sphericity", "Sphericity", "morphology"),
    FeatureDef("morph.asphericity", "Asphericity", "morphology"),
    FeatureDef("morph.com", "Centre of mass shift", "morphology", _MM),
    FeatureDef("morph.diam", "Maximum 3D diameter", "morphology", _MM),
    FeatureDef("morph.pca.major", "Major axis length", "morphology", _MM),
    FeatureDef("morph.pca.minor", "Minor axis length", "morphology", _MM),
    FeatureDef("morph.pca.least", "Least axis length", "morphology", _MM),
    FeatureDef("morph.pca.elongation", "Elongation", "morphology"),
    FeatureDef("morph.pca.flatness", "Flatness", "morphology"),
    FeatureDef("morph.v.dens.aabb", "Volume density (AABB)", "morphology"),
    FeatureDef("morph.a.dens.aabb", "Area density (AABB)", "morphology"),
    FeatureDef("stat.mean", "Mean intensity", "intensity"),
    FeatureDef("stat.var", "Intensity variance", "intensity"),
    FeatureDef("stat.skew", "Intensity skewness", "intensity"),
    FeatureDef("stat.kurt", "(Excess) intensity kurtosis", "intensity"),
    FeatureDef("stat.median", "Median intensity", "intensity"),
    FeatureDef("stat.min", "Minimum intensity", "intensity"),
    FeatureDef("stat.p10", "10th intensity percentile", "intensity"),
    FeatureDef("stat.p90", "90th intensity percentile", "intensity"),
    FeatureDef("stat.max", "Maximum intensity", "intensity"),
    FeatureDef("stat.iqr", "Intensity interquartile range", "intensity"),
    FeatureDef("stat.range", "Intensity range", "intensity"),
    FeatureDef("stat.mad", "Intensity-based mean absolute deviation", "intensity"),
    FeatureDef("stat.rmad", "Intensity-based robust mean absolute deviation", "intensity"),
    FeatureDef("stat.medad", "Intensity-based median absolute deviation", "intensity"),
    FeatureDef("stat.cov", "Intensity-based coefficient of variation", "intensity"),
    FeatureDef("stat.qcod", "Intensity-based quartile coefficient of dispersion", "intensity"),
    FeatureDef("stat.energy", "Intensity-based energy", "intensity"),
    FeatureDef("stat.rms", "Root mean square intensity", "intensity"),
    FeatureDef("cm.joint.max", "GLCM joint maximum", "glcm"),
    FeatureDef("cm.joint.avg", "GLCM joint average", "glcm"),
    FeatureDef("cm.joint.var", "GLCM joint variance", "glcm"),
    FeatureDef("cm.joint.entr", "GLCM joint entropy", "glcm"),
    FeatureDef("cm.diff.avg", "GLCM difference average", "glcm"),
    FeatureDef("cm.diff.var", "GLCM difference variance", "glcm"),
    FeatureDef("cm.diff.entr", "GLCM difference entropy", "glcm"),
    FeatureDef("cm.sum.avg", "GLCM sum average", "glcm"),
    FeatureDef("cm.sum.var", "GLCM sum variance", "glcm"),
    FeatureDef("cm.sum.entr", "GLCM sum entropy", "glcm"),
    FeatureDef("cm.energy", "GLCM angular second moment", "glcm"),
    FeatureDef("cm.contrast", "GLCM contrast", "glcm"),
    FeatureDef("cm.dissimilarity", "GLCM dissimilarity", "glcm"),
    FeatureDef("cm.inv.diff", "GLCM inverse difference", "glcm"),
    FeatureDef("cm.inv.diff.norm", "GLCM normalised inverse difference", "glcm"),
    FeatureDef("cm.inv.diff.mom", "GLCM inverse difference moment", "glcm"),
    FeatureDef("cm.inv.diff.mom.norm", "GLCM normalised inverse difference moment", "glcm"),
    FeatureDef("cm.inv.var", "GLCM inverse variance", "glcm"),
    FeatureDef("cm.corr", "GLCM correlation", "glcm"),
    FeatureDef("cm.auto.corr", "GLCM autocorrelation", "glcm"),
    FeatureDef("cm.clust.tend", "GLCM cluster tendency", "glcm"),
    FeatureDef("cm.clust.shade", "GLCM cluster shade", "glcm"),
    FeatureDef("cm.clust.prom", "GLCM cluster prominence", "glcm"),
    FeatureDef("cm.info.corr.1", "GLCM information correlation 1", "glcm"),
    FeatureDef("cm.info.corr.2", "GLCM information correlation 2", "glcm"),
)
FEATURES_BY_ID = {f.id: f for f in FEATURES}
