# SPDX-License-Identifier: AGPL-3.0-or-later
"""Triton Inference Server client for the AI workers.

- gRPC only, tensors always travel as binary (``raw_input_contents``/``raw_output_contents``);
  JSON tensors are never used.
- When Triton runs on the same host (URL host ``127.0.0.1``/``localhost``/``::1``) inputs and
  outputs go through POSIX system shared memory instead of the socket. Regions are created
  by this module under ``/dev/shm``, registered with Triton, reused while they are big enough
  and grown when not. Right after Triton has mapped a region its name is unlinked, so a
  crashed process leaks no file in ``/dev/shm``; only Triton's mapping stays until the
  region is unregistered (``close()``, process exit, or the next client of this host that
  finds the owner process dead). If the server refuses shared memory (remote server,
  other user, separate IPC namespace), the client logs it once and falls back to plain
  binary gRPC.
- Errors surface as :class:`InferenceError` with a message an administrator can act on
  and a ``retryable`` flag for the job queue.

The module creates shared memory itself (``os.open`` on ``/dev/shm`` + ``mmap``) rather than
through ``tritonclient.utils.shared_memory``: that helper uses ``multiprocessing.shared_memory``,
whose resource tracker spawns ``sys.executable`` (``/usr/sbin/Orthanc`` inside the plugin) and
unlinks regions behind our back at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import mmap
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from orthanc_plugin.core.processes import pid_alive

log = logging.getLogger(__name__)

__all__ = ["InferenceError", "ModelInfo", "TensorSpec", "TritonClient"]

Array = npt.NDArray[Any]

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
_SHM_DIR = "/dev/shm"
_ALIGN = 64
_MIB = 1 << 20
_INFO_TTL_S = 5.0

# Triton datatype <-> numpy dtype (BYTES handled separately: object arrays).
_TRITON_TO_NUMPY: dict[str, type[Any]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
_NUMPY_TO_TRITON: dict[np.dtype[Any], str] = {
    np.dtype(t): name for name, t in _TRITON_TO_NUMPY.items() if name != "BYTES"
}


class InferenceError(RuntimeError):
    """Inference failed; ``str(error)`` is meant for an administrator.

    ``retryable`` is True when trying again later may succeed (server unreachable, model
    loading or unloading, timeout), False when the request itself is wrong.
    """

    def __init__(
        self, message: str, *, retryable: bool = False, status: str | None = None, model: str | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.model = model


@dataclass(frozen=True)
class TensorSpec:
    """An input or output as Triton serves it. ``shape`` includes the batch axis (-1) when
    the model batches; -1 marks any other variable dimension too."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(_TRITON_TO_NUMPY.get(self.datatype, np.object_))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    """The version that serves requests: the one asked for, else the highest ready version."""
    platform: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ready_versions: tuple[str, ...] = field(default=())

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


# -- shared memory -------------------------------------------------------------------------------


class _ShmRegion:
    """A POSIX shared memory object mapped in this process and registered with Triton."""

    def __init__(self, name: str, key: str, size: int) -> None:
        self.name = name
        self.key = key  # shm_open() name, "/..."
        self.size = size
        self.registered = False
        self._path = os.path.join(_SHM_DIR, key.lstrip("/"))
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self.buffer = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            self.unlink()
            raise
        os.close(fd)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)

    def view(self, dtype: np.dtype[Any], shape: Sequence[int], offset: int) -> Array:
        count = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        return np.frombuffer(self.buffer, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))

    def close(self) -> None:
        self.unlink()
        with contextlib.suppress(BufferError, ValueError):
            self.buffer.close()


class _ShmSlot:
    """Input and output regions used by one request at a time."""

    def __init__(self) -> None:
        self.inputs: _ShmRegion | None = None
        self.outputs: _ShmRegion | None = None


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _host_of(url: str) -> str:
    text = url.split("://", 1)[-1]
    if text.startswith("["):
        return text[: text.index("]") + 1] if "]" in text else text
    return text.rsplit(":", 1)[0] if ":" in text else text


_LIVE_CLIENTS: weakref.WeakSet[TritonClient] = weakref.WeakSet()
_HOST_TAG = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
_NAME_PREFIX = "orthanc-ai-"
_client_ids = itertools.count(1)


@atexit.register
def _close_all_clients() -> None:
    for client in list(_LIVE_CLIENTS):
        with contextlib.suppress(Exception):
            client.close()


# -- client --------------------------------------------------------------------------------------


class TritonClient:
    """Synchronous Triton client over gRPC with binary tensors and optional system shared memory.

    Thread-safe: concurrent ``infer`` calls each take their own pair of shared memory regions,
    so Triton's dynamic batcher can group them.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        use_shared_memory: bool | None = None,
        timeout_s: float = 120,
        *,
        tls: bool = False,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
    ) -> None:
        """``tls``: gRPC over TLS, checked against ``tls_ca`` (PEM file; None: the system's CAs);
        ``tls_cert``/``tls_key``: PEM files of a client certificate for mutual TLS."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if not tls and (tls_ca is not None or tls_cert is not None):
            raise ValueError("tls_ca/tls_cert given without tls=True")
        self.tls = bool(tls)
        self.url = url.split("://", 1)[-1]
        self.timeout_s = float(timeout_s)
        local = _host_of(self.url).lower() in _LOCAL_HOSTS
        self.use_shared_memory: bool = local if use_shared_memory is None else bool(use_shared_memory)
        self._shm_ok = self.use_shared_memory and os.path.isdir(_SHM_DIR)
        self._shm_warned = False
        self._swept = False
        self._client = grpcclient.InferenceServerClient(
            url=self.url,
            channel_args=_channel_args(),
            ssl=self.tls,
            root_certificates=os.fspath(tls_ca) if tls_ca is not None else None,
            certificate_chain=os.fspath(tls_cert) if tls_cert is not None else None,
            private_key=os.fspath(tls_key) if tls_key is not None else None,
        )
        self._lock = threading.Lock()
        self._free_slots: list[_ShmSlot] = []
        self._all_slots: list[_ShmSlot] = []
        self._serial = itertools.count(1)
        self._pid = os.getpid()
        self._id = f"{_HOST_TAG}-{self._pid}-{next(_client_ids)}"
        self._info_cache: dict[tuple[str, str], tuple[float, ModelInfo]] = {}
        self._closed = False
        _LIVE_CLIENTS.add(self)

    # -- public API ---------------------------------------------------------------------------

    @property
    def shared_memory_active(self) -> bool:
        """True while requests go through shared memory (False after a fallback)."""
        return self._shm_ok

    def is_ready(self) -> bool:
        """True when the server answers and reports itself ready (all models loaded)."""
        try:
            return bool(self._client.is_server_ready(client_timeout=min(self.timeout_s, 5.0)))
        except InferenceServerException:
            return False

    def model_info(self, name: str, version: str = "") -> ModelInfo:
        """Metadata and configuration of a model as served (``version`` "" = what Triton serves)."""
        what = self._what(name, version)
        try:
            meta = self._client.get_model_metadata(
                name, model_version=version, as_json=True, client_timeout=self.timeout_s
            )
            ready = tuple(sorted((str(v) for v in meta.get("versions", [])), key=_version_key))
            served = version or (ready[-1] if ready else "")
            config = self._client.get_model_config(
                name, model_version=served, as_json=True, client_timeout=self.timeout_s
            )["config"]
        except InferenceServerException as exc:
            raise self._error(exc, what) from None

        def specs(entries: Sequence[Mapping[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(str(e["name"]), str(e["datatype"]), tuple(int(d) for d in e.get("shape", [])))
                for e in entries
            )

        info = ModelInfo(
            name=str(meta.get("name", name)),
            version=served,
            platform=str(meta.get("platform", config.get("platform", ""))),
            backend=str(config.get("backend", "")),
            max_batch_size=int(config.get("max_batch_size", 0)),
            inputs=specs(meta.get("inputs", [])),
            outputs=specs(meta.get("outputs", [])),
            ready_versions=ready,
        )
        with self._lock:
            self._info_cache[(name, version)] = (time.monotonic(), info)
        return info

    def infer(
        self,
        name: str,
        inputs: Mapping[str, Array],
        output_names: Sequence[str],
        version: str = "",
        timeout_s: float | None = None,
    ) -> dict[str, Array]:
        """Run one request; returns the requested outputs as numpy arrays owned by the caller.

        ``timeout_s`` overrides the client's timeout for this request (large models on CPU)."""
        if self._closed:
            raise InferenceError("TritonClient is closed")
        if os.getpid() != self._pid:
            raise InferenceError("a TritonClient cannot be used across fork(): create one in each process")
        info = self._cached_info(name, version)
        arrays = self._check_request(info, inputs, output_names)
        try:
            return self._infer_once(info, arrays, output_names, version, timeout_s)
        except _StaleState:
            # The model was reloaded with another signature, or Triton restarted and forgot our
            # shared memory regions: refresh what we know and try once more.
            with self._lock:
                self._info_cache.pop((name, version), None)
            info = self.model_info(name, version)
            arrays = self._check_request(info, inputs, output_names)
            return self._infer_once(info, arrays, output_names, version, timeout_s)

    def close(self) -> None:
        """Unregister and destroy the shared memory regions and close the channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:  # a forked child must not unregister its parent's regions
            _LIVE_CLIENTS.discard(self)
            return
        with self._lock:
            slots, self._all_slots, self._free_slots = self._all_slots, [], []
        for slot in slots:
            for region in (slot.inputs, slot.outputs):
                if region is not None:
                    self._drop_region(region)
        with contextlib.suppress(Exception):
            self._client.close()
        _LIVE_CLIENTS.discard(self)

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- request checks -----------------------------------------------------------------------

    def _cached_info(self, name: str, version: str) -> ModelInfo:
        with self._lock:
            cached = self._info_cache.get((name, version))
        if cached is not None and time.monotonic() - cached[0] < _INFO_TTL_S:
            return cached[1]
        return self.model_info(name, version)

    def _check_request(
        self, info: ModelInfo, inputs: Mapping[str, Array], output_names: Sequence[str]
    ) -> dict[str, Array]:
        model = f"model '{info.name}' version {info.version}"
        expected = {spec.name: spec for spec in info.inputs}
        unknown = sorted(set(inputs) - set(expected))
        missing = sorted(set(expected) - set(inputs))
        if unknown or missing:
            raise InferenceError(
                f"{model} takes inputs {sorted(expected)}; got {sorted(inputs)}"
                + (f" (unknown: {unknown})" if unknown else "")
                + (f" (missing: {missing})" if missing else ""),
                model=info.name,
            )
        known_outputs = {spec.name for spec in info.outputs}
        bad_outputs = [n for n in output_names if n not in known_outputs]
        if bad_outputs or not output_names:
            raise InferenceError(
                f"{model} has outputs {sorted(known_outputs)}; requested {list(output_names)}",
                model=info.name,
            )
        arrays: dict[str, Array] = {}
        batch_sizes = set()
        for name, value in inputs.items():
            spec = expected[name]
            array = np.asarray(value)
            if spec.datatype == "BYTES":
                if array.dtype.kind not in "OSU":
                    raise InferenceError(
                        f"input '{name}' of {model} is BYTES; got a {array.dtype} array", model=info.name
                    )
            elif array.dtype != spec.dtype:
                raise InferenceError(
                    f"input '{name}' of {model} must be {spec.datatype} ({spec.dtype}); got {array.dtype}",
                    model=info.name,
                )
            shape = tuple(int(d) for d in array.shape)
            fits = len(shape) == len(spec.shape) and all(
                w < 0 or w == g for w, g in zip(spec.shape, shape, strict=False)
            )
            if not fits:
                hint = (
                    f"; the first axis is the batch (1..{info.max_batch_size})"
                    if info.max_batch_size > 0
                    else ""
                )
                raise InferenceError(
                    f"input '{name}' of {model} has shape {list(shape)}; the model expects "
                    f"{list(spec.shape)} (-1 = any size){hint}",
                    model=info.name,
                )
            if info.max_batch_size > 0:
                batch_sizes.add(shape[0])
                if not 1 <= shape[0] <= info.max_batch_size:
                    raise InferenceError(
                        f"input '{name}' of {model} has a batch of {shape[0]}; the model accepts "
                        f"1 to {info.max_batch_size} per request",
                        model=info.name,
                    )
            arrays[name] = np.ascontiguousarray(array)
        if len(batch_sizes) > 1:
            raise InferenceError(
                f"inputs of {model} disagree on the batch size: {sorted(batch_sizes)}", model=info.name
            )
        return arrays

    # -- the call ----------------------------------------------------------------------------------

    def _infer_once(
        self,
        info: ModelInfo,
        arrays: dict[str, Array],
        output_names: Sequence[str],
        version: str,
        timeout_s: float | None = None,
    ) -> dict[str, Array]:
        slot = self._acquire_slot() if self._shm_ok else None
        try:
            infer_inputs, infer_outputs, out_offsets = self._build(info, arrays, output_names, slot)
            try:
                result = self._client.infer(
                    info.name,
                    infer_inputs,
                    model_version=version,
                    outputs=infer_outputs,
                    client_timeout=timeout_s or self.timeout_s,
                )
            except InferenceServerException as exc:
                error = self._error(exc, self._what(info.name, version))
                message = str(exc.message() or "").lower()
                if "shared memory" in message and slot is not None:
                    self._forget_all_slots(slot)
                    slot = None
                    raise _StaleState(str(error), status=error.status, model=error.model) from None
                if "unexpected shape" in message or "data-type" in message:
                    raise _StaleState(str(error), status=error.status, model=error.model) from None
                raise error from None
            outputs: dict[str, Array] = {}
            for name in output_names:
                if name in out_offsets and slot is not None and slot.outputs is not None:
                    tensor = result.get_output(name)
                    if tensor is None:
                        raise InferenceError(f"Triton returned no output '{name}' for model '{info.name}'")
                    shape = [int(d) for d in tensor.shape]
                    dtype = np.dtype(_TRITON_TO_NUMPY[str(tensor.datatype)])
                    outputs[name] = slot.outputs.view(dtype, shape, out_offsets[name]).copy()
                else:
                    value = result.as_numpy(name)
                    if value is None:
                        raise InferenceError(f"Triton returned no output '{name}' for model '{info.name}'")
                    outputs[name] = value
            return outputs
        finally:
            if slot is not None:
                self._release_slot(slot)

    def _build(
        self,
        info: ModelInfo,
        arrays: dict[str, Array],
        output_names: Sequence[str],
        slot: _ShmSlot | None,
    ) -> tuple[list[Any], list[Any], dict[str, int]]:
        infer_inputs: list[Any] = []
        shm_inputs: dict[str, int] = {}
        offset = 0
        for name, array in arrays.items():
            datatype = info.input(name).datatype
            infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
            if slot is not None and datatype != "BYTES":
                shm_inputs[name] = offset
                offset = _round_up(offset + array.nbytes, _ALIGN)
            else:
                infer_input.set_data_from_numpy(array if datatype != "BYTES" else array.astype(np.object_))
            infer_inputs.append(infer_input)

        out_offsets: dict[str, int] = {}
        out_sizes: dict[str, int] = {}
        if slot is not None:
            batch = next(iter(arrays.values())).shape[0] if info.max_batch_size > 0 and arrays else None
            out_offset = 0
            for name in output_names:
                spec = info.output(name)
                size = _expected_nbytes(spec, batch)
                if size is None:
                    continue  # variable shape: cannot size the region up front, send it on the socket
                out_offsets[name], out_sizes[name] = out_offset, size
                out_offset = _round_up(out_offset + size, _ALIGN)
            try:
                if shm_inputs:
                    region = self._ensure_region(slot, "inputs", offset)
                    for infer_input in infer_inputs:
                        name = infer_input.name()
                        if name in shm_inputs:
                            array = arrays[name]
                            region.view(array.dtype, array.shape, shm_inputs[name])[...] = array
                            infer_input.set_shared_memory(region.name, array.nbytes, shm_inputs[name])
                if out_offsets:
                    self._ensure_region(slot, "outputs", out_offset)
            except _ShmRefused:
                # Fallback for this and all later calls: plain binary gRPC.
                return self._build(info, arrays, output_names, None)

        infer_outputs: list[Any] = []
        for name in output_names:
            requested = grpcclient.InferRequestedOutput(name)
            if name in out_offsets and slot is not None and slot.outputs is not None:
                requested.set_shared_memory(slot.outputs.name, out_sizes[name], out_offsets[name])
            infer_outputs.append(requested)
        return infer_inputs, infer_outputs, out_offsets

    # -- shared memory management ------------------------------------------------------------------

    def _acquire_slot(self) -> _ShmSlot:
        with self._lock:
            if self._free_slots:
                return self._free_slots.pop()
            slot = _ShmSlot()
            self._all_slots.append(slot)
            return slot

    def _release_slot(self, slot: _ShmSlot) -> None:
        with self._lock:
            if slot in self._all_slots and not self._closed:
                self._free_slots.append(slot)
                return
        for region in (slot.inputs, slot.outputs):  # closed meanwhile
            if region is not None:
                self._drop_region(region)

    def _forget_all_slots(self, current: _ShmSlot) -> None:
        """Triton no longer knows our regions (e.g. it restarted): drop every slot; slots in use
        by other threads are dropped when they are released."""
        with self._lock:
            free, self._free_slots = self._free_slots, []
            self._all_slots = []
        for slot in [current, *free]:
            for region in (slot.inputs, slot.outputs):
                if region is not None:
                    self._drop_region(region)

    def _ensure_region(self, slot: _ShmSlot, which: str, needed: int) -> _ShmRegion:
        current: _ShmRegion | None = getattr(slot, which)
        if current is not None and current.size >= needed:
            return current
        if not self._shm_ok:
            raise _ShmRefused()
        if not self._swept:
            self._swept = True
            self._sweep_dead_registrations()
        size = _round_up(max(needed, _MIB, int(current.size * 1.5) if current else 0), _MIB)
        if current is not None:
            setattr(slot, which, None)
            self._drop_region(current)
        serial = next(self._serial)
        name = f"{_NAME_PREFIX}{self._id}-{serial}"
        key = f"/orthanc_ai_{self._id.replace('-', '_')}_{serial}"
        try:
            region = _ShmRegion(name, key, size)
        except OSError as exc:
            self._refuse_shm(f"cannot create {size} bytes of shared memory in {_SHM_DIR}: {exc}")
            raise _ShmRefused() from None
        try:
            self._client.register_system_shared_memory(
                name, key, size, client_timeout=min(self.timeout_s, 30.0)
            )
        except InferenceServerException as exc:
            region.close()
            if _is_unreachable(exc):
                raise self._error(exc, f"Triton at {self.url}") from None
            self._refuse_shm(f"Triton at {self.url} refused system shared memory: {exc.message()}")
            raise _ShmRefused() from None
        region.registered = True
        # Triton has mapped it: drop the name so that nothing is left in /dev/shm if we crash.
        region.unlink()
        setattr(slot, which, region)
        return region

    def _drop_region(self, region: _ShmRegion) -> None:
        if region.registered:
            # As long as registering may take: a busy Triton (it runs niced) answered a 5 s
            # deadline too late under load and the region stayed registered, silently.
            try:
                self._client.unregister_system_shared_memory(
                    region.name, client_timeout=min(self.timeout_s, 30.0)
                )
            except Exception as exc:  # noqa: BLE001 - closing goes on; the sweep catches what is left
                gone = isinstance(exc, InferenceServerException) and _is_unreachable(exc)
                if not gone:  # a Triton that is gone has dropped it already
                    log.warning(
                        "could not unregister shared memory region %s from Triton at %s: %s "
                        "(unregistered when this process has exited, by the next client of this host)",
                        region.name, self.url, exc,
                    )  # fmt: skip
            region.registered = False
        region.close()

    def _refuse_shm(self, reason: str) -> None:
        self._shm_ok = False
        if not self._shm_warned:
            self._shm_warned = True
            log.warning("%s; falling back to binary gRPC without shared memory", reason)

    def _sweep_dead_registrations(self) -> None:
        """Unregister regions left in Triton by dead processes of this host (crashed workers)."""
        try:
            status = self._client.get_system_shared_memory_status(as_json=True, client_timeout=5.0)
        except InferenceServerException:
            return
        regions = status.get("regions", {})
        entries = regions.values() if isinstance(regions, dict) else regions
        pattern = re.compile(rf"^{re.escape(_NAME_PREFIX)}{re.escape(_HOST_TAG)}-(\d+)-\d+-\d+$")
        for entry in entries:
            name = str(entry.get("name", ""))
            match = pattern.match(name)
            if match and not pid_alive(int(match.group(1))):
                with contextlib.suppress(InferenceServerException):
                    self._client.unregister_system_shared_memory(name, client_timeout=5.0)
                    log.info("unregistered shared memory region %s of a dead process", name)

    # -- errors ------------------------------------------------------------------------------------

    def _what(self, name: str, version: str) -> str:
        return f"model '{name}'" + (f" version {version}" if version else "")

    def _error(self, exc: InferenceServerException, what: str) -> InferenceError:
        status = str(exc.status() or "")
        message = str(exc.message() or exc)
        model = what.split("'")[1] if what.count("'") >= 2 else None
        if _is_unreachable(exc):
            return InferenceError(
                f"Triton server unreachable at {self.url} ({message}); is it running? "
                "(`make up` starts the local one)"
                + (
                    "; a closed socket can also mean TLS settings that do not match the server's "
                    "(TritonTls, client certificate)"
                    if "socket closed" in message.lower()
                    else ""
                ),
                retryable=True,
                status=status,
                model=model,
            )
        if "Deadline Exceeded" in message or status.endswith("DEADLINE_EXCEEDED"):
            return InferenceError(
                f"Triton at {self.url} did not answer for {what} within {self.timeout_s:g} s",
                retryable=True,
                status=status,
                model=model,
            )
        if (
            "is not found" in message
            or status.endswith("NOT_FOUND")
            or "has no available versions" in message
        ):
            # While Triton stops (or swaps versions) it unloads models before closing its
            # endpoints: "no available versions" then is a passing state, not a wrong request.
            transient = "has no available versions" in message or not self.is_ready()
            return InferenceError(
                f"{what} is not available on Triton at {self.url}: {message}. Check the model "
                "repository (config.pbtxt, version folders) and the Triton log",
                retryable=transient,
                status=status,
                model=model,
            )
        if "not at ready state" in message or "not ready" in message or status.endswith("UNAVAILABLE"):
            return InferenceError(
                f"{what} is not ready on Triton at {self.url} (loading, unloading, not kept by its "
                f"version policy, or failed to load): {message}",
                retryable=True,
                status=status,
                model=model,
            )
        return InferenceError(f"Triton at {self.url} rejected {what}: {message}", status=status, model=model)


class _ShmRefused(Exception):
    pass


class _StaleState(InferenceError):
    """The server disagrees with what this client cached; refreshed and retried once."""


def _is_unreachable(exc: InferenceServerException) -> bool:
    status = str(exc.status() or "")
    message = str(exc.message() or "")
    return status.endswith("UNAVAILABLE") and (
        "failed to connect" in message.lower()
        or "connection refused" in message.lower()
        or "dns resolution failed" in message.lower()
        or "socket closed" in message.lower()
        or "connection reset" in message.lower()
        or "connections to all backends failing" in message.lower()
    )


def _channel_args() -> list[tuple[str, int]]:
    """tritonclient's defaults (unlimited message size, keepalive), plus a short reconnect
    backoff: gRPC's default grows to 120 s, so a worker would stay blind that long after
    Triton comes back from a restart."""
    keepalive = grpcclient.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", int(keepalive.keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


def _expected_nbytes(spec: TensorSpec, batch: int | None) -> int | None:
    if spec.datatype == "BYTES" or spec.datatype not in _TRITON_TO_NUMPY:
        return None
    dims = list(spec.shape)
    if batch is not None and dims and dims[0] < 0:
        dims[0] = batch
    if any(d < 0 for d in dims):
        return None
    count = 1
    for d in dims:
        count *= d
    return count * np.dtype(_TRITON_TO_NUMPY[spec.datatype]).itemsize
