"""Send one HL7 message over MLLP (optionally inside TLS) and read the receiver's ACK.

MLLP frames a message as <VT> message <FS><CR>. The answer is an ACK whose MSA-1 says what the
receiver did: AA (accepted), AE (application error) or AR (rejected), MSA-2 repeats our MSH-10,
MSA-3 and ERR hold its text. Anything else (no connection, no answer in time, a frame we cannot
read, an ACK for another message) is a transport fault: the message may not have arrived and is
sent again later, with the same MSH-10.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Literal

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from orthanc_plugin.core.config import Hl7Destination

START, END = b"\x0b", b"\x1c\x0d"
_MAX_ACK = 1 << 20
_MAX_TEXT = 600

Outcome = Literal["accepted", "refused", "retry"]


@dataclass(frozen=True)
class SendResult:
    """``accepted`` (AA), ``refused`` (AE/AR: ``message`` holds the receiver's text) or ``retry``."""

    outcome: Outcome
    message: str
    ack_code: str | None = None


def frame(message: str) -> bytes:
    return START + message.encode("utf-8") + END


def send(destination: Hl7Destination, message: str, control_id: str) -> SendResult:
    """Send ``message`` to ``destination`` and classify its ACK."""
    where = f"{destination.host}:{destination.port}"
    timeout = destination.timeout_seconds
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout) as raw:
            conn: socket.socket = raw
            if destination.tls:
                context = ssl.create_default_context(
                    cafile=str(destination.tls_ca_file) if destination.tls_ca_file else None
                )
                conn = context.wrap_socket(raw, server_hostname=destination.host)
            conn.settimeout(timeout)
            conn.sendall(frame(message))
            answer = _read_frame(conn)
    except TimeoutError:
        return SendResult("retry", f"no ACK from {destination.name} ({where}) within {timeout:g} s")
    except ssl.SSLError as e:
        return SendResult("retry", f"TLS with {destination.name} ({where}) failed: {e.reason or e}")
    except OSError as e:
        return SendResult("retry", f"cannot reach {destination.name} ({where}): {e.strerror or e}")
    if answer is None:
        return SendResult("retry", f"{destination.name} ({where}) closed the connection without an ACK")
    return classify_ack(answer, control_id, destination.name)


def _read_frame(conn: socket.socket) -> str | None:
    data = b""
    while END not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
        if len(data) > _MAX_ACK:
            raise OSError("the answer is too long for an ACK")
    start = data.find(START)
    return data[start + 1 if start >= 0 else 0 : data.index(END)].decode("utf-8", errors="replace")


def classify_ack(text: str, control_id: str, name: str) -> SendResult:
    """Sort an ACK into accepted / refused / retry (an unreadable or foreign answer)."""
    try:
        ack = parse_message(text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.TOLERANT)
        msa = ack.msa
        code = str(msa.msa_1.value).strip().upper()
        acked = str(msa.msa_2.value).strip()
        detail = str(msa.msa_3.value).strip() if msa.msa_3.value else ""
    except (HL7apyException, AttributeError, IndexError, KeyError, ValueError) as e:
        return SendResult("retry", f"{name} answered something that is not an HL7 ACK: {type(e).__name__}")
    if acked != control_id:
        return SendResult("retry", f"{name} acknowledged message {acked!r}, not ours ({control_id})")
    if code in ("AA", "CA"):
        return SendResult("accepted", "accepted", code)
    if code in ("AE", "AR", "CE", "CR"):
        errors = [detail] if detail else []
        for err in ack.children.get("ERR") or []:
            text_ = err.to_er7()
            errors.append(text_.split("|", 1)[1] if "|" in text_ else text_)
        said = "; ".join(e for e in errors if e)[:_MAX_TEXT] or "no text"
        kind = "an error (AE)" if code in ("AE", "CE") else "a rejection (AR)"
        return SendResult("refused", f"{name} answered {kind}: {said}", code)
    return SendResult("retry", f"{name} answered an unknown acknowledgement code {code!r}")
