"""Invalid configurations, options the local engine does not support, the cloud target, and
secrets in reprs. Each case that could create a machine checks that none was left behind."""

from __future__ import annotations

import pytest
from conftest import unique

import smol
from smol import (
    CacheDiskRef,
    ConnectOptions,
    CredentialSpec,
    EgressInterceptor,
    ExecOptions,
    Machine,
    MachineConfig,
    MountSpec,
    PortSpec,
    ResourceSpec,
)


def _assert_no_machine(name: str) -> None:
    with pytest.raises(smol.NotFoundError):
        Machine.open(name)


@pytest.mark.parametrize(
    "bad", ["a/b", "-leading-dash", "", "x" * 64, "spa ce", "ä"], ids=lambda s: repr(s)[:12]
)
def test_bad_machine_name(bad):
    with pytest.raises(smol.InvalidConfigError) as ei:
        Machine.create(MachineConfig(name=bad))
    assert ei.value.code == "INVALID_CONFIG"
    assert isinstance(ei.value, ValueError)
    with pytest.raises(smol.InvalidConfigError):
        Machine.connect(bad)


@pytest.mark.parametrize(
    "kw",
    [
        {"ports": [PortSpec(host=8080, guest=0)]},
        {"ports": [PortSpec(host=8080, guest=70000)]},
        {"resources": ResourceSpec(cpus=0)},
        # the core's one limit (Python used to allow 1024 and then the core refused 65)
        {"resources": ResourceSpec(cpus=65)},
        {"resources": ResourceSpec(memory_mb=-1)},
        {"resources": ResourceSpec(storage_gb=16385)},
        {"resources": ResourceSpec(allow_cidrs=["not-a-cidr"])},
        {"resources": ResourceSpec(disk_durability="sometimes")},
        {"labels": {"k": 1}},
        {"mounts": [MountSpec(source="/tmp", target="relative")]},
        {"credentials": [CredentialSpec(name="Bad Name", env_var="T", hosts=["h.test"])]},
        {"credentials": [CredentialSpec(name="ok", env_var="T", hosts=["*.h.test"])]},
        {"egress_interceptor": EgressInterceptor(address="127.0.0.1:1", token="short")},
        {"branchable": True, "egress_interceptor": EgressInterceptor("127.0.0.1:1", "ab" * 32)},
        {"cache_disk": object()},
    ],
    ids=["guest-port-0", "guest-port-range", "cpus-0", "cpus-65", "memory-negative",
         "storage-too-big", "bad-cidr", "bad-durability", "label-type", "mount-target-relative",
         "credential-name", "credential-wildcard", "interceptor-token", "interceptor-branchable",
         "cache-disk-type"],
)  # fmt: skip
def test_invalid_config_values(kw):
    name = unique()
    with pytest.raises(smol.InvalidConfigError):
        Machine.create(MachineConfig(name=name, **kw))
    _assert_no_machine(name)


def test_cloud_only_lifetimes_are_ignored_locally(name):
    # SPEC §11: auto_stop_seconds / ttl_seconds are cloud sweeps; the local target accepts and
    # ignores them (the machine lives as long as it would without them).
    cfg = MachineConfig(name=name, auto_stop_seconds=1, ttl_seconds=1)
    with Machine.create(cfg) as m:
        m.exec(["sleep", "2"]).assert_success()
        assert m.state() == "running"
        assert m.exec(["echo", "still here"]).stdout == "still here\n"


@pytest.mark.parametrize(
    "kw",
    [{"auto_stop_seconds": 0}, {"ttl_seconds": -5}, {"ttl_seconds": "60"}, {"auto_stop_seconds": True}],
    ids=["auto-stop-0", "ttl-negative", "ttl-str", "auto-stop-bool"],
)
def test_cloud_only_lifetimes_are_still_checked(kw):
    name = unique()
    with pytest.raises(smol.InvalidConfigError):
        Machine.create(MachineConfig(name=name, **kw))
    _assert_no_machine(name)


def test_bad_mount_source():
    name = unique()
    with pytest.raises(smol.InvalidConfigError, match="must be an absolute host path"):
        Machine.create(MachineConfig(name=name, mounts=[MountSpec(source="rel", target="/mnt")]))
    with pytest.raises(smol.NotFoundError, match="/no/such/dir"):
        Machine.create(MachineConfig(name=name, mounts=[MountSpec(source="/no/such/dir", target="/mnt")]))
    _assert_no_machine(name)


@pytest.mark.parametrize("t", [0, 0.0, -1, float("nan")])
def test_ready_timeout_must_be_positive(t):
    with pytest.raises(smol.InvalidConfigError):
        MachineConfig(ready_timeout_seconds=t)
    with pytest.raises(ValueError):  # SPEC: a ValueError at construction
        MachineConfig(ready_timeout_seconds=t)


def test_bad_command_field():
    for bad in ([], [""], "sh -c x"):
        with pytest.raises(ValueError):
            MachineConfig(command=bad)


