"""Typed, validated configuration: the ``OrthancAI`` section of Orthanc's JSON and the pipelines file.

Errors name the file and the key, so an admin can fix them without reading code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .codes import Code


class ConfigError(ValueError):
    """Configuration that cannot be used; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------- rules


class Condition(_Strict):
    """Test on one DICOM attribute (keyword) of a series; every given test must hold."""

    equals: str | list[str] | None = None
    not_equals: str | list[str] | None = None
    matches: str | None = Field(default=None, description="regular expression, searched, case-sensitive")
    not_matches: str | None = None
    min: float | None = None
    max: float | None = None
    present: bool | None = None

    @field_validator("matches", "not_matches")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"invalid regular expression {v!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        if all(getattr(self, f) is None for f in type(self).model_fields):
            raise ValueError("a condition needs at least one of " + ", ".join(type(self).model_fields))
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class Preference(_Strict):
    """Tie-breaker when several series satisfy a role: the first preference that separates them wins."""

    attribute: str
    matches: str | None = None
    order: Literal["max", "min"] | None = None
    reason: str = ""

    @model_validator(mode="after")
    def _one_kind(self) -> Preference:
        if (self.matches is None) == (self.order is None):
            raise ValueError("a preference needs exactly one of 'matches' or 'order'")
        if self.matches is not None:
            re.compile(self.matches)
        return self


class InputRole(_Strict):
    """A named input of a pipeline and the rule that picks its series from a study."""

    role: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    required: bool = True
    where: dict[str, Condition] = Field(default_factory=dict)
    exclude: dict[str, Condition] = Field(
        default_factory=dict, description="a series for which any of these holds is excluded"
    )
    prefer: list[Preference] = Field(default_factory=list)
    temporal_position: int | None = Field(
        default=None, ge=1, description="for series with several temporal positions: which one to use"
    )


# --------------------------------------------------------------------------- pipelines


class ModelRef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: str = Field(default="", description="empty: the newest version Triton serves")
    input: str = "image"
    output: str = "probabilities"


class Preprocess(_Strict):
    window: tuple[float, float] | None = None
    minmax: bool = False
    shape: tuple[int, int, int]

    @model_validator(mode="after")
    def _one_scaling(self) -> Preprocess:
        if self.window is not None and self.minmax:
            raise ValueError("choose either 'window' or 'minmax', not both")
        if self.window is not None and not self.window[1] > self.window[0]:
            raise ValueError(f"window {list(self.window)}: the second value must be greater")
        if min(self.shape) < 1:
            raise ValueError("shape: three positive sizes")
        return self


class CodeSpec(_Strict):
    value: str
    scheme: str
    meaning: str

    def to_code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class SegmentConfig(_Strict):
    label: int = Field(ge=1, le=255)
    name: str
    category: CodeSpec
    type: CodeSpec
    anatomic_region: CodeSpec | None = None
    color: tuple[int, int, int] = (255, 0, 0)
    tracking_id: str | None = None


class Outputs(_Strict):
    seg: bool = True
    seg_type: Literal["BINARY", "LABELMAP"] = Field(
        default="BINARY",
        description="LABELMAP: one frame per slice holding every label (DICOM 2024b+ viewers)",
    )
    sr: bool = True
    fhir: bool = True
    series_number: int = Field(default=9900, ge=1, le=99999, description="SEG gets this, SR this + 1")


class PipelineConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    version: str = Field(pattern=r"^[0-9A-Za-z.+-]+$")
    enabled: bool = True
    priority: int = 0
    description: str = ""
    algorithm_name: str
    task: Literal["segmentation"] = "segmentation"
    model: ModelRef
    inputs: list[InputRole] = Field(min_length=1)
    study_where: dict[str, Condition] = Field(default_factory=dict)
    preprocess: Preprocess
    largest_component: bool = True
    segments: list[SegmentConfig] = Field(min_length=1)
    outputs: Outputs = Outputs()

    @model_validator(mode="after")
    def _unique(self) -> PipelineConfig:
        roles = [r.role for r in self.inputs]
        if len(set(roles)) != len(roles):
            raise ValueError(f"input roles must be unique, got {roles}")
        labels = [s.label for s in self.segments]
        if len(set(labels)) != len(labels):
            raise ValueError(f"segment labels must be unique, got {labels}")
        return self


