#!/usr/bin/env python3
"""A fake VMM for the fleet tests that need many machines (SMOL_QEMU=this file).

The fake stands in for QEMU at the one edge this host cannot afford many times over (a 2-core
host boots a few TCG guests at a time, not dozens): there is no guest. Everything on the
engine's side of the agent channel is real: the engine spawns this process as it spawns QEMU,
supervises it, confines it (cgroup, rlimits; Landlock must be off, SMOL_NO_LANDLOCK=1, since
the agent binary lies outside what a VMM may reach), talks QMP to it and the agent protocol
over its agent socket. The agent is the real `smol-agent` (SMOL_FAKE_AGENT), run on the host
with `smol-agent connect <agent socket>`: commands a test runs in a fake machine run on the
host, as the engine's user, so tests run only harmless ones (`true`, `echo`).

QMP: the greeting, `qmp_capabilities`, `query-status`, `stop` / `cont` (SIGSTOP / SIGCONT the
agent), `chardev-change` (the agent reconnects by itself) and `quit`; anything else (migration,
`getfd`) is an error, and `-incoming` (a clone, a restore) is refused at start: a fake machine
cannot be branched or checkpointed. The agent dies with this process (PR_SET_PDEATHSIG), and
this process exits when the agent does (a shutdown request), as QEMU does when its guest
powers off.
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading

VERSION = "QEMU emulator version 7.2.0 (smol fake VMM: no guest, the agent runs on the host)"


def option(argv, name):
    """The values of every `name VALUE` pair of argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]


def agent_socket(argv):
    for spec in option(argv, "-chardev"):
        parts = spec.split(",")
        if parts[0] == "socket" and "id=agent" in parts:
            for p in parts:
                if p.startswith("path="):
                    return p[len("path="):]
    return None


def qmp_socket(argv):
    for spec in option(argv, "-qmp"):
        head = spec.split(",")[0]
        if head.startswith("unix:"):
            return head[len("unix:"):]
    return None


class Vm:
    def __init__(self, agent):
        self.agent = agent
        self.lock = threading.Lock()
        self.running = True

    def execute(self, command):
        if command == "qmp_capabilities" or command == "chardev-change":
            return {}
        if command == "query-status":
            with self.lock:
                running = self.running
            return {"status": "running" if running else "paused", "running": running}
        if command in ("stop", "cont"):
            with self.lock:
                self.running = command == "cont"
                os.kill(self.agent.pid, signal.SIGCONT if self.running else signal.SIGSTOP)
            return {}
        return None

    def quit(self):
        try:
            self.agent.kill()
        except ProcessLookupError:
            pass
        os._exit(0)


def session(vm, conn):
    f = conn.makefile("rwb")

    def send(msg):
        f.write(json.dumps(msg).encode() + b"\r\n")
        f.flush()

    send({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                              "package": "smol fake VMM"}, "capabilities": []}})
    for line in f:
        try:
            req = json.loads(line)
        except ValueError:
            send({"error": {"class": "GenericError", "desc": "JSON parse error"}})
            continue
        command = req.get("execute")
        reply = {"id": req["id"]} if "id" in req else {}
        if command == "quit":
            send({**reply, "return": {}})
            vm.quit()
        result = vm.execute(command)
        if result is None:
            send({**reply, "error": {"class": "GenericError",
                                     "desc": f"the fake VMM does not do {command}"}})
        else:
            send({**reply, "return": result})


def serve_qmp(vm, path):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=session, args=(vm, conn), daemon=True).start()


def die_with_parent():
    # PR_SET_PDEATHSIG = 1: the agent gets SIGKILL when this process ends, however it ends
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def main(argv):
    if "--version" in argv:
        print(VERSION)
        return 0
    if "-incoming" in argv:
        print("fake VMM: no incoming migration (a fake machine cannot be a clone or a restore)",
              file=sys.stderr)
        return 1
    agent_bin = os.environ.get("SMOL_FAKE_AGENT")
    agent, qmp = agent_socket(argv), qmp_socket(argv)
    if not agent_bin or not agent or not qmp:
        print(f"fake VMM: need SMOL_FAKE_AGENT ({agent_bin!r}), an agent chardev ({agent!r}) "
              f"and a unix QMP socket ({qmp!r})", file=sys.stderr)
        return 1
    child = subprocess.Popen([agent_bin, "connect", agent], stdin=subprocess.DEVNULL,
                             preexec_fn=die_with_parent)
    vm = Vm(child)
    signal.signal(signal.SIGTERM, lambda *_: vm.quit())
    threading.Thread(target=serve_qmp, args=(vm, qmp), daemon=True).start()
    # the guest powered off (the agent was asked to shut down): the VMM exits, status 0
    child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
