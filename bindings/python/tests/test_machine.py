"""Machine: create, exec, files, lifecycle, ports, list, context manager (real microVMs)."""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import eventually, pid_alive, unique, vmm_pid

import smol
from smol import (
    ExecOptions,
    ExecResult,
    Machine,
    MachineConfig,
    PortSpec,
    PublishedPort,
    ResourceSpec,
)


def test_version_and_local_availability():
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", smol.__version__)
    available, code, reason = smol.local_availability()
    assert (available, code, reason) == (True, None, None)


def test_create_default_exec_and_identity():
    with Machine.create() as m:
        assert re.fullmatch(r"smol-[0-9a-f]{8}", m.name), m.name
        assert m.id == m.name
        assert m.state() == "running"
        assert m.url() is None
        r = m.exec(["uname", "-s", "-n"])
        assert isinstance(r, ExecResult)
        assert (r.exit_code, r.stdout, r.stderr) == (0, f"Linux {m.name}\n", "")
        assert r.success and r.stdout_bytes == r.stdout.encode()
        assert not r.stdout_truncated and not r.stderr_truncated and not r.timed_out
        assert repr(m) == f"Machine(name={m.name!r}, target='local')"


def test_create_with_config_and_list(name):
    cfg = MachineConfig(
        name=name,
        resources=ResourceSpec(cpus=2, memory_mb=768),
        labels={"suite": "python", "case": name},
    )
    with Machine.create(cfg) as m:
        assert m.name == name
        out = m.exec(["sh", "-c", "nproc; grep MemTotal /proc/meminfo"]).stdout.split("\n")
        assert out[0] == "2"
        mem_kib = int(out[1].split()[1])
        assert 600 * 1024 < mem_kib <= 768 * 1024, out
        [s] = Machine.list(labels={"case": name})
        assert (s.id, s.name, s.state) == (name, name, "running")
        assert s.labels == {"suite": "python", "case": name}
        assert s.resources.cpus == 2 and s.resources.memory_mib == 768
        assert s.persistent is False and s.pid and pid_alive(s.pid)
        assert s.accel in ("kvm", "tcg")
        # SPEC §3.10: image, detached, created_at, resources.storage_gib, ports
        assert s.image is None and s.detached is False
        assert s.resources.storage_gib == 20  # the local default
        assert s.ports == []
        created = datetime.datetime.fromisoformat(s.created_at.replace("Z", "+00:00"))
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", s.created_at), s.created_at
        age = datetime.datetime.now(datetime.timezone.utc) - created
        assert datetime.timedelta(seconds=-5) < age < datetime.timedelta(minutes=10), s.created_at
        assert name in {x.name for x in Machine.list()}
        assert Machine.list(labels={"case": "no-such-" + name}) == []


def test_list_shows_detached_ports_and_storage(name):
    host = _free_port()
    cfg = MachineConfig(
        name=name,
        detach=True,
        ports=[PortSpec(host=host, guest=8080)],
        resources=ResourceSpec(storage_gb=3),
        labels={"case": name},
    )
    with Machine.create(cfg) as m:
        [s] = Machine.list(labels={"case": name})
        assert s.name == m.name
        assert s.detached is True and s.persistent is True  # detach implies persistent
        assert s.ports == [PublishedPort(guest=8080, host=host, protocol="tcp")]
        assert s.resources.storage_gib == 3
        assert s.image is None
    assert Machine.list(labels={"case": name}) == []


def test_exec_options_and_results(machine):
    r = machine.exec(
        ["sh", "-c", 'echo "$A-$B"; pwd; cat; echo err >&2; exit 3'],
        ExecOptions(env={"A": "1", "B": "two"}, workdir="/tmp", stdin="from stdin\n"),
    )
    assert r.exit_code == 3 and not r.success
    assert r.stdout == "1-two\n/tmp\nfrom stdin\n"
    assert r.stderr == "err\n"
    assert r.output == "1-two\n/tmp\nfrom stdin\n\nerr\n"
    # stdin as bytes; output with only stdout / only stderr
    r = machine.exec(["cat"], ExecOptions(stdin=b"bytes in"))
    assert (r.stdout, r.output) == ("bytes in", "bytes in")
    r = machine.exec(["sh", "-c", "echo only-err >&2"])
    assert r.output == "only-err\n"
    # a missing program is an exit code, not an exception
    r = machine.exec(["/no/such/program"])
    assert r.exit_code == 127 and r.stderr
    # non-UTF-8 output: lossy text, exact bytes
    r = machine.exec(["printf", "a\\377b"])
    assert r.stdout_bytes == b"a\xffb" and r.stdout == "a\ufffdb"
    # dict options are accepted too
    assert machine.exec(["pwd"], {"workdir": "/proc"}).stdout == "/proc\n"


