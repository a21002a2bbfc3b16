"""Answers held to the end of the event loop's turn (`webhook.serving.writes`), on real
socket transports of a real event loop: nothing leaves before the turn ends, then every
connection's writes leave in order; closing writes what is held first, aborting drops it."""

from __future__ import annotations

import asyncio
import select
import socket

import uvloop

from webhook.serving.writes import HeldWrites, TurnWrites


async def _held_pair(turn: TurnWrites) -> tuple[HeldWrites, socket.socket]:
    ours, peer = socket.socketpair()
    transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, sock=ours)
    return HeldWrites(transport, turn), peer


def _readable(peer: socket.socket) -> bool:
    return bool(select.select([peer], [], [], 0)[0])


def _received(peer: socket.socket) -> bytes:
    peer.settimeout(5)
    chunks = []
    while chunk := peer.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_writes_of_one_turn_leave_together_at_its_end_in_order() -> None:
    async def scenario() -> tuple[list[bool], list[bool], bytes, bytes]:
        turn = TurnWrites(asyncio.get_running_loop())
        (first, first_peer), (second, second_peer) = [await _held_pair(turn) for _ in range(2)]
        first.write(b"answer 1;")
        second.write(b"answer A;")
        first.write(b"answer 2;")
        held = [first.holding(), _readable(first_peer) or _readable(second_peer)]
        await asyncio.sleep(0.05)  # the turn ends; the next begins
        after = [first.holding(), _readable(first_peer) and _readable(second_peer)]
        first.close()
        second.close()
        await asyncio.sleep(0.05)
        return held, after, _received(first_peer), _received(second_peer)

    held, after, first, second = uvloop.run(scenario())
    assert held == [True, False], "a write left before the end of the turn"
    assert after == [False, True]
    assert first == b"answer 1;answer 2;"
    assert second == b"answer A;"


def test_close_writes_what_is_held_first_and_abort_drops_it() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        turn = TurnWrites(asyncio.get_running_loop())
        closed, closed_peer = await _held_pair(turn)
        aborted, aborted_peer = await _held_pair(turn)
        closed.write(b"the last answer")
        closed.close()  # before the turn ends
        aborted.write(b"never sent")
        aborted.abort()
        await asyncio.sleep(0.05)
        return _received(closed_peer), _received(aborted_peer)

    closed, aborted = uvloop.run(scenario())
    assert closed == b"the last answer"
    assert aborted == b""