def test_invalid_exec_arguments(machine):
    for t in (0, -1, 0.0):
        with pytest.raises(smol.InvalidConfigError) as ei:
            machine.exec(["true"], ExecOptions(timeout=t))
        assert ei.value.code == "INVALID_CONFIG"
    with pytest.raises(smol.InvalidConfigError):
        machine.exec(["true"], ExecOptions(timeout="5"))
    with pytest.raises(smol.InvalidConfigError):
        machine.exec(["pwd"], ExecOptions(workdir="tmp"))
    with pytest.raises(smol.InvalidConfigError):
        machine.exec([])
    with pytest.raises(smol.InvalidConfigError):
        machine.exec("uname -a")
    with pytest.raises(smol.InvalidConfigError):
        machine.exec(["echo", 1])
    with pytest.raises(smol.InvalidConfigError):
        machine.exec(["true"], ExecOptions(env={"A": 1}))
    with pytest.raises(smol.InvalidConfigError):
        machine.exec(["cat"], ExecOptions(stdin=b"\xff\xfe"))
    with pytest.raises(smol.InvalidConfigError):
        machine.exec(["true"], ExecOptions(user=""))
    with pytest.raises(smol.InvalidConfigError):
        machine.exec(["true"], ExecOptions(output="xml"))
    with pytest.raises(smol.InvalidConfigError):
        machine.exec_stream(["true"], ExecOptions(timeout=-2))
    with pytest.raises(smol.InvalidConfigError):
        machine.pull_image("")
    # a per-command user needs a machine created from an image
    with pytest.raises(smol.InvalidConfigError):
        machine.exec(["true"], ExecOptions(user="nobody"))
    assert machine.exec(["true"]).success


def test_branchable_machines_run_locally():
    # the local engine honours branchable (its RAM in a file that can be frozen; branching is
    # tested in test_branch.py): the alias forkable makes the same machine
    with Machine.create(MachineConfig(name=unique(), forkable=True)) as machine:
        assert machine.exec(["echo", "ok"]).stdout == "ok\n"


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"credentials": [CredentialSpec(name="gh", env_var="GH", hosts=["x.test"], value="s3cret")]}, "credentials"),
        ({"egress_interceptor": EgressInterceptor(address="127.0.0.1:1", token="ab" * 32)}, "egress_interceptor"),
        ({"cache_disk": CacheDiskRef(cache="deps")}, "cache_disk"),
        ({"ports": [PortSpec(host=0, guest=80)]}, "ports[].host = 0"),
        ({"resources": ResourceSpec(gpu=True)}, "resources.gpu"),
        ({"resources": ResourceSpec(cuda=True)}, "resources.cuda"),
        ({"resources": ResourceSpec(gpu_vram_mib=512)}, "resources.gpu_vram_mib"),
        ({"resources": ResourceSpec(overlay_gb=5)}, "resources.overlay_gb"),
        ({"resources": ResourceSpec(disk_durability="deferred")}, "resources.disk_durability"),
        ({"mounts": [MountSpec(source="/tmp", target="/mnt", staged=True)]}, "mounts[].staged"),
    ],
    ids=lambda c: c[1] if isinstance(c, str) else "",
)
def test_unsupported_config_fields_raise(kw, field):
    # accepted by the core's validation, refused by the local engine before anything boots,
    # naming the field and the target
    name = unique()
    with pytest.raises(smol.NotSupportedError) as ei:
        Machine.create(MachineConfig(name=name, **kw))
    assert ei.value.code == "NOT_SUPPORTED"
    msg = str(ei.value)
    assert field in msg and "local target" in msg, msg
    assert "s3cret" not in msg and "abab" not in msg
    _assert_no_machine(name)


@pytest.mark.parametrize(
    "kw",
    [
        # env / workdir apply to the workload: a bare machine without a command has none
        {"env": {"A": "1"}},
        {"workdir": "/tmp"},
        {"command": ["true"], "workdir": "relative"},
        {"command": ["true"], "env": {"A=B": "1"}},
        {"command": ["true"], "env": {"": "1"}},
        {"command": ["true"], "env": {"A": 1}},
        {"command": ["true"], "workdir": 7},
        # a workload that cannot start fails the create
        {"command": ["no-such-program"]},
    ],
    ids=lambda kw: repr(kw)[:40],
)
def test_invalid_workload_settings_raise(kw):
    name = unique()
    with pytest.raises(smol.InvalidConfigError) as ei:
        Machine.create(MachineConfig(name=name, **kw))
    assert ei.value.code == "INVALID_CONFIG"
    _assert_no_machine(name)


def test_a_command_emptied_after_construction_is_refused_at_create():
    # SPEC §3.4: an empty command is a ValueError; the engine's "launch nothing" is not offered
    for bad in ([], [""], ["ok", ""], "true"):
        cfg = MachineConfig(name=unique(), command=["true"])
        cfg.command = bad
        with pytest.raises(smol.InvalidConfigError):
            Machine.create(cfg)
        _assert_no_machine(cfg.name)
    with pytest.raises(ValueError):
        Machine.create({"name": unique(), "command": []})


