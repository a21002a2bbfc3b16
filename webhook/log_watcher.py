"""The log-watcher sidecar: Fluent Bit tailing the shared log directory to stdout."""

from __future__ import annotations

from typing import Any

from webhook.annotations import LOG_WATCHER
from webhook.policy import LogWatcherSettings
from webhook.volumes import SHARED_LOGS, volume_mount

FLUENT_BIT = "/fluent-bit/bin/fluent-bit"


def log_watcher_container(settings: LogWatcherSettings, log_path: str) -> dict[str, Any]:
    """Fluent Bit configured on its command line, so no ConfigMap has to exist for it.

    It reads `*.log` in the shared directory from the start of each file (the volume is new
    with the pod, so nothing is read twice) and prints every line as JSON on stdout, where
    the cluster's log collection already looks.
    """
    return {
        "name": LOG_WATCHER,
        "image": settings.image,
        "command": [FLUENT_BIT],
        "args": [
            *("-i", "tail", "-p", f"path={log_path}/*.log"),
            *("-p", "read_from_head=true", "-p", "refresh_interval=5"),
            *("-o", "stdout", "-p", "format=json_lines"),
        ],
        "volumeMounts": [volume_mount(SHARED_LOGS, log_path, read_only=True)],
        **settings.container_fields,
    }