class PipelinesFile(_Strict):
    pipelines: list[PipelineConfig]

    @model_validator(mode="after")
    def _unique_names(self) -> PipelinesFile:
        names = [p.name for p in self.pipelines]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline names must be unique, got {names}")
        return self


# --------------------------------------------------------------------------- plugin settings


class Settings(_Strict):
    """The ``OrthancAI`` section of the Orthanc configuration (paths already resolved)."""

    pipelines_file: Path = Field(alias="PipelinesFile")
    job_store: Path | None = Field(default=None, alias="JobStore")
    workers: int = Field(default=1, ge=0, le=64, alias="Workers")
    worker_python: Path | None = Field(default=None, alias="WorkerPython")
    triton_url: str = Field(default="127.0.0.1:8001", alias="TritonUrl")
    triton_shared_memory: bool | None = Field(default=None, alias="TritonSharedMemory")
    orthanc_url: str = Field(default="http://127.0.0.1:8042", alias="OrthancUrl")
    orthanc_username: str | None = Field(default=None, alias="OrthancUsername")
    orthanc_password_env: str | None = Field(default=None, alias="OrthancPasswordEnv")
    admin_users: list[str] | None = Field(
        default=None,
        alias="AdminUsers",
        description="with Orthanc authentication on: the users allowed to change state under /ai/ "
        "(retry, cancel, run, reload); null: every authenticated user",
    )
    lease_seconds: float = Field(default=30.0, gt=1, alias="LeaseSeconds")
    max_attempts: int = Field(default=3, ge=1, le=20, alias="MaxAttempts")
    retry_backoff_seconds: float = Field(default=5.0, ge=0, alias="RetryBackoffSeconds")
    catch_up_delay_seconds: float = Field(default=-1, alias="CatchUpDelaySeconds")
    log_dir: Path | None = Field(default=None, alias="LogDirectory")
    # FHIR delivery to the EHR (none when FhirBaseUrl is unset: reports stay in the job store).
    fhir_base_url: str | None = Field(default=None, alias="FhirBaseUrl")
    fhir_token_env: str | None = Field(
        default=None, alias="FhirTokenEnv", description="environment variable holding the bearer token"
    )
    fhir_version: Literal["R4", "R5"] = Field(default="R4", alias="FhirVersion")
    fhir_verify_tls: bool | Path = Field(
        default=True, alias="FhirVerifyTls", description="false, true or a CA file"
    )
    fhir_timeout_seconds: float = Field(default=30.0, gt=0, alias="FhirTimeoutSeconds")
    delivery_max_backoff_seconds: float = Field(default=300.0, gt=0, alias="DeliveryMaxBackoffSeconds")

    @field_validator("orthanc_username")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None  # an empty value (an unset ${VAR} in orthanc.json) means no authentication

    @field_validator("fhir_base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None  # an empty value (e.g. an unset ${VAR} in orthanc.json) means no delivery
        if v is not None and not re.match(r"^https?://[^/]+", v):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v.rstrip("/") if v else v


def _explain(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{source}: key '{key}': {err['msg']}")
    return "\n".join(lines)


def load_pipelines(path: Path) -> list[PipelineConfig]:
    """Read and validate a pipelines file (YAML or JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the pipelines file: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML/JSON: {e}") from None
    try:
        return PipelinesFile.model_validate(raw).pipelines
    except ValidationError as e:
        raise ConfigError(_explain(e, str(path))) from None


def load_settings(orthanc_config: dict[str, Any], source: str = "Orthanc configuration") -> Settings:
    """Validate the ``OrthancAI`` section; relative paths are taken from the working directory."""
    section = orthanc_config.get("OrthancAI")
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: key 'OrthancAI' is missing or not an object")
    try:
        settings = Settings.model_validate(section)
    except ValidationError as e:
        raise ConfigError(_explain(e, f"{source}: OrthancAI")) from None
    if settings.job_store is None:
        storage = Path(str(orthanc_config.get("StorageDirectory", "OrthancStorage")))
        settings = settings.model_copy(update={"job_store": storage / "orthanc-ai" / "jobs.sqlite"})
    return settings


def settings_to_json(settings: Settings) -> str:
    """Serialise settings for a worker process (aliases kept, so the worker validates them the same way)."""
    return json.dumps({"OrthancAI": settings.model_dump(mode="json", by_alias=True)})
