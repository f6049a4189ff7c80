# SPDX-License-Identifier: AGPL-3.0-or-later
"""CPU stand-in for Triton's ``onnxruntime`` backend, as a Python-based backend.

Triton serves every model whose configuration names backend ``onnxruntime`` (which
``platform: "onnxruntime_onnx"`` implies) with the ``model.py`` found in
``<backend-directory>/onnxruntime/`` when no ``libtriton_onnxruntime.so`` is there. This file
is that ``model.py``: it lets the same ``config.pbtxt`` and ``<version>/model.onnx`` that
production Triton (NVIDIA's container, real ONNX Runtime/TensorRT backends) serves load
unchanged on a machine that only has the ``nvidia-pytriton`` wheel.

Behaviour
- Reads the model file ``<model dir>/<version>/<default_model_filename or model.onnx>``.
- Checks the ONNX graph against the configuration (names, data types, ranks, fixed dims)
  when the model loads, so a mismatch fails the load with a readable message.
- Runs ONNX Runtime with the CPU execution provider. Intra-op threads: model configuration
  parameter ``intra_op_thread_count`` (same key as the real backend), else the environment
  variable ``ORTHANC_AI_ORT_INTRA_OP_THREADS``, else the number of CPUs this process may
  use. ``inter_op_thread_count`` is honoured the same way (default 1).
- With ``max_batch_size > 0`` the requests of one ``execute`` call (dynamic batching) are
  concatenated along the batch axis, run once, and the results split back. Requests whose
  non-batch shapes differ are run in separate groups. If a batched run fails, each request
  of the group is retried alone so that one bad request cannot fail its neighbours.
- Every failure is answered with a ``TritonError`` on the request concerned; ``execute``
  itself never raises.
- Tensors cross the boundary with Triton's stub through ``as_numpy()`` / ``Tensor(name, array)``
  where that works, else through DLPack (``np.from_dlpack`` on the request's tensors,
  ``Tensor.from_dlpack`` for the outputs). The wheel's stubs were built against numpy 1.x: with
  numpy 2 (the only numpy for Python 3.13) the numpy path gives zero-filled inputs and empty
  outputs without any error, while with numpy 1.26 the stub's DLPack capsules upset numpy's
  (the stub dies). So numpy 1.x takes the numpy path and numpy 2 DLPack (logged when a model
  loads). Strings (``TYPE_STRING``) cannot cross DLPack: on the DLPack path a model with
  string tensors fails to load with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

ENV_INTRA_OP_THREADS = "ORTHANC_AI_ORT_INTRA_OP_THREADS"
ENV_INTER_OP_THREADS = "ORTHANC_AI_ORT_INTER_OP_THREADS"

# Triton configuration data type -> (numpy dtype, ONNX Runtime type string).
_TYPES: dict[str, tuple[Any, str]] = {
    "TYPE_BOOL": (np.bool_, "tensor(bool)"),
    "TYPE_UINT8": (np.uint8, "tensor(uint8)"),
    "TYPE_UINT16": (np.uint16, "tensor(uint16)"),
    "TYPE_UINT32": (np.uint32, "tensor(uint32)"),
    "TYPE_UINT64": (np.uint64, "tensor(uint64)"),
    "TYPE_INT8": (np.int8, "tensor(int8)"),
    "TYPE_INT16": (np.int16, "tensor(int16)"),
    "TYPE_INT32": (np.int32, "tensor(int32)"),
    "TYPE_INT64": (np.int64, "tensor(int64)"),
    "TYPE_FP16": (np.float16, "tensor(float16)"),
    "TYPE_FP32": (np.float32, "tensor(float)"),
    "TYPE_FP64": (np.float64, "tensor(double)"),
    "TYPE_STRING": (np.object_, "tensor(string)"),
}


class _Spec:
    """One configured input or output."""

    def __init__(self, entry: dict[str, Any], batched: bool, kind: str, model: str) -> None:
        self.name: str = entry["name"]
        self.data_type: str = entry.get("data_type", "TYPE_INVALID")
        if self.data_type not in _TYPES:
            raise pb_utils.TritonModelException(
                f"model '{model}': {kind} '{self.name}' has data type {self.data_type}, which the "
                f"CPU stand-in onnxruntime backend does not support (supported: {', '.join(_TYPES)})"
            )
        self.dtype: Any = np.dtype(_TYPES[self.data_type][0])
        self.ort_type: str = _TYPES[self.data_type][1]
        dims = entry.get("reshape", {}).get("shape") if kind == "input" else None
        if dims:
            raise pb_utils.TritonModelException(
                f"model '{model}': {kind} '{self.name}' uses 'reshape', which the CPU stand-in "
                "onnxruntime backend does not support"
            )
        self.dims: tuple[int, ...] = tuple(int(d) for d in entry.get("dims", []))
        # Shape as the ONNX graph sees it: with the batch axis when the model batches.
        self.full_dims: tuple[int, ...] = ((-1,) if batched else ()) + self.dims


def _parameter(config: dict[str, Any], key: str) -> str | None:
    value = config.get("parameters", {}).get(key)
    if isinstance(value, dict):
        text = value.get("string_value")
        return str(text) if text not in (None, "") else None
    return None


def _thread_count(config: dict[str, Any], key: str, env: str, default: int) -> int:
    for source, text in ((f"parameter '{key}'", _parameter(config, key)), (env, os.environ.get(env))):
        if text is None or text.strip() == "":
            continue
        try:
            count = int(text)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"{source} must be an integer, got {text!r}") from exc
        if count < 0:
            raise pb_utils.TritonModelException(f"{source} must be >= 0, got {count}")
        return count if count > 0 else default
    return default


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _error(message: str) -> Any:
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)


def _internal_error(message: str) -> Any:
    code = getattr(pb_utils.TritonError, "INTERNAL", None)
    if code is None:
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, code)


def stub_numpy_abi_matches() -> bool:
    """Whether this numpy has the ABI the wheel's stubs were built against (numpy 1.x).

    numpy 2 changed the C layout of dtypes: the stubs then misread every array they get from
    or hand to numpy, with no error (checked: zero-filled inputs, 0-byte outputs). A round trip
    inside this process cannot show it (the array never leaves Python), hence the ABI version.
    """
    return int(np.__version__.split(".")[0]) < 2


def _input_array(tensor: Any, spec: _Spec, dlpack: bool) -> np.ndarray:
    """The request tensor as a numpy array (see the module docstring)."""
    if not dlpack or spec.data_type == "TYPE_STRING":
        return np.asarray(tensor.as_numpy())
    return np.from_dlpack(tensor)


def _output_tensor(name: str, array: np.ndarray, spec: _Spec, dlpack: bool) -> Any:
    """A response tensor made from ``array`` (see the module docstring)."""
    if not dlpack or spec.data_type == "TYPE_STRING":
        return pb_utils.Tensor(name, array)
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array))


class TritonPythonModel:
    """Serves one ONNX model instance with ONNX Runtime on CPU."""

    def initialize(self, args: dict[str, str]) -> None:
        config: dict[str, Any] = json.loads(args["model_config"])
        self.model_name: str = args.get("model_name", config.get("name", "?"))
        self.max_batch_size: int = int(config.get("max_batch_size", 0))
        batched = self.max_batch_size > 0
        self.inputs = [_Spec(e, batched, "input", self.model_name) for e in config.get("input", [])]
        self.outputs = [_Spec(e, batched, "output", self.model_name) for e in config.get("output", [])]
        if not self.inputs or not self.outputs:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': config.pbtxt must list its inputs and outputs "
                "(the CPU stand-in onnxruntime backend does not auto-complete configurations)"
            )
        self.output_by_name = {o.name: o for o in self.outputs}
        self.dlpack = not stub_numpy_abi_matches()
        if self.dlpack and any(s.data_type == "TYPE_STRING" for s in self.inputs + self.outputs):
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': string tensors need the stub's numpy path, which does not "
                f"work with numpy {np.__version__} in this environment"
            )

        filename = config.get("default_model_filename") or "model.onnx"
        model_path = Path(args["model_repository"]) / str(args["model_version"]) / filename
        if not model_path.is_file():
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': model file {model_path} not found"
            )

        cpus = _cpu_count()
        options = ort.SessionOptions()
        options.intra_op_num_threads = _thread_count(
            config, "intra_op_thread_count", ENV_INTRA_OP_THREADS, cpus
        )
        options.inter_op_num_threads = _thread_count(config, "inter_op_thread_count", ENV_INTER_OP_THREADS, 1)
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ONNX Runtime raises several exception types
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': ONNX Runtime cannot load {model_path}: {exc}"
            ) from exc
        self._check_against_graph()
        self.intra_op_threads = options.intra_op_num_threads
        pb_utils.Logger.log_info(
            f"onnxruntime stand-in: model '{self.model_name}' version {args['model_version']} loaded "
            f"from {model_path} (CPU, intra_op_threads={options.intra_op_num_threads}, "
            f"max_batch_size={self.max_batch_size}, tensors via {'DLPack' if self.dlpack else 'numpy'}, "
            f"numpy {np.__version__})"
        )

    def _check_against_graph(self) -> None:
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        graph_outputs = {o.name: o for o in self.session.get_outputs()}
        for kind, specs, graph in (
            ("input", self.inputs, graph_inputs),
            ("output", self.outputs, graph_outputs),
        ):
            for spec in specs:
                node = graph.get(spec.name)
                if node is None:
                    raise pb_utils.TritonModelException(
                        f"model '{self.model_name}': configured {kind} '{spec.name}' is not in the ONNX "
                        f"graph, whose {kind}s are {sorted(graph)}"
                    )
                if node.type != spec.ort_type:
                    raise pb_utils.TritonModelException(
                        f"model '{self.model_name}': {kind} '{spec.name}' is {spec.data_type} in "
                        f"config.pbtxt but {node.type} in the ONNX graph"
                    )
                graph_shape = list(node.shape) if node.shape is not None else None
                if graph_shape is None:
                    continue
                if len(graph_shape) != len(spec.full_dims):
                    raise pb_utils.TritonModelException(
                        f"model '{self.model_name}': {kind} '{spec.name}' has shape {graph_shape} in the "
                        f"ONNX graph but {list(spec.full_dims)} from config.pbtxt (max_batch_size="
                        f"{self.max_batch_size} adds the batch axis)"
                    )
                for axis, (g, c) in enumerate(zip(graph_shape, spec.full_dims, strict=True)):
                    fixed = isinstance(g, int) and g >= 0
                    if axis == 0 and self.max_batch_size > 0:
                        if fixed and not (g == 1 and self.max_batch_size == 1):
                            raise pb_utils.TritonModelException(
                                f"model '{self.model_name}': {kind} '{spec.name}' has a fixed batch axis "
                                f"of {g} in the ONNX graph but max_batch_size is {self.max_batch_size}: "
                                "export the model with a dynamic batch axis"
                            )
                        continue
                    if fixed and c >= 0 and g != c:
                        raise pb_utils.TritonModelException(
                            f"model '{self.model_name}': {kind} '{spec.name}' has shape {graph_shape} in "
                            f"the ONNX graph but {list(spec.full_dims)} from config.pbtxt"
                        )
        missing = [name for name in graph_inputs if name not in {s.name for s in self.inputs}]
        if missing:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': ONNX graph inputs {missing} are not listed in config.pbtxt"
            )

    # -- execution ---------------------------------------------------------------------------

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        prepared: list[tuple[int, dict[str, np.ndarray], list[str]]] = []
        for index, request in enumerate(requests):
            try:
                feeds, wanted = self._read_request(request)
            except ValueError as exc:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=_error(str(exc)))
                continue
            except Exception as exc:  # unreadable request: answer it, keep serving the others
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[],
                    error=_internal_error(f"model '{self.model_name}': cannot read the request: {exc}"),
                )
                continue
            prepared.append((index, feeds, wanted))

        failure = "request was not executed"
        try:
            if self.max_batch_size > 0:
                groups: dict[tuple[Any, ...], list[tuple[int, dict[str, np.ndarray], list[str]]]] = {}
                for item in prepared:
                    key = tuple((name, item[1][name].shape[1:]) for name in sorted(item[1]))
                    groups.setdefault(key, []).append(item)
                for group in groups.values():
                    self._run_group(group, responses)
            else:
                for item in prepared:
                    self._run_group([item], responses)
        except Exception as exc:  # a bug here must not take the other requests down with it
            failure = f"model '{self.model_name}': internal error in the onnxruntime stand-in: {exc!r}"

        for index, response in enumerate(responses):
            if response is None:  # every request gets an answer
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[], error=_internal_error(failure)
                )
        return responses

    def _read_request(self, request: Any) -> tuple[dict[str, np.ndarray], list[str]]:
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is None:
                raise ValueError(f"model '{self.model_name}': request has no input '{spec.name}'")
            array = _input_array(tensor, spec, self.dlpack)
            if spec.data_type == "TYPE_STRING":
                array = np.vectorize(
                    lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v), otypes=[object]
                )(array)
            elif array.dtype != spec.dtype:
                raise ValueError(
                    f"model '{self.model_name}': input '{spec.name}' must be {spec.data_type}, "
                    f"got {array.dtype}"
                )
            if self.max_batch_size > 0 and (array.ndim == 0 or array.shape[0] > self.max_batch_size):
                raise ValueError(
                    f"model '{self.model_name}': input '{spec.name}' has shape {list(array.shape)}; "
                    f"the batch axis must be between 1 and max_batch_size={self.max_batch_size}"
                )
            feeds[spec.name] = array
        sizes = {a.shape[0] for a in feeds.values()} if self.max_batch_size > 0 else set()
        if len(sizes) > 1:
            raise ValueError(f"model '{self.model_name}': inputs disagree on the batch size: {sorted(sizes)}")
        requested = getattr(request, "requested_output_names", None)
        wanted = list(requested()) if callable(requested) else []
        if not wanted:
            wanted = [o.name for o in self.outputs]
        unknown = [n for n in wanted if n not in self.output_by_name]
        if unknown:
            raise ValueError(f"model '{self.model_name}': unknown output(s) {unknown}")
        return feeds, wanted

    def _run_group(
        self, group: list[tuple[int, dict[str, np.ndarray], list[str]]], responses: list[Any]
    ) -> None:
        names = [o.name for o in self.outputs if any(o.name in item[2] for item in group)]
        batched = len(group) > 1
        try:
            if batched:
                feeds = {n: np.concatenate([item[1][n] for item in group], axis=0) for n in group[0][1]}
                total = sum(next(iter(item[1].values())).shape[0] for item in group)
            else:
                feeds = group[0][1]
            results = self.session.run(names, feeds)
            if batched and any(np.ndim(r) == 0 or np.shape(r)[0] != total for r in results):
                raise ValueError("an output does not keep the batch axis; cannot split it back")
        except Exception as exc:  # ONNX Runtime raises several exception types
            if batched:
                for item in group:  # run alone: isolates the failing request(s)
                    self._run_group([item], responses)
                return
            responses[group[0][0]] = pb_utils.InferenceResponse(
                output_tensors=[],
                error=_internal_error(f"model '{self.model_name}': ONNX Runtime failed: {exc}"),
            )
            return

        offset = 0
        for index, feed, wanted in group:
            batch = next(iter(feed.values())).shape[0] if self.max_batch_size > 0 else 0
            try:
                tensors = []
                for name, value in zip(names, results, strict=True):
                    if name not in wanted:
                        continue
                    part = value[offset : offset + batch] if batched else value
                    tensors.append(
                        _output_tensor(
                            name, self._as_output(name, part), self.output_by_name[name], self.dlpack
                        )
                    )
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            except Exception as exc:  # keep answering the other requests
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[],
                    error=_internal_error(f"model '{self.model_name}': cannot build the response: {exc}"),
                )
            offset += batch

    def _as_output(self, name: str, value: Any) -> np.ndarray:
        spec = self.output_by_name[name]
        array = np.asarray(value)
        if spec.data_type == "TYPE_STRING":
            return np.vectorize(lambda v: v.encode("utf-8") if isinstance(v, str) else v, otypes=[object])(
                array
            )
        if array.dtype != spec.dtype:
            array = array.astype(spec.dtype)
        return np.ascontiguousarray(array)

    def finalize(self) -> None:
        self.session = None
