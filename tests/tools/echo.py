#!/usr/bin/env python3
"""An echo server for capacity tests: TCP and UDP on 127.0.0.1, thousands of connections and
flows in one process (asyncio), so that the test process keeps its own open files for its
clients. Raises its open-file limit to the hard limit, prints `tcp PORT udp PORT` on one line,
and serves until stdin closes."""
import asyncio
import resource
import sys


class Udp(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


async def echo(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
    tcp = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
    udp = transport.get_extra_info("sockname")[1]
    print(f"tcp {tcp} udp {udp}", flush=True)
    # Serve until the test closes our stdin.
    await loop.run_in_executor(None, sys.stdin.read)
    transport.close()
    server.close()


asyncio.run(main())
