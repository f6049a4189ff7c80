"""A RIS stand-in for the tests: hl7apy's own MLLP server, in a process of its own.

    python mllp_listener.py PORT MODE RECORD

Every message it receives is parsed and validated as HL7 v2.5 by hl7apy and appended to RECORD
(one JSON line: control id, whether it validated, the message), then acknowledged: MODE ``AA``
accepts, ``AE`` answers an application error with a text. Not our code path: only the library's.
"""

from __future__ import annotations

import json
import sys
import threading

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

PORT, MODE, RECORD = int(sys.argv[1]), sys.argv[2], sys.argv[3]
AE_TEXT = "Patient not found in RIS worklist"
_lock = threading.Lock()


class OruHandler(AbstractHandler):
    def reply(self) -> str:
        text = self.incoming_message
        m = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        valid = bool(m.validate())
        cid = m.msh.msh_10.value
        with _lock, open(RECORD, "a", encoding="utf-8") as f:
            f.write(json.dumps({"control_id": cid, "valid": valid, "message": text}) + "\n")
        ack = Message("ACK", version="2.5")
        ack.msh.msh_3 = "RIS"
        ack.msh.msh_5 = m.msh.msh_3.to_er7()
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = "ACK" + cid[:17]
        ack.msh.msh_11 = "P"
        ack.msa.msa_1 = MODE
        ack.msa.msa_2 = cid
        if MODE != "AA":
            ack.msa.msa_3 = AE_TEXT
        return "\x0b" + ack.to_er7() + "\x1c\x0d"


if __name__ == "__main__":
    handlers = {"ORU^R01^ORU_R01": (OruHandler,), "ORU^R01": (OruHandler,)}
    server = MLLPServer("127.0.0.1", PORT, handlers)
    server.serve_forever()
