"""Work that runs beside the server for the app's lifetime (the ASGI lifespan)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any


@asynccontextmanager
async def running(coroutine: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Run `coroutine` as a task for the duration of the `async with`, then cancel it."""
    task = asyncio.create_task(coroutine, name=name)
    try:
        yield
    finally:
        task.cancel()
        # wait() rather than await: the task's own CancelledError is expected, and is not
        # to be mistaken for (or to swallow) a cancellation of this shutdown itself.
        await asyncio.wait([task])