def test_exec_timeout_gives_124_without_raising(machine):
    r = machine.exec(["sh", "-c", "echo before; sleep 30; echo after"], ExecOptions(timeout=1))
    assert r.exit_code == 124 and r.timed_out
    assert r.stdout == "before\n"
    # fractional timeouts are rounded up to whole milliseconds, not down to 0
    assert machine.exec(["sleep", "5"], ExecOptions(timeout=0.0001)).exit_code == 124
    # the machine is still usable
    assert machine.exec(["true"]).exit_code == 0


def test_background_exec_returns_at_once_with_its_pid(machine):
    # SPEC §3.6: started detached; exit 0, stdout "pid=<n>\n", ExecResult.pid; it runs on
    bg = ExecOptions(background=True)
    t0 = time.monotonic()
    r = machine.exec(["sh", "-c", "sleep 2; echo done > /tmp/bg"], bg)
    assert time.monotonic() - t0 < 2, "returned at once"
    assert isinstance(r, ExecResult) and isinstance(r.pid, int) and r.pid > 1, r
    assert (r.exit_code, r.stdout, r.stderr) == (0, f"pid={r.pid}\n", ""), r
    assert r.success and r.stdout_bytes == f"pid={r.pid}\n".encode()
    alive = machine.exec(["sh", "-c", f"kill -0 {r.pid} && echo alive"])
    assert alive.stdout == "alive\n", alive
    assert eventually(lambda: _read(machine, "/tmp/bg") == b"done\n", 20)
    # env and workdir apply; a long-running command keeps running until killed
    r = machine.exec(
        ["sh", "-c", 'echo "$X $(pwd)" > /root/bg-env; exec sleep 600'],
        ExecOptions(background=True, env={"X": "from-env"}, workdir="/tmp"),
    )
    assert r.pid is not None and r.stdout == f"pid={r.pid}\n"
    assert eventually(lambda: _read(machine, "/root/bg-env") == b"from-env /tmp\n", 20)
    for _ in range(2):
        assert machine.exec(["kill", "-0", str(r.pid)]).exit_code == 0, "still running"
        time.sleep(0.5)
    machine.exec(["kill", str(r.pid)]).assert_success()
    assert eventually(lambda: machine.exec(["kill", "-0", str(r.pid)]).exit_code != 0, 10)
    # a missing program is reported as exec reports it, without a pid
    r = machine.exec(["no-such-program"], bg)
    assert (r.exit_code, r.pid) == (127, None), r
    # a plain exec has no pid
    assert machine.exec(["true"]).pid is None
    # no stdin, no timeout, no streaming, not for run(image)
    for opts in (
        ExecOptions(background=True, timeout=5),
        ExecOptions(background=True, stdin="x"),
        {"background": True, "timeout": 1},
    ):
        with pytest.raises(smol.InvalidConfigError):
            machine.exec(["true"], opts)
    with pytest.raises(smol.InvalidConfigError):
        machine.exec_stream(["true"], bg)
    with pytest.raises(smol.InvalidConfigError):
        machine.run("busybox", ["true"], bg)


def _read(m: Machine, path: str) -> bytes:
    try:
        return m.read_file(path)
    except smol.NotFoundError:
        return b""


def test_assert_success(machine):
    ok = machine.exec(["true"])
    assert ok.assert_success() is ok
    r = machine.exec(["sh", "-c", "echo out; echo bad >&2; exit 7"])
    with pytest.raises(smol.ExecutionError) as ei:
        r.assert_success()
    e = ei.value
    assert isinstance(e, smol.SmolError)
    assert (e.code, e.exit_code, e.stdout, e.stderr) == ("COMMAND_FAILED", 7, "out\n", "bad\n")
    assert e.command == "sh -c echo out; echo bad >&2; exit 7"
    assert str(e) == "command exited with code 7: sh -c echo out; echo bad >&2; exit 7"
    with pytest.raises(smol.ExecutionError, match="code 7: my-step$"):
        r.assert_success("my-step")


