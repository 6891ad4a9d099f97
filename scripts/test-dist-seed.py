"""The local parts of the seed API page's Python samples (shared/seed/machine-api.txt), as a
user runs them after `pip install smolmachines-<v>-...whl` (scripts/test-dist.sh): create,
exec (with options), exec_stream, write_file / read_file, the context manager, delete. The
programs a bare machine lacks are swapped (`pip install numpy` -> a shell loop) and the files go
under /tmp (no host mount: virtiofsd is an optional feature). Exits non-zero on any mismatch."""

import sys

import smol
from smol import ExecOptions, Machine, MachineConfig

print("smol", smol.__version__)
avail = smol.local_availability()
print("local_availability:", tuple(avail), "accel:", avail.accel)
print("assets:", avail.assets)
assert avail.available, avail
assert avail.assets is not None and avail.assets[0] == "packaged", avail.assets

# Basic creation (local embedded engine — the default)
machine = Machine.create()
try:
    assert machine.state() == "running"
    result = machine.exec(["ls", "-la", "/"])
    assert result.exit_code == 0 and "proc" in result.stdout, result
    # With options
    result = machine.exec(
        ["sh", "-c", "echo $MY_VAR; pwd"],
        ExecOptions(
            timeout=60,  # seconds
            env={"MY_VAR": "value"},
            workdir="/tmp",
        ),
    )
    assert result.stdout == "value\n/tmp\n", result
    uname = machine.exec(["uname", "-a"]).stdout
    print(uname, end="")
    assert uname.startswith("Linux "), uname

    events = []
    for ev in machine.exec_stream(["sh", "-c", "for i in 1 2 3; do echo step $i; done; echo warn >&2"]):
        if ev["kind"] in ("stdout", "stderr"):
            print(ev["data"], end="")
            events.append(ev["kind"])
        elif ev["kind"] == "exit":
            print("exit", ev["exit_code"])
            assert ev["exit_code"] == 0, ev
            events.append("exit")
    assert events[-1] == "exit" and "stdout" in events and "stderr" in events, events

    machine.write_file("/tmp/script.py", 'print("hi")')
    machine.write_file("/tmp/run.sh", "#!/bin/sh\necho hi\n", 0o755)
    assert machine.exec(["/tmp/run.sh"]).stdout == "hi\n"
    machine.write_file("/tmp/out.bin", bytes(range(256)) * 1024)
    data = machine.read_file("/tmp/out.bin")  # bytes
    assert data == bytes(range(256)) * 1024, len(data)
    assert machine.read_file("/tmp/script.py") == b'print("hi")'
finally:
    machine.delete()
assert machine.state() == "deleted"

with Machine.create(MachineConfig(name="worker")) as machine:
    assert machine.exec(["whoami"]).stdout == "root\n"
# Automatically deleted, even on error
print("python seed samples: ok")
sys.exit(0)
