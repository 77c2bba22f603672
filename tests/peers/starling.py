#!/usr/bin/env python3
"""A Starling/Kestrel-protocol queue server kept as a test peer (neither server is packaged).

`set <queue> <flags> <exptime> <bytes>` enqueues, `get <queue>[/options]` dequeues (`END` alone
is an empty poll; like Kestrel, a get naming several queues dequeues from the first only), `stats` reports the server's own counters (STAT total_items, get_hits,
get_misses, cmd_set, cmd_get, curr_items, queue_<name>_items, queue_<name>_total_items).
Like the event-driven Starling, it closes clients idle longer than --idle-timeout seconds.
Pipelined commands in one write are answered in order.

Usage: starling.py --port PORT [--host 127.0.0.1] [--idle-timeout SECONDS]
"""

import argparse
import asyncio
import collections

queues = collections.defaultdict(collections.deque)
totals = collections.Counter()
counters = collections.Counter()


async def handle(reader, writer, idle):
    try:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), idle)
            except asyncio.TimeoutError:
                break  # idle: drop the client, as Starling did
            if not line:
                break
            words = line.strip().split()
            if not words:
                writer.write(b"ERROR\r\n")
                continue
            cmd = words[0]
            if cmd == b"set" and len(words) >= 5:
                length = int(words[4])
                data = await reader.readexactly(length + 2)
                name = words[1].split(b"/")[0]
                queues[name].append((words[2], data[:-2]))
                totals[name] += 1
                counters["cmd_set"] += 1
                counters["total_items"] += 1
                writer.write(b"STORED\r\n")
            elif cmd == b"get" and len(words) >= 2:
                # A get dequeues from its first queue name only, as Kestrel does
                # (MemcacheHandler.scala: `case "get" => get(request.line(1))`); any further
                # names are ignored. No queue server answers one item per name: Starling
                # even reads "a b" as one queue name (handler.rb's GET_COMMAND).
                key = words[1]
                counters["cmd_get"] += 1
                name = key.split(b"/")[0]
                if queues[name]:
                    flags, data = queues[name].popleft()
                    counters["get_hits"] += 1
                    writer.write(b"VALUE %s %s %d\r\n%s\r\n" % (key, flags, len(data), data))
                else:
                    counters["get_misses"] += 1
                writer.write(b"END\r\n")
            elif cmd == b"stats":
                stats = dict(counters)
                stats["curr_items"] = sum(len(q) for q in queues.values())
                for name, q in queues.items():
                    stats["queue_%s_items" % name.decode()] = len(q)
                    stats["queue_%s_total_items" % name.decode()] = totals[name]
                for key in ("cmd_set", "cmd_get", "get_hits", "get_misses", "total_items"):
                    stats.setdefault(key, 0)
                for key, value in sorted(stats.items()):
                    writer.write(b"STAT %s %d\r\n" % (key.encode(), value))
                writer.write(b"END\r\n")
            elif cmd == b"version":
                writer.write(b"VERSION starling-peer 0.1\r\n")
            elif cmd == b"quit":
                break
            else:
                writer.write(b"ERROR\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-timeout", type=float, default=3600.0)
    args = parser.parse_args()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args.idle_timeout), args.host, args.port
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
