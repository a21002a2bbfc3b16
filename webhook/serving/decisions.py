"""The decision log: one line per review that is not a plain skip (an injection, a denial, a
refused request, an error), with what a platform team asks first: which pod, whose, what was
decided and why, which sidecars, under which policy version, and how long it took.

Values are bounded: a denial's message is cut at 1 KiB (it echoes at most a prefix of a bad
value), and no annotation value is written. With `--log-format json` each line is one JSON
object, the fields below at its top level.
"""

from __future__ import annotations

import logging
import time

from webhook.admission.review import AdmissionRequest, Verdict

log = logging.getLogger("outrigger.decisions")
# Outcomes logged at info; an unchanged pod (opted out, not requested, excluded, already
# injected, not a pod creation) is a plain skip: counted in /metrics only.
_LOGGED = {"injected": logging.INFO, "denied": logging.INFO, "bad_request": logging.WARNING}


def log_decision(
    request: AdmissionRequest | None,
    verdict: Verdict,
    policy_version: str,
    seconds: float,
    compiled_version: str = "",
) -> None:
    """`compiled_version`: the policy the API server's matchConditions and guard come from
    (as this replica last published them; "" when it does not publish them)."""
    level = logging.ERROR if verdict.outcome == "error" else _LOGGED.get(verdict.outcome)
    if level is None or not log.isEnabledFor(level):
        return
    fields = {
        "uid": request.uid if request else "",
        "namespace": request.namespace if request else "",
        "pod": request.name if request else "",
        "owner": request.owner if request else "",
        "outcome": verdict.outcome,
        "reason": verdict.reason,
        "sidecars": list(verdict.sidecars),
        "policy": policy_version,
        "conditions_policy": compiled_version,
        "duration_ms": round(seconds * 1000, 3),
    }
    if verdict.message:
        fields["detail"] = verdict.message
    where = f"{fields['namespace']}/{fields['pod']}" if request else "request"
    sidecars = ",".join(verdict.sidecars) or "-"
    text = (
        f"{verdict.outcome} {where} owner={fields['owner'] or '-'} reason={verdict.reason} "
        f"sidecars={sidecars} policy={policy_version} "
        f"conditions={compiled_version or '-'} {fields['duration_ms']}ms"
    )
    if verdict.message:
        text += f": {verdict.message}"
    log.log(level, text, extra=fields)


class Throttled:
    """A warning about something any client can cause as often as it likes (connections
    closed at the cap, requests refused as busy): written at most once per `seconds`, with
    the count since the last line, so that no client can flood the log."""

    def __init__(self, message: str, seconds: float = 10.0) -> None:
        self.message = message  # %-style, with the `note` argument and the count
        self.seconds = seconds
        self._written_at = float("-inf")
        self._since = 0

    def note(self, argument: object) -> None:
        self._since += 1
        now = time.monotonic()
        if now - self._written_at >= self.seconds:
            logging.getLogger("outrigger.server").warning(self.message, argument, self._since)
            self._written_at, self._since = now, 0