def test_unsupported_options_on_a_machine(machine):
    with pytest.raises(smol.NotSupportedError):
        machine.stop(drain_secs=1)
    with pytest.raises(smol.NotSupportedError):
        machine.stop(timeout_secs=0)
    with pytest.raises(smol.NotSupportedError):
        machine.start(egress_interceptor=EgressInterceptor(address="127.0.0.1:1", token="t"))
    with pytest.raises(smol.NotSupportedError):
        machine.delete(include_usage=True)
    with pytest.raises(smol.NotSupportedError):
        machine.delete(drain_secs=1)
    assert machine.state() == "running"  # none of them did anything
    # accepted: the output format is a cloud response option; text and bytes are both here
    assert machine.exec(["echo", "x"], ExecOptions(output="text")).stdout_bytes == b"x\n"


def _closed_url() -> str:
    """A loopback URL nothing listens on: a cloud call there fails at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_cloud_target_goes_to_the_cloud_and_never_falls_back(monkeypatch):
    name = unique()
    url = _closed_url()
    with pytest.raises(smol.InvalidConfigError) as ei:  # no key
        Machine.create(MachineConfig(name=name), ConnectOptions(target="cloud"))
    assert "api_key" in str(ei.value)
    for conn in (
        ConnectOptions(api_key="smk_supersecret", base_url=url),
        ConnectOptions(target="cloud", api_key="smk_supersecret", base_url=url),
    ):
        with pytest.raises(smol.InvalidConfigError) as ei:  # no image
            Machine.create(MachineConfig(name=name), conn)
        assert "supersecret" not in str(ei.value)
        with pytest.raises(smol.SmolConnectionError) as ei:
            Machine.connect(name, conn)
        assert ei.value.code == "CONNECTION" and "supersecret" not in str(ei.value)
        with pytest.raises(smol.SmolConnectionError):
            Machine.list(conn)
    monkeypatch.setenv("SMOL_CLOUD_TOKEN", "smk_fromenv")
    monkeypatch.setenv("SMOL_CLOUD_URL", url)
    with pytest.raises(smol.InvalidConfigError):
        Machine.create(MachineConfig(name=name))
    with pytest.raises(smol.SmolConnectionError):
        Machine.list()
    # an explicit local target wins over the key
    assert isinstance(Machine.list(ConnectOptions(target="local", api_key="smk_x")), list)
    monkeypatch.delenv("SMOL_CLOUD_TOKEN")
    monkeypatch.delenv("SMOL_CLOUD_URL")
    _assert_no_machine(name)
    with pytest.raises(smol.InvalidConfigError):
        Machine.list(ConnectOptions(target="mars"))
    with pytest.raises(smol.NotSupportedError):
        Machine.create(None, ConnectOptions(egress_interceptor=EgressInterceptor("a:1", "t")))


def test_reprs_do_not_leak_secrets():
    c = ConnectOptions(target="cloud", api_key="smk_topsecret")
    assert "smk_topsecret" not in repr(c) and "<redacted>" in repr(c)
    assert "smk_topsecret" not in str(c)
    assert "s3cret" not in repr(CredentialSpec(name="n", env_var="E", hosts=["h"], value="s3cret"))
    assert "t0ken" not in repr(EgressInterceptor(address="127.0.0.1:1", token="t0ken"))
    cfg = MachineConfig(credentials=[CredentialSpec(name="n", env_var="E", hosts=["h"], value="s3cret")])
    assert "s3cret" not in repr(cfg)
    assert "ConnectOptions(target=None" in repr(ConnectOptions())


def test_error_types():
    e = smol.SmolError("SOME_CODE", "msg", status=409, retryable=True)
    assert (e.code, e.message, str(e), e.status, e.retryable) == ("SOME_CODE", "msg", "msg", 409, True)
    for cls, code in [
        (smol.NotSupportedError, "NOT_SUPPORTED"),
        (smol.InvalidConfigError, "INVALID_CONFIG"),
        (smol.NotFoundError, "NOT_FOUND"),
        (smol.ConflictError, "CONFLICT"),
        (smol.InvalidStateError, "INVALID_STATE"),
        (smol.MachineInterruptedError, "INTERRUPTED"),
        (smol.BootFailedError, "BOOT_FAILED"),
        (smol.SmolTimeoutError, "TIMEOUT"),
        (smol.HypervisorUnavailableError, "HYPERVISOR_UNAVAILABLE"),
    ]:
        err = cls("m")
        assert isinstance(err, smol.SmolError) and err.code == code and str(err) == "m"
    x = smol.ExecutionError("ls /x", 2, "o", "e")
    assert (x.code, x.command, x.exit_code, x.stdout, x.stderr) == ("COMMAND_FAILED", "ls /x", 2, "o", "e")
    assert str(x) == "command exited with code 2: ls /x"
    import pickle

    y = pickle.loads(pickle.dumps(x))
    assert type(y) is smol.ExecutionError and (y.code, y.exit_code) == ("COMMAND_FAILED", 2)


def test_machine_is_not_constructed_directly():
    with pytest.raises(TypeError):
        Machine()
