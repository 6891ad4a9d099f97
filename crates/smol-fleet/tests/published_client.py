"""The published Python client (smolmachines 1.32.2 from PyPI, unmodified) against a fleet.

Run by tests/published.rs: python published_client.py BASE_URL API_KEY IMAGE
"""

import os
import sys
import time

import smol
from smol import ConnectOptions, ExecOptions, Machine, MachineConfig

base, key, image = sys.argv[1:4]
conn = ConnectOptions(target="cloud", base_url=base, api_key=key)

t0 = time.monotonic()
m = Machine.create(MachineConfig(image=image, labels={"suite": "published"}), conn)
print(f"create: {time.monotonic() - t0:.2f}s name={m.name}", flush=True)
try:
    assert m.state() == "running", m.state()
    assert m.ready() is True

    r = m.exec(["sh", "-c", "echo hi; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, "hi\n", "err\n"), r
    r = m.exec(["busybox", "sleep", "30"], ExecOptions(timeout=1))
    assert r.exit_code == 124, r

    events = list(m.exec_stream(["sh", "-c", "echo a; echo b >&2; exit 5"]))
    out = "".join(e["data"] for e in events if e["kind"] == "stdout")
    err = "".join(e["data"] for e in events if e["kind"] == "stderr")
    assert (out, err) == ("a\n", "b\n"), events
    assert events[-1] == {"kind": "exit", "exit_code": 5}, events

    data = os.urandom(1 << 20)
    m.write_file("/data/blob.bin", data)
    assert m.read_file("/data/blob.bin") == data
    m.write_file("/data/a b?.txt", "spaced")
    assert m.read_file("/data/a b?.txt") == b"spaced"

    # ingress: an app in the guest, published, reached through request() / endpoint(), named by url()
    r = m.exec(["sh", "-c", "mkdir -p /srv && echo from-the-guest > /srv/index.html && busybox httpd -p 8080 -h /srv"])
    assert r.exit_code == 0, r
    p = m.publish(8080)
    assert (p.guest, p.protocol) == (8080, "tcp") and p.host, p
    assert [x.guest for x in m.ports()] == [8080], m.ports()
    assert m.url() is not None and m.url().startswith("http://8080-"), m.url()
    assert m.request(8080, "index.html") == b"from-the-guest\n"
    assert m.request(8080, "/index.html", method="HEAD") == b""
    ep = m.endpoint(8080, "index.html")
    assert ep.http_url == f"{base}/v1/machines/{m.id}/connect/8080/index.html", ep
    m.unpublish(8080)
    assert m.ports() == [] and m.url() is None, (m.ports(), m.url())

    listed = Machine.list(conn, labels={"suite": "published"})
    assert [s.name for s in listed] == [m.name], listed

    m.stop()
    assert m.state() == "stopped", m.state()
    again = Machine.connect(m.name, conn)
    r = again.exec(["busybox", "wc", "-c", "/data/blob.bin"])
    assert r.exit_code == 0 and r.stdout.startswith("1048576"), r
    assert again.state() == "running"
finally:
    m.delete()

try:
    Machine.connect(m.name, conn)
    raise AssertionError("a deleted machine was found")
except smol.SmolError as e:
    assert e.code == "NOT_FOUND", (e.code, e)

bad = ConnectOptions(target="cloud", base_url=base, api_key="smk_" + "A" * 43, max_retries=0)
try:
    Machine.list(bad)
    raise AssertionError("a bad key was accepted")
except smol.SmolError as e:
    assert e.code == "UNAUTHORIZED", (e.code, e)

print("published client: OK", flush=True)
