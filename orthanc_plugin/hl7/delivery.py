"""Deliver the outbox's ORU^R01 messages to the RIS destinations (``Hl7Destinations``).

One :class:`Hl7DeliveryLoop` per destination runs in a background thread of every worker process:
it claims rows of ``hl7_outbox`` for its destination with a lease, sends them over MLLP and
records the outcome: AA delivered; AE/AR failed for good, the receiver's text in the row and in
the job's history; no connection, no ACK, a foreign ACK: tried again with exponential backoff.
A message sent again carries the same MSH-10, so a receiver that detects duplicates by MSH-10
files it once.

Logs name jobs, destinations and outcomes only: the receiver's text may quote patient data, so it
goes into the outbox row and the job's history, which admins read through ``/ai/jobs/{id}``.
"""

from __future__ import annotations

import logging
import threading

from orthanc_plugin.core.config import Hl7Destination, Settings
from orthanc_plugin.hl7.mllp import SendResult, send
from orthanc_plugin.jobs.database import DatabaseTarget
from orthanc_plugin.jobs.outbox import HL7, Delivery, Outbox, deliver_until
from orthanc_plugin.jobs.store import JobStore

log = logging.getLogger("orthanc_ai.hl7")


def control_id_of(message: str) -> str:
    """MSH-10 of an ER7 message (the field separator is MSH's fourth character)."""
    msh = message.split("\r", 1)[0]
    fields = msh.split(msh[3]) if len(msh) > 3 else []
    return fields[9] if len(fields) > 9 else ""


class Hl7DeliveryLoop:
    """Claims ``hl7_outbox`` rows of one destination and sends them, until stopped."""

    def __init__(
        self,
        target: DatabaseTarget,
        settings: Settings,
        destination: Hl7Destination,
        owner: str,
        poll_s: float = 1.0,
    ) -> None:
        self.destination = destination
        self.owner = f"{owner}/hl7-{destination.name}"
        self.poll_s = poll_s
        max_backoff = settings.delivery_max_backoff_seconds
        self.outbox = Outbox(
            target, first_backoff_s=min(1.0, max_backoff), max_backoff_s=max_backoff, table=HL7
        )
        self.store = JobStore(target)
        # Connect + send + wait for the ACK, with room: a row is never sent twice at once.
        self.lease_s = 3 * destination.timeout_seconds + 30

    def close(self) -> None:
        self.outbox.close()
        self.store.close()

    def run_once(self) -> bool:
        """Claim and attempt one delivery; False when nothing was due."""
        d = self.outbox.claim(self.owner, self.lease_s, destination=self.destination.name)
        if d is None:
            return False
        self.attempt(d)
        return True

    def attempt(self, d: Delivery) -> SendResult:
        message = str(d.bundle.get("message", ""))
        control_id = control_id_of(message)
        try:
            result = send(self.destination, message, control_id)
        except Exception as e:  # noqa: BLE001 - a bug must not stop the deliveries of other jobs
            log.exception("job %s: HL7 delivery attempt %d crashed", d.job_id, d.attempts)
            result = SendResult("retry", f"internal error: {type(e).__name__}")
        name = self.destination.name
        if result.outcome == "accepted":
            if self.outbox.delivered(d, {"ack": result.ack_code, "control_id": control_id}):
                self.store.add_event(
                    d.job_id, "hl7_delivered", f"ORU^R01 {control_id} accepted (AA) by {name}"
                )
                log.info("job %s: ORU^R01 delivered to %s", d.job_id, name)
        elif result.outcome == "refused":
            if self.outbox.refused(d, result.message):
                self.store.add_event(d.job_id, "hl7_failed", result.message)
                log.warning("job %s: %s refused the ORU^R01 (%s)", d.job_id, name, result.ack_code)
        else:
            delay = self.outbox.failed_attempt(d, result.message, "retry")
            log.warning(
                "job %s: ORU^R01 attempt %d to %s failed: %s; %s",
                d.job_id, d.attempts, name, result.message,
                f"next try in {delay:.0f} s" if delay is not None else "row changed meanwhile",
            )  # fmt: skip
        return result

    def run(self, stop: threading.Event, wake: threading.Event | None = None) -> None:
        """Deliver until ``stop`` is set; idle polls every ``poll_s`` seconds or when ``wake`` is set."""
        log.info("HL7 delivery to %s started (%s)", self.destination.name, self.owner)
        try:
            deliver_until(stop, self.run_once, self.poll_s, log, "HL7 delivery", wake)
        finally:
            self.close()
            log.info("HL7 delivery to %s stopped", self.destination.name)


def start_hl7_threads(
    settings: Settings,
    owner: str,
    stop: threading.Event,
    poll_s: float = 1.0,
    wakes: list[threading.Event] | None = None,
) -> list[threading.Thread]:
    """One daemon thread per HL7 destination; each one's wake event (set it: look at the outbox at
    once) is appended to ``wakes``."""
    threads = []
    for destination in settings.hl7_destinations:
        loop = Hl7DeliveryLoop(settings.database(), settings, destination, owner, poll_s)
        wake = threading.Event()
        if wakes is not None:
            wakes.append(wake)
        t = threading.Thread(target=loop.run, args=(stop, wake), name=f"hl7-{destination.name}", daemon=True)
        t.start()
        threads.append(t)
    return threads