def test_files_roundtrip_modes_and_errors(machine):
    machine.write_file("/root/a/b/hello.txt", "héllo")
    assert machine.read_file("/root/a/b/hello.txt") == "héllo".encode()
    machine.write_file("/tmp/run.sh", "#!/bin/sh\necho ran\n", 0o755)
    assert machine.exec(["stat", "-c", "%a", "/tmp/run.sh"]).stdout == "755\n"
    assert machine.exec(["/tmp/run.sh"]).stdout == "ran\n"
    machine.write_file("/tmp/ba", bytearray(b"\x00\x01\x02"))
    assert machine.read_file("/tmp/ba") == b"\x00\x01\x02"
    machine.write_file("/tmp/empty", b"")
    assert machine.read_file("/tmp/empty") == b""
    with pytest.raises(smol.NotFoundError) as ei:
        machine.read_file("/no/such/file")
    assert ei.value.code == "NOT_FOUND" and "/no/such/file" in str(ei.value)
    with pytest.raises(smol.SmolError) as ei:
        machine.read_file("/tmp")
    assert ei.value.code == "IS_A_DIRECTORY"
    with pytest.raises(smol.InvalidConfigError):
        machine.read_file("relative/path")
    with pytest.raises(smol.InvalidConfigError):
        machine.write_file("relative", "x")
    with pytest.raises(smol.InvalidConfigError):
        machine.write_file("/tmp/x", "x", 0o17777)
    with pytest.raises(smol.InvalidConfigError):
        machine.write_file("/tmp/x", 12345)


def test_64_mib_byte_exact(machine):
    data = os.urandom(64 << 20)
    machine.write_file("/root/big.bin", data)
    r = machine.exec(["sh", "-c", "sha256sum /root/big.bin | cut -d' ' -f1; stat -c %s /root/big.bin"])
    assert r.stdout.split() == [hashlib.sha256(data).hexdigest(), str(64 << 20)]
    back = machine.read_file("/root/big.bin")
    assert len(back) == len(data) and back == data


def test_stop_start_keeps_files(machine):
    machine.write_file("/root/kept", "on disk")
    machine.stop()
    assert machine.state() == "stopped"
    with pytest.raises(smol.InvalidStateError) as ei:
        machine.exec(["true"])
    assert ei.value.code == "INVALID_STATE"
    machine.start()
    assert machine.state() == "running"
    assert machine.read_file("/root/kept") == b"on disk"


def test_context_manager_deletes_on_exception(name):
    with pytest.raises(RuntimeError, match="boom"):
        with Machine.create(MachineConfig(name=name)) as m:
            pid = vmm_pid(name)
            m.write_file("/root/x", "x")
            raise RuntimeError("boom")
    assert m.state() == "deleted"
    assert eventually(lambda: not pid_alive(pid), 5)
    assert name not in {s.name for s in Machine.list()}
    with pytest.raises(smol.NotFoundError):
        Machine.open(name)
    with pytest.raises(smol.NotFoundError):
        Machine.connect(name)
    # operations on the deleted handle are typed errors
    with pytest.raises(smol.SmolError):
        m.exec(["true"])
    # deleting again is not an error, nor is deleting a name that does not exist
    m.delete()
    Machine.delete_by_name(name)


def test_context_manager_deletes_on_success(name):
    with Machine.create(MachineConfig(name=name)) as m:
        assert m.exec(["true"]).success
    assert m.state() == "deleted"
    with pytest.raises(smol.NotFoundError):
        Machine.open(name)


def test_open_connect_and_delete_by_name(name):
    m = Machine.create(MachineConfig(name=name, persistent=True))
    try:
        m.write_file("/root/persisted", "yes")
        m.stop()
        h = Machine.open(name)
        assert h.name == name and h.state() == "stopped"
        c = Machine.connect(name)  # boots it again
        assert c.state() == "running"
        assert c.read_file("/root/persisted") == b"yes"
    finally:
        Machine.delete_by_name(name)
    with pytest.raises(smol.NotFoundError):
        Machine.open(name)
    with pytest.raises(smol.NotFoundError):
        Machine.connect(unique("missing"))


