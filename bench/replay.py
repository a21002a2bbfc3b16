"""A webhook that does no work but answers what Outrigger answers: the AdmissionReview response
`bench/apiserver.py` recorded from Outrigger for the benchmark pod (its patch included), with
each request's uid put in, and the pod's token volume: the patch names it in the sidecars'
token mounts, and the API server names it afresh for every pod. Served by the same uvicorn,
TLS, loop and HTTP parser as the floor, it stands for the cheapest webhook that still makes
the API server apply the same patch.

The response comes from the file `REPLAY_RESPONSE` names, read once at import; its uid is the
placeholder `UID`, and the token volume it names is `REPLAY_TOKEN_VOLUME`. Like Outrigger, it
leaves a pod that already carries the status annotation alone (the API server calls it again
when later mutations change the pod: both are registered with `reinvocationPolicy: IfNeeded`).
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pybase64

from bench.floor import _lifespan

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_RECORDED = json.loads(Path(os.environ["REPLAY_RESPONSE"]).read_bytes())
PATCH = base64.b64decode(_RECORDED["response"].pop("patch"))
RECORDED_TOKEN = os.environ["REPLAY_TOKEN_VOLUME"].encode()
_RECORDED["response"]["patch"] = "PATCH"
HEAD, _, _REST = json.dumps(_RECORDED, separators=(",", ":")).encode().partition(b'"UID"')
MIDDLE, _, TAIL = _REST.partition(b'"PATCH"')
_UID = b'"uid":"'
_STATUS = b'"outrigger.dev/status"'
_TOKEN = re.compile(rb'"name":"(kube-api-access-[a-z0-9]+)"')
_UNCHANGED = (
    b'{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview",'
    b'"response":{"uid":"UID","allowed":true}}'
)


async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    # The API server writes request.uid first in the request: the first "uid" of the body.
    start = body.find(_UID) + len(_UID)
    uid = body[start : body.find(b'"', start)]
    answer = _UNCHANGED.replace(b"UID", uid) if _STATUS in body else _answer(body, uid)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def _answer(body: bytes, uid: bytes) -> bytes:
    token = _TOKEN.search(body)
    patch = PATCH.replace(RECORDED_TOKEN, token.group(1)) if token else PATCH
    return HEAD + b'"' + uid + b'"' + MIDDLE + b'"' + pybase64.b64encode(patch) + b'"' + TAIL
