# SPDX-License-Identifier: AGPL-3.0-or-later
"""Bring your own model: ``python -m orthanc_plugin model add|list``.

``add`` reads an ONNX file with ONNX Runtime (input and output names, element types, shapes
with their symbolic axes), puts it into the Triton model repository as
``<repository>/<name>/<version>/model.onnx``, writes ``<repository>/<name>/config.pbtxt``
when the model is new, and returns a pipeline stub (YAML) whose model section is filled from
what it read and whose rules and segments are left as ``TODO`` for a person to fill.

Folders appear in the repository whole (built beside it, then renamed), so a Triton that
polls the repository never sees a version folder without its model file.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # as ModelRef.name, no leading '.' or '-'
PIPELINE_NAME = re.compile(r"^[a-z][a-z0-9-]*$")  # as PipelineConfig.name
MODEL_FILE = "model.onnx"
STUB_DIR = Path("config") / "pipelines.d"
TODO = "TODO"

# ONNX Runtime type string -> Triton configuration data type.
_TRITON_TYPES = {
    "tensor(bool)": "TYPE_BOOL",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(float16)": "TYPE_FP16",
    "tensor(bfloat16)": "TYPE_BF16",
    "tensor(float)": "TYPE_FP32",
    "tensor(double)": "TYPE_FP64",
    "tensor(string)": "TYPE_STRING",
}


class ModelCliError(ValueError):
    """The model cannot be added as asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class OnnxTensor:
    """An input or output of the ONNX graph; ``shape`` holds ints and symbolic axis names."""

    name: str
    onnx_type: str
    shape: tuple[int | str, ...]

    @property
    def data_type(self) -> str:
        return _TRITON_TYPES.get(self.onnx_type, "TYPE_INVALID")


@dataclass(frozen=True, slots=True)
class TritonTensor:
    """An input or output as ``config.pbtxt`` lists it: dims without the batch axis, -1 = any size."""

    name: str
    data_type: str
    dims: tuple[int, ...]


Signature = tuple[bool, tuple[TritonTensor, ...], tuple[TritonTensor, ...]]