def test_connect_a_machine_of_another_process(name):
    script = (
        "from smol import Machine, MachineConfig\n"
        f"m = Machine.create(MachineConfig(name={name!r}, persistent=True))\n"
        "m.write_file('/root/from-child', 'hello')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=os.environ.copy())
    try:
        [s] = [s for s in Machine.list() if s.name == name]
        assert s.persistent
        m = Machine.connect(name)  # attaches, or boots it again once it powered off
        assert m.state() == "running"
        assert m.read_file("/root/from-child") == b"hello"
        assert m.exec(["hostname"]).stdout == f"{name}\n"
    finally:
        Machine.delete_by_name(name)
    with pytest.raises(smol.NotFoundError):
        Machine.open(name)


def test_name_conflict(machine):
    with pytest.raises(smol.ConflictError) as ei:
        Machine.create(MachineConfig(name=machine.name))
    assert ei.value.code == "CONFLICT"
    assert machine.exec(["true"]).success  # the first one is untouched


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ports_endpoint_and_http(make_machine):
    host = _free_port()
    m = make_machine(MachineConfig(ports=[PortSpec(host=host, guest=8080)]))
    [p] = m.ports()
    assert (p.host, p.guest, p.protocol) == (host, 8080, "tcp")
    e = m.endpoint(8080)
    assert (e.http_url, e.ws_url, e.headers) == (f"http://127.0.0.1:{host}", f"ws://127.0.0.1:{host}", {})
    assert m.endpoint(8080, "/a/b?c=1").http_url == f"http://127.0.0.1:{host}/a/b?c=1"
    assert m.endpoint(8080, "//x").http_url == f"http://127.0.0.1:{host}/x"
    with pytest.raises(smol.InvalidConfigError):
        m.endpoint(9999)
    # a real HTTP server in the guest, reached through the endpoint
    m.write_file("/srv/www/index.html", "hello from the guest")
    m.exec(["sh", "-c", "busybox httpd -p 8080 -h /srv/www"]).assert_success()

    def fetch() -> bool:
        try:
            with urllib.request.urlopen(m.endpoint(8080, "index.html").http_url, timeout=5) as r:
                return r.read() == b"hello from the guest"
        except OSError:
            return False

    assert eventually(fetch, 15, 0.3)


def test_busy_host_port_is_a_conflict(name):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(smol.ConflictError) as ei:
            Machine.create(MachineConfig(name=name, ports=[PortSpec(host=port, guest=80)]))
        assert ei.value.port == port and ei.value.hint
    with pytest.raises(smol.NotFoundError):
        Machine.open(name)  # a failed create leaves nothing behind


def test_killed_vmm_gives_typed_error_and_process_survives(machine):
    pid = vmm_pid(machine.name)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(smol.SmolError) as ei:
        machine.exec(["true"])
    assert ei.value.code in ("INTERRUPTED", "INVALID_STATE"), repr(ei.value)
    assert isinstance(ei.value, (smol.MachineInterruptedError, smol.InvalidStateError))
    assert eventually(lambda: machine.state() == "stopped", 10)
    # the Python process carries on: other machines work
    with Machine.create() as other:
        assert other.exec(["echo", "alive"]).stdout == "alive\n"


def test_killed_vmm_during_exec(machine):
    import threading

    pid = vmm_pid(machine.name)
    threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
    with pytest.raises(smol.MachineInterruptedError) as ei:
        machine.exec(["sleep", "30"])
    assert ei.value.code == "INTERRUPTED"


def test_dropped_handle_kills_its_vm(name):
    m = Machine.create(MachineConfig(name=name))
    pid = vmm_pid(name)
    del m
    gc.collect()
    assert eventually(lambda: not pid_alive(pid), 10)
    assert name not in {s.name for s in Machine.list()}


def test_ready_timeout_reaches_the_core(name):
    # a readiness deadline no VM can meet: the create fails typed and leaves nothing behind
    with pytest.raises(smol.BootFailedError) as ei:
        Machine.create(MachineConfig(name=name, ready_timeout_seconds=0.05))
    assert ei.value.code == "BOOT_FAILED" and "50ms" in str(ei.value)
    assert isinstance(ei.value.log_tail, str) and ei.value.hint
    with pytest.raises(smol.NotFoundError):
        Machine.open(name)
