#!/usr/bin/env python3
"""A small QMP client for the lab's shell scripts (standard library only).

  qmp.py cmd SOCKET COMMAND [JSON-ARGS]     run one command, print its "return" as JSON
  qmp.py wait-event SOCKET EVENT [--timeout S]
  qmp.py naive-migrate --src SOCK --dst SOCK --uri URI --converge-batch FILE --router-ns NS

naive-migrate is the baseline katamaran is measured against: plain QMP migration with the
router's route switched only after the destination resumes. It prints a JSON timeline.
"""

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import time

LINE_CAP = 16 * 1024 * 1024  # a query-qmp-schema reply is ~200 KiB; anything near this is broken


class QmpError(Exception):
    pass


class Qmp:
    """One QMP connection: greeting, capabilities, id-matched replies, buffered events."""

    def __init__(self, path, timeout=10.0):
        self.path = path
        self.buf = b""
        self.events = []
        self.next_id = 0
        deadline = time.monotonic() + timeout
        # QEMU creates its sockets while starting; retry until the deadline.
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"cannot connect to {path}: {e}") from None
                time.sleep(0.02)
        greeting = self._read_msg(deadline)
        if "QMP" not in greeting:
            raise QmpError(f"{path}: not a QMP greeting: {greeting}")
        self.command("qmp_capabilities", timeout=timeout)

    def fileno(self):
        return self.sock.fileno()

    def _read_msg(self, deadline):
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"{self.path}: timed out waiting for QMP")
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError(f"{self.path}: QEMU closed the QMP connection")
            self.buf += chunk
            if len(self.buf) > LINE_CAP:
                raise QmpError(f"{self.path}: QMP line over {LINE_CAP} bytes")
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def command(self, name, args=None, timeout=10.0):
        self.next_id += 1
        msg = {"execute": name, "id": self.next_id}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_msg(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != self.next_id:
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"{name}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    def wait_event(self, names, timeout):
        """Returns the first buffered or new event whose name is in `names`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] in names:
                    return self.events.pop(i)
            msg = self._read_msg(deadline)
            if "event" in msg:
                self.events.append(msg)


def event_time(ev):
    ts = ev["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


def naive_migrate(a):
    dst = Qmp(a.dst)
    src = Qmp(a.src)
    dst.command("migrate-incoming", {"uri": a.uri})
    params = {"downtime-limit": a.downtime_limit_ms}
    if a.max_bandwidth:
        params["max-bandwidth"] = a.max_bandwidth
    src.command("migrate-set-parameters", params)
    started = time.time()
    src.command("migrate", {"uri": a.uri})
    stop = src.wait_event({"STOP"}, a.timeout)
    resume = dst.wait_event({"RESUME"}, a.timeout)
    resumed_seen = time.time()
    # The naive operator: the route follows the VM only once it runs again.
    r = subprocess.run(["ip", "-n", a.router_ns, "-batch", a.converge_batch])
    switched = time.time()
    if r.returncode != 0:
        raise QmpError("route switch failed")
    deadline = time.monotonic() + a.timeout
    while True:
        info = src.command("query-migrate")
        status = info.get("status")
        if status == "completed":
            break
        if status in ("failed", "cancelled"):
            raise QmpError(f"migration {status}: {info.get('error-desc', '')}")
        if time.monotonic() > deadline:
            raise QmpError("migration did not complete in time")
        time.sleep(0.05)
    t_stop, t_resume = event_time(stop), event_time(resume)
    out = {
        "uri": a.uri,
        "migrate_started": started,
        "stop": t_stop,
        "resume": t_resume,
        "resume_seen": resumed_seen,
        "route_switched": switched,
        "stop_to_resume_ms": round((t_resume - t_stop) * 1e3, 3),
        "resume_to_route_ms": round((switched - t_resume) * 1e3, 3),
        "blackout_ms": round((switched - t_stop) * 1e3, 3),
        "total_time_ms": info.get("total-time"),
        "qemu_downtime_ms": info.get("downtime"),
        "ram_transferred": info.get("ram", {}).get("transferred"),
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="op", required=True)
    c = sub.add_parser("cmd", help="run one QMP command")
    c.add_argument("socket")
    c.add_argument("command")
    c.add_argument("args", nargs="?", help="arguments as a JSON object")
    c.add_argument("--timeout", type=float, default=10.0)
    w = sub.add_parser("wait-event", help="wait for one QMP event")
    w.add_argument("socket")
    w.add_argument("event")
    w.add_argument("--timeout", type=float, default=30.0)
    n = sub.add_parser("naive-migrate", help="the naive baseline migration")
    n.add_argument("--src", required=True)
    n.add_argument("--dst", required=True)
    n.add_argument("--uri", required=True)
    n.add_argument("--router-ns", required=True)
    n.add_argument("--converge-batch", required=True, help="file of `ip -batch` route commands")
    n.add_argument("--max-bandwidth", type=int, default=0, help="bytes/s; 0 keeps QEMU's default")
    n.add_argument("--downtime-limit-ms", type=int, default=300)  # QEMU's default
    n.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args()
    try:
        if a.op == "cmd":
            args = json.loads(a.args) if a.args else None
            ret = Qmp(a.socket, a.timeout).command(a.command, args, a.timeout)
            json.dump(ret, sys.stdout)
            sys.stdout.write("\n")
        elif a.op == "wait-event":
            ev = Qmp(a.socket).wait_event({a.event}, a.timeout)
            json.dump(ev, sys.stdout)
            sys.stdout.write("\n")
        else:
            naive_migrate(a)
    except (QmpError, OSError, json.JSONDecodeError) as e:
        print(f"qmp: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