@dataclass(frozen=True, slots=True)
class AddedModel:
    name: str
    version: int
    model_dir: Path
    model_file: Path
    config_file: Path
    config_written: bool
    """False when an existing ``config.pbtxt`` with the same inputs and outputs was kept."""
    max_batch_size: int
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    pipeline: str
    stub: str
    stub_file: Path | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A model folder of the repository, for ``model list``."""

    name: str
    versions: tuple[int, ...]
    platform: str = ""
    max_batch_size: int = 0
    inputs: tuple[TritonTensor, ...] = ()
    outputs: tuple[TritonTensor, ...] = ()
    error: str | None = None


# --------------------------------------------------------------------------- inspection


def inspect_onnx(path: Path) -> tuple[list[OnnxTensor], list[OnnxTensor]]:
    """Inputs and outputs of an ONNX file, read with ONNX Runtime (CPU)."""
    import onnxruntime as ort

    if not path.is_file():
        raise ModelCliError(f"{path}: no such file")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime raises its own exception types
        raise ModelCliError(f"{path}: ONNX Runtime cannot load this model: {e}") from None

    def tensors(args: Sequence[Any]) -> list[OnnxTensor]:
        out = []
        for a in args:
            shape = tuple(d if isinstance(d, int) and d >= 0 else str(d or "?") for d in (a.shape or []))
            out.append(OnnxTensor(str(a.name), str(a.type), shape))
        return out

    return tensors(session.get_inputs()), tensors(session.get_outputs())


def _triton_tensors(
    tensors: Sequence[OnnxTensor], batched: bool, kind: str, warnings: list[str]
) -> tuple[TritonTensor, ...]:
    out = []
    for t in tensors:
        if t.data_type == "TYPE_INVALID":
            raise ModelCliError(
                f"{kind} '{t.name}' has type {t.onnx_type}, which Triton's ONNX Runtime backend "
                f"does not take (supported: {', '.join(_TRITON_TYPES)})"
            )
        shape = t.shape[1:] if batched else t.shape
        if not shape:
            raise ModelCliError(
                f"{kind} '{t.name}' is a scalar{' per batch item' if batched else ''}: Triton needs at "
                "least one dimension (re-export the model with a shaped tensor)"
            )
        symbolic = [
            f"axis {i + (1 if batched else 0)} ('{d}')" for i, d in enumerate(shape) if isinstance(d, str)
        ]
        if symbolic:
            warnings.append(
                f"{kind} '{t.name}' {list(t.shape)}: {', '.join(symbolic)} "
                f"{'is' if len(symbolic) == 1 else 'are'} symbolic; config.pbtxt says -1 (any size), "
                "but the pipeline's preprocessing sends one fixed shape (preprocess.shape)"
            )
        dims = tuple(d if isinstance(d, int) else -1 for d in shape)
        out.append(TritonTensor(t.name, t.data_type, dims))
    return tuple(out)


def _pbtxt_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(
    name: str,
    max_batch_size: int,
    inputs: Sequence[TritonTensor],
    outputs: Sequence[TritonTensor],
    source: str = "",
) -> str:
    """``config.pbtxt`` for an ONNX model (no ``instance_group``: Triton puts it on a GPU if any)."""

    def block(kind: str, tensors: Sequence[TritonTensor]) -> list[str]:
        lines = [f"{kind} ["]
        for i, t in enumerate(tensors):
            lines += [
                "  {",
                f"    name: {_pbtxt_string(t.name)}",
                f"    data_type: {t.data_type}",
                f"    dims: [ {', '.join(str(d) for d in t.dims)} ]",
                "  }" + ("," if i < len(tensors) - 1 else ""),
            ]
        return [*lines, "]"]

    lines = [
        f"# Written by `python -m orthanc_plugin model add`{f' from {source}' if source else ''}.",
        "# Inputs and outputs as ONNX Runtime read them; dims without the batch axis, -1 = any size.",
        "# No instance_group: Triton runs the model on the GPUs where there are some, else on the CPU.",
        f"name: {_pbtxt_string(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        *block("input", inputs),
        *block("output", outputs),
    ]
    if max_batch_size > 0:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def read_config(path: Path) -> tuple[str, int, tuple[TritonTensor, ...], tuple[TritonTensor, ...]]:
    """(platform, max_batch_size, inputs, outputs) of a ``config.pbtxt``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        config = text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise ModelCliError(f"{path}: cannot read this Triton configuration: {e}") from None

    def tensors(entries: Any) -> tuple[TritonTensor, ...]:
        return tuple(
            TritonTensor(str(e.name), str(mc.DataType.Name(e.data_type)), tuple(int(d) for d in e.dims))
            for e in entries
        )

    platform = str(config.platform or config.backend)
    return platform, int(config.max_batch_size), tensors(config.input), tensors(config.output)


def _signature(
    max_batch_size: int, inputs: Sequence[TritonTensor], outputs: Sequence[TritonTensor]
) -> Signature:
    return (
        max_batch_size > 0,
        tuple(sorted(inputs, key=lambda t: t.name)),
        tuple(sorted(outputs, key=lambda t: t.name)),
    )


def _describe(sig: Signature) -> str:
    batched, inputs, outputs = sig

    def one(t: TritonTensor) -> str:
        return f"{t.name} {t.data_type} {list(((-1,) if batched else ()) + t.dims)}"

    return f"inputs {', '.join(map(one, inputs))}; outputs {', '.join(map(one, outputs))}"


def _versions(model_dir: Path) -> tuple[int, ...]:
    if not model_dir.is_dir():
        return ()
    return tuple(sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()))


# --------------------------------------------------------------------------- add


