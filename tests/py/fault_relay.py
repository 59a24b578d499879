"""A TCP relay that impairs the link it stands on, as toxiproxy's toxics do: added
latency with jitter (order kept), a blackhole (nothing passes either way, nothing is
closed), and resets (every open connection cut with RST).

usage: fault_relay.py LISTEN_HOST:PORT TARGET_HOST:PORT CONTROL_FILE

The control file holds JSON, re-read every 50 ms:
  {"delay_ms": 40, "jitter_ms": 5, "blackhole": false, "reset": 0}
Each increase of "reset" cuts the connections open at that moment.
Prints "ready" once listening.
"""
import asyncio
import json
import os
import random
import socket
import struct
import sys

listen, target, control = sys.argv[1:4]
lhost, lport = listen.rsplit(":", 1)
thost, tport = target.rsplit(":", 1)
state = {"delay_ms": 0, "jitter_ms": 0, "blackhole": False, "reset": 0}
open_conns = set()


async def watch_control():
    seen = None
    while True:
        try:
            st = os.stat(control)
            if (st.st_mtime_ns, st.st_size) != seen:
                seen = (st.st_mtime_ns, st.st_size)
                new = json.load(open(control))
                if new.get("reset", 0) > state["reset"]:
                    for w in list(open_conns):
                        sock = w.get_extra_info("socket")
                        if sock is not None:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        w.transport.abort()
                state.update(new)
        except (OSError, ValueError):
            pass
        await asyncio.sleep(0.05)


async def pump(reader, writer):
    """Copies one direction, each chunk delayed; in a blackhole chunks are dropped."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def send():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    last = 0.0
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if state["blackhole"]:
                continue
            j = state["jitter_ms"]
            delay = max(0.0, state["delay_ms"] + random.uniform(-j, j)) / 1000.0
            last = max(last, loop.time() + delay)
            queue.put_nowait((last, data))
        queue.put_nowait((last, None))
        await sender
        writer.write_eof()
    except (ConnectionError, OSError):
        sender.cancel()


async def handle(creader, cwriter):
    try:
        ureader, uwriter = await asyncio.open_connection(thost, int(tport))
    except OSError:
        cwriter.transport.abort()
        return
    for w in (cwriter, uwriter):
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        open_conns.add(w)
    try:
        await asyncio.gather(pump(creader, uwriter), pump(ureader, cwriter), return_exceptions=True)
    finally:
        for w in (cwriter, uwriter):
            open_conns.discard(w)
            w.transport.abort()


async def main():
    server = await asyncio.start_server(handle, lhost, int(lport))
    asyncio.create_task(watch_control())
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
