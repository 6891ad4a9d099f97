"""The Python samples of the seed API page (shared/seed/machine-api.txt), as written, with the
image names pointed at the local test registry, host paths at a temporary directory, and
machine names made unique. The cloud samples go to the configured server (none listens here:
a typed connection error)."""

from __future__ import annotations

import pathlib
import re

import pytest
from conftest import unique

import smol
from smol import ConnectOptions, ExecOptions, Machine, MachineConfig, MountSpec, ResourceSpec

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_basic_creation_and_lifecycle():
    machine = Machine.create()
    try:
        s = machine.state()
        assert s == "running"
        url = machine.url()
        assert url is None
        result = machine.exec(["ls", "-la", "/"])
        assert result.exit_code == 0 and "proc" in result.stdout
        result = machine.exec(
            ["long-running-task"],
            ExecOptions(
                timeout=60,  # seconds
                env={"MY_VAR": "value"},
                workdir="/tmp",
            ),
        )
        assert result.exit_code == 127  # no such program in a bare machine: an exit code
        machine.stop()
        assert machine.state() == "stopped"
    finally:
        machine.delete()
    assert machine.state() == "deleted"


def test_creation_with_configuration(tmp_path):
    (tmp_path / "main.py").write_text("print('from the host')\n")
    config = MachineConfig(
        name=unique("configured-machine"),
        mounts=[MountSpec(source=str(tmp_path), target="/workspace")],
        resources=ResourceSpec(cpus=2, memory_mb=1024),
    )
    machine = Machine.create(config)
    try:
        assert machine.exec(["cat", "/workspace/main.py"]).stdout == "print('from the host')\n"
        assert machine.exec(["nproc"]).stdout == "2\n"
        # files: write_file with str / mode, read_file returns bytes
        machine.write_file("/workspace/script.py", 'print("hi")')
        machine.write_file("/workspace/run.sh", "#!/bin/sh\necho hi\n", 0o755)
        assert (tmp_path / "script.py").read_text() == 'print("hi")'  # through the mount
        assert machine.exec(["/workspace/run.sh"]).stdout == "hi\n"
        machine.exec(["sh", "-c", "printf '\\001\\002' > /tmp/out.bin"])
        data = machine.read_file("/tmp/out.bin")
        assert data == b"\x01\x02"
        # reconnect by name: this process's handle is shared
        again = Machine.connect(machine.name)
        assert again.exec(["echo", "same"]).stdout == "same\n"
    finally:
        machine.delete()


def test_cloud_samples_go_to_the_configured_server():
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(smol.SmolConnectionError):
        Machine.create(
            MachineConfig(image="python:3.12"),
            ConnectOptions(target="cloud", api_key="smk_...", base_url=url),
        )


def test_exec_stream_sample(machine, capsys):
    for ev in machine.exec_stream(["sh", "-c", "echo Collecting numpy; echo warn >&2; exit 0"]):
        if ev["kind"] in ("stdout", "stderr"):
            print(ev["data"], end="")
        elif ev["kind"] == "exit":
            print("exit", ev["exit_code"])
    out = capsys.readouterr().out
    assert "Collecting numpy\n" in out and "warn\n" in out and out.endswith("exit 0\n")


def test_images_samples(machine, registry):
    info = machine.pull_image(f"{registry}/library/python:3.12")
    assert info.os == "linux"
    images = machine.list_images()
    assert any(i.reference.endswith("library/python:3.12") for i in images)


def test_run_sample(machine, registry):
    result = machine.run(f"{registry}/library/python:3.12", ["python3", "-c", "print('Hello')"])
    assert result.stdout == "Hello\n"
    result = machine.run(
        f"{registry}/library/python:3.12",
        ["python3", "-c", "import os; print(os.environ['NODE_ENV'])"],
        ExecOptions(timeout=30, env={"NODE_ENV": "production"}),
    )
    assert result.stdout == "production\n"


def test_context_manager_sample():
    name = unique("worker")
    with Machine.create(MachineConfig(name=name)) as machine:
        assert machine.exec(["whoami"]).stdout == "root\n"
    # Automatically deleted, even on error
    with pytest.raises(smol.NotFoundError):
        Machine.open(name)


def test_readme_sample_runs_as_printed():
    [code] = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    exec(compile(code, str(README), "exec"), {})


def test_top_level_readme_sample_runs_as_printed(capsys):
    top = pathlib.Path(__file__).resolve().parents[3] / "README.md"
    [code] = re.findall(r"```python\n(.*?)```", top.read_text(), re.S)
    exec(compile(code, str(top), "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("Linux "), out
    assert "'kind': 'exit', 'exit_code': 0" in out, out