def add_model(
    onnx_path: Path,
    name: str,
    repository: Path = Path("triton_models"),
    pipeline: str | None = None,
    max_batch_size: int = 4,
    version: int | None = None,
    force: bool = False,
    stub_dir: Path | None = None,
) -> AddedModel:
    """Put ``onnx_path`` into the model repository as ``name`` (see the module docstring).

    ``version`` None: one more than the highest version folder there. ``max_batch_size`` 0
    turns batching off; it is also off when the first axis of the model is not symbolic.
    An existing model folder keeps its ``config.pbtxt`` when the inputs and outputs are the
    same; when they differ the model is refused unless ``force`` (the configuration is then
    rewritten, and older versions that do not fit it will fail to load). ``stub_dir``: also
    write the pipeline stub to ``<stub_dir>/<pipeline>.yaml.example``.
    """
    onnx_path = Path(onnx_path)
    repository = Path(repository)
    if not MODEL_NAME.fullmatch(name):
        raise ModelCliError(
            f"model name {name!r} is not valid: letters, digits, '_', '.' and '-', not starting with '.' or '-'"
        )
    pipeline = pipeline if pipeline is not None else default_pipeline_name(name)
    if not PIPELINE_NAME.fullmatch(pipeline):
        raise ModelCliError(
            f"pipeline name {pipeline!r} is not valid: lower-case letters, digits and '-', starting with a letter"
        )
    if max_batch_size < 0:
        raise ModelCliError(f"max_batch_size must be 0 (no batching) or more, got {max_batch_size}")
    if version is not None and version < 1:
        raise ModelCliError(f"version must be 1 or more, got {version}")
    if not repository.is_dir():
        raise ModelCliError(f"model repository {repository} is not a folder")

    onnx_inputs, onnx_outputs = inspect_onnx(onnx_path)
    if not onnx_inputs or not onnx_outputs:
        raise ModelCliError(f"{onnx_path}: the model has no inputs or no outputs")
    warnings: list[str] = []
    tensors = onnx_inputs + onnx_outputs
    symbolic_first = [bool(t.shape) and isinstance(t.shape[0], str) for t in tensors]
    batched = max_batch_size > 0 and all(symbolic_first)
    if max_batch_size > 0 and not batched:
        fixed = [t.name for t, s in zip(tensors, symbolic_first, strict=True) if not s]
        warnings.append(
            f"no batching (max_batch_size: 0): the first axis of {', '.join(fixed)} is not symbolic"
        )
    mbs = max_batch_size if batched else 0
    inputs = _triton_tensors(onnx_inputs, batched, "input", warnings)
    outputs = _triton_tensors(onnx_outputs, batched, "output", warnings)

    model_dir = repository / name
    config_file = model_dir / "config.pbtxt"
    new_config = config_text(name, mbs, inputs, outputs, source=onnx_path.name)
    write_config = True
    if config_file.exists():
        try:
            _, old_mbs, old_in, old_out = read_config(config_file)
        except ModelCliError:
            if not force:
                raise
        else:
            old_sig, new_sig = _signature(old_mbs, old_in, old_out), _signature(mbs, inputs, outputs)
            if old_sig == new_sig:
                write_config = False
            elif not force:
                raise ModelCliError(
                    f"{config_file} describes another model: {_describe(old_sig)}; {onnx_path.name} has "
                    f"{_describe(new_sig)}. Choose another name, or --force to rewrite config.pbtxt "
                    "(older versions that do not fit it will then fail to load)"
                )
            else:
                warnings.append(f"{config_file} rewritten: its inputs/outputs were {_describe(old_sig)}")
    elif model_dir.exists() and any(model_dir.iterdir()) and not force:
        raise ModelCliError(f"{model_dir} exists without config.pbtxt; remove it or use --force")

    existing = _versions(model_dir)
    number = version if version is not None else (max(existing) + 1 if existing else 1)
    version_dir = model_dir / str(number)
    if version_dir.exists() and not force:
        raise ModelCliError(f"{version_dir} exists: choose another --version, or --force to replace it")

    stub = pipeline_stub(pipeline, name, onnx_inputs, onnx_outputs, batched, warnings)

    # Build beside the repository, then rename into it: a polling Triton sees whole folders only.
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository.parent))
    try:
        staged_version = staging / str(number)
        staged_version.mkdir()
        shutil.copyfile(onnx_path, staged_version / MODEL_FILE)
        if not model_dir.exists():
            (staging / "config.pbtxt").write_text(new_config, encoding="utf-8")
            staged_model = staging / "model"
            staged_model.mkdir()
            os.replace(staged_version, staged_model / str(number))
            os.replace(staging / "config.pbtxt", staged_model / "config.pbtxt")
            os.replace(staged_model, model_dir)
        else:
            if write_config:
                staged_config = staging / "config.pbtxt"
                staged_config.write_text(new_config, encoding="utf-8")
                os.replace(staged_config, config_file)
            if version_dir.exists():  # --force
                shutil.rmtree(version_dir)
            os.replace(staged_version, version_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    stub_file = None
    if stub_dir is not None:
        stub_dir.mkdir(parents=True, exist_ok=True)
        stub_file = stub_dir / f"{pipeline}.yaml.example"
        stub_file.write_text(stub, encoding="utf-8")
    return AddedModel(
        name=name,
        version=number,
        model_dir=model_dir,
        model_file=version_dir / MODEL_FILE,
        config_file=config_file,
        config_written=write_config,
        max_batch_size=mbs,
        inputs=inputs,
        outputs=outputs,
        pipeline=pipeline,
        stub=stub,
        stub_file=stub_file,
        warnings=tuple(warnings),
    )


def default_pipeline_name(model_name: str) -> str:
    text = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    return text if re.match(r"^[a-z]", text) else f"model-{text}".rstrip("-")


# --------------------------------------------------------------------------- pipeline stub


def pipeline_stub(
    pipeline: str,
    model_name: str,
    inputs: Sequence[OnnxTensor],
    outputs: Sequence[OnnxTensor],
    batched: bool,
    warnings: list[str],
) -> str:
    """A pipelines file with one pipeline for the model; ``TODO`` marks what a person must fill.

    The ``TODO`` placeholders sit where ``load_pipelines`` wants a mapping, so the stub is
    refused until they are filled.
    """
    image, result = inputs[0], outputs[0]
    if len(inputs) > 1:
        warnings.append(
            f"the model has {len(inputs)} inputs; a pipeline sends only one ({image.name}): "
            "the others need their own code"
        )
    # The worker sends one single-channel volume shaped [1, 1, z, y, x].
    shape: list[int] | str = TODO
    fits = len(image.shape) == 5 and image.shape[1] == 1 and (batched or image.shape[0] == 1)
    if fits and all(isinstance(d, int) for d in image.shape[2:]):
        shape = [int(d) for d in image.shape[2:]]
    elif not fits:
        warnings.append(
            f"input '{image.name}' is {list(image.shape)}; a pipeline sends one single-channel volume "
            "[batch, 1, slices, rows, columns]: this model needs other preprocessing"
        )
    if image.data_type != "TYPE_FP32":
        warnings.append(f"input '{image.name}' is {image.data_type}; a pipeline sends TYPE_FP32")
    classes = result.shape[1] if len(result.shape) == 5 and isinstance(result.shape[1], int) else None
    if classes is None or classes < 2:
        warnings.append(
            f"output '{result.name}' is {list(result.shape)}; a pipeline reads per-class scores "
            "[batch, classes, slices, rows, columns] with class 0 the background"
        )
    labels = range(1, classes) if classes is not None and classes >= 2 else range(1, 2)
    colours = [(230, 120, 50), (60, 160, 230), (120, 200, 80), (220, 200, 60), (170, 90, 200)]
    segments = [
        {
            "label": label,
            "name": TODO,
            "category": TODO,
            "type": TODO,
            "color": list(colours[(label - 1) % len(colours)]),
            "tracking_id": f"{pipeline}-{label}",
        }
        for label in labels
    ]
    entry: dict[str, Any] = {
        "name": pipeline,
        "version": "0.1.0",
        "enabled": False,
        "priority": 0,
        "description": f"model {model_name}",
        "algorithm_name": f"orthanc-ai {pipeline}",
        "model": {"name": model_name, "version": "", "input": image.name, "output": result.name},
        "inputs": [{"role": "image", "required": True, "where": TODO}],
        "preprocess": {"minmax": True, "shape": shape},
        "largest_component": True,
        "segments": segments,
        "outputs": {"seg": True, "sr": True, "fhir": True, "series_number": 9900},
    }
    body = yaml.safe_dump({"pipelines": [entry]}, sort_keys=False, default_flow_style=None, width=100)

    def fmt(t: OnnxTensor) -> str:
        return f"{t.name} {t.data_type} {list(t.shape)}"

    header = [
        f"# Pipeline stub for Triton model '{model_name}', written by `python -m orthanc_plugin model add`.",
        f"# Model input:  {fmt(image)}",
        f"# Model output: {fmt(result)}"
        + (f" (channel 0 background, 1..{classes - 1} the segments)" if classes and classes >= 2 else ""),
        "# Fill every TODO, then check it and copy the entry into config/pipelines.yaml:",
        f"#   .venv/bin/python -m orthanc_plugin check-config config/pipelines.d/{pipeline}.yaml.example",
        "# check-config refuses this stub until the TODOs are filled:",
        "#   inputs[0].where: DICOM attribute tests, e.g. {Modality: {equals: CT}, ImageCount: {min: 20}}",
        "#   segments[].name, .category, .type: e.g. category {value: '123037004', scheme: SCT,",
        "#     meaning: Anatomical Structure}, type {value: '39607008', scheme: SCT, meaning: Lung}",
        "#   preprocess: 'minmax: true' scales each volume to [0, 1]; for CT use 'window: [low, high]' (HU)",
        "#     instead, as the model was trained. shape is (slices, rows, columns) the model sees.",
        "#   enabled: false until the rules and segments are right.",
    ]
    return "\n".join(header) + "\n" + body


# --------------------------------------------------------------------------- list


def list_models(repository: Path = Path("triton_models")) -> list[ModelEntry]:
    """The model folders of a repository (those with a ``config.pbtxt``), sorted by name."""
    if not repository.is_dir():
        raise ModelCliError(f"model repository {repository} is not a folder")
    entries = []
    for d in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config = d / "config.pbtxt"
        if not config.is_file():
            continue
        versions = _versions(d)
        try:
            platform, mbs, inputs, outputs = read_config(config)
        except ModelCliError as e:
            entries.append(ModelEntry(d.name, versions, error=str(e)))
            continue
        entries.append(ModelEntry(d.name, versions, platform, mbs, inputs, outputs))
    return entries


def format_models(entries: Sequence[ModelEntry]) -> str:
    if not entries:
        return "no models"
    lines = []
    for e in entries:
        versions = ", ".join(map(str, e.versions)) or "none"
        if e.error is not None:
            lines.append(f"{e.name}  versions {versions}  ERROR {e.error}")
            continue
        lines.append(f"{e.name}  versions {versions}  {e.platform}  max_batch_size {e.max_batch_size}")
        batch = ["batch"] if e.max_batch_size > 0 else []
        for kind, tensors in (("input ", e.inputs), ("output", e.outputs)):
            for t in tensors:
                lines.append(f"  {kind} {t.name}  {t.data_type}  {batch + list(t.dims)}")
    return "\n".join(lines)
