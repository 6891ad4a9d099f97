// Machine basics against the real local engine: exec semantics, ExecResult, timeouts, the event
// loop, list, ports, lifecycle, availability.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import * as smol from 'smolmachines';
import { Machine, ExecResult, ExecutionError, SmolError, InvalidConfigError, InvalidStateError, NotFoundError, ConflictError } from 'smolmachines';
import { uniqueName, withMachine, freePort, alive, waitFor } from './helpers.mjs';

test('localAvailability() says this host can run machines, and with which accelerator', () => {
  const a = Machine.localAvailability();
  assert.equal(a.available, true, JSON.stringify(a));
  assert.match(a.accel, /^(kvm|tcg)$/);
  assert.deepEqual(smol.localAvailability(), a);
});

describe('a running machine', () => {
  const label = uniqueName('label');
  let m;
  before(async () => {
    m = await Machine.create({ name: uniqueName('m'), labels: { suite: label }, resources: { cpus: 1, memoryMb: 256 } });
  });
  after(async () => {
    if (m) await m.delete();
  });

  test('name, id, state and url', async () => {
    assert.match(m.name, /^node-m-/);
    assert.equal(m.id, m.name);
    assert.equal(await m.state(), 'running');
    assert.equal(await m.url(), null);
  });

  test('exec gives exit code, stdout, stderr and the ExecResult fields', async () => {
    const r = await m.exec(['sh', '-c', 'printf out; printf err >&2; exit 3']);
    assert.ok(r instanceof ExecResult);
    assert.equal(r.exitCode, 3);
    assert.equal(r.stdout, 'out');
    assert.equal(r.stderr, 'err');
    assert.equal(r.output, 'outerr');
    assert.equal(r.success, false);
    assert.ok(Buffer.isBuffer(r.stdoutBytes));
    assert.deepEqual([...r.stdoutBytes], [...Buffer.from('out')]);
    assert.deepEqual([...r.stderrBytes], [...Buffer.from('err')]);
    assert.equal(r.stdoutTruncated, false);
    assert.equal(r.stderrTruncated, false);
    assert.equal(r.timedOut, false);
    const ok = await m.exec(['true']);
    assert.equal(ok.success, true);
    assert.equal(ok.exitCode, 0);
  });

  test('argv is passed verbatim, not through a shell', async () => {
    const r = await m.exec(['echo', 'a  b', '$HOME', '*', "'q'"]);
    assert.equal(r.stdout, "a  b $HOME * 'q'\n");
  });

  test('exec options: env, workdir, stdin', async () => {
    const r = await m.exec(['sh', '-c', 'echo "$FOO"; pwd; cat'], { env: { FOO: 'bar baz' }, workdir: '/tmp', stdin: 'from stdin' });
    assert.equal(r.stdout, 'bar baz\n/tmp\nfrom stdin');
    const b = await m.exec(['wc', '-c'], { stdin: new Uint8Array(1000) });
    assert.equal(b.stdout.trim(), '1000');
  });

  test('invalid UTF-8 output: lossy text, exact bytes', async () => {
    const r = await m.exec(['printf', '\\377A']);
    assert.equal(r.stdout, '\uFFFDA');
    assert.deepEqual([...r.stdoutBytes], [0xff, 0x41]);
  });

  test('a missing program is exit code 127, not an exception', async () => {
    const r = await m.exec(['/no/such/program']);
    assert.equal(r.exitCode, 127);
    assert.match(r.stderr, /not found|No such file/i);
  });

  test('timeout kills the command: exit code 124 without throwing, output so far kept', async () => {
    const t0 = Date.now();
    const r = await m.exec(['sh', '-c', 'echo started; sleep 30; echo never'], { timeout: 1 });
    const took = Date.now() - t0;
    assert.equal(r.exitCode, 124);
    assert.equal(r.timedOut, true);
    assert.equal(r.stdout, 'started\n');
    assert.ok(took >= 900 && took < 10000, `took ${took} ms`);
  });

  test('assertSuccess returns the result, or throws ExecutionError', async () => {
    const ok = await m.exec(['true']);
    assert.equal(ok.assertSuccess(), ok);
    const r = await m.exec(['sh', '-c', 'echo oops >&2; exit 5']);
    assert.throws(
      () => r.assertSuccess(),
      (e) => {
        assert.ok(e instanceof ExecutionError);
        assert.ok(e instanceof SmolError);
        assert.ok(e instanceof Error);
        assert.equal(e.code, 'COMMAND_FAILED');
        assert.equal(e.name, 'ExecutionError');
        assert.equal(e.exitCode, 5);
        assert.equal(e.stderr, 'oops\n');
        assert.match(e.message, /exited with code 5/);
        return true;
      },
    );
  });

  test('the event loop keeps running during a long exec', async () => {
    let ticks = 0;
    const timer = setInterval(() => ticks++, 20);
    const t0 = Date.now();
    try {
      const r = await m.exec(['sleep', '2']);
      assert.equal(r.exitCode, 0);
    } finally {
      clearInterval(timer);
    }
    const took = Date.now() - t0;
    assert.ok(took >= 1900, `exec took ${took} ms`);
    // 100 ticks if the loop were idle; a blocked loop gives 0 or 1
    assert.ok(ticks >= 40, `only ${ticks} timer ticks in ${took} ms`);
  });

  test('concurrent execs on one machine overlap', async () => {
    const t0 = Date.now();
    const rs = await Promise.all([1, 2, 3, 4].map((i) => m.exec(['sh', '-c', `sleep 1; echo ${i}`])));
    const took = Date.now() - t0;
    assert.deepEqual(rs.map((r) => r.stdout), ['1\n', '2\n', '3\n', '4\n']);
    assert.ok(took < 3500, `4 x sleep 1 took ${took} ms`);
  });

  test('list() shows the machine with its state, VMM pid, resources and labels', async () => {
    const rows = await Machine.list({}, { labels: { suite: label } });
    assert.equal(rows.length, 1, JSON.stringify(rows));
    const row = rows[0];
    assert.equal(row.name, m.name);
    assert.equal(row.id, m.name);
    assert.equal(row.state, 'running');
    assert.deepEqual(row.labels, { suite: label });
    assert.equal(row.persistent, false);
    assert.equal(row.detached, false);
    assert.equal(row.image, undefined);
    assert.deepEqual(row.resources, { cpus: 1, memoryMib: 256, storageGib: 20 });
    assert.deepEqual(row.ports, []);
    assert.match(row.createdAt, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
    const age = Date.now() - Date.parse(row.createdAt);
    assert.ok(age > -5000 && age < 600000, `createdAt ${row.createdAt}`);
    assert.ok(Number.isInteger(row.pid) && alive(row.pid), `pid ${row.pid}`);
    assert.ok((await Machine.list()).some((r) => r.name === m.name));
    assert.deepEqual(await Machine.list({}, { labels: { suite: `${label}-other` } }), []);
  });

  test('endpoint() of a port that is not published throws InvalidConfigError synchronously', () => {
    assert.throws(() => m.endpoint(8080), (e) => e instanceof InvalidConfigError && e.code === 'INVALID_CONFIG');
    assert.throws(() => m.endpoint(0), InvalidConfigError);
    assert.deepEqual(m.ports(), []);
  });

  test('invalid exec arguments reject with InvalidConfigError', async () => {
    const bad = [
      ['ls', undefined],
      [[], undefined],
      [['ls', 1], undefined],
      [['true'], { timeout: 0 }],
      [['true'], { timeout: -1 }],
      [['true'], { timeout: NaN }],
      [['true'], { cwd: '/' }],
      [['true'], { workdir: 'tmp' }],
      [['true'], { user: '' }],
      [['true'], { user: 'root' }],
      [['true'], { env: { A: 1 } }],
      [['true'], { stdin: 42 }],
      [['true'], 'opts'],
    ];
    for (const [argv, opts] of bad) {
      await assert.rejects(
        m.exec(argv, opts),
        (e) => e instanceof InvalidConfigError && e.code === 'INVALID_CONFIG',
        `exec(${JSON.stringify(argv)}, ${JSON.stringify(opts)})`,
      );
    }
  });

  test('a second machine with the same name is a ConflictError', async () => {
    await assert.rejects(Machine.create({ name: m.name }), (e) => e instanceof ConflictError && e.code === 'CONFLICT');
    assert.equal(await m.state(), 'running');
  });

  test('connect() to a machine that does not exist is a NotFoundError', async () => {
    await assert.rejects(Machine.connect(uniqueName('missing')), (e) => e instanceof NotFoundError && e.code === 'NOT_FOUND');
  });
});

describe('published ports', () => {
  test('endpoint() and fetch() reach a server in the guest', async () => {
    const port = await freePort();
    await withMachine({ ports: [{ host: port, guest: 8080 }] }, async (m) => {
      assert.deepEqual(m.ports(), [{ host: port, guest: 8080 }]);
      const row = (await Machine.list()).find((r) => r.name === m.name);
      assert.deepEqual(row.ports, [{ guest: 8080, host: port, protocol: 'tcp' }]);
      const ep = m.endpoint(8080, '/hello.txt');
      assert.equal(ep.httpUrl, `http://127.0.0.1:${port}/hello.txt`);
      assert.equal(ep.wsUrl, `ws://127.0.0.1:${port}/hello.txt`);
      assert.deepEqual(ep.headers, {});
      assert.equal(m.endpoint(8080).httpUrl, `http://127.0.0.1:${port}`);
      await m.writeFile('/tmp/www/hello.txt', 'hello from the guest\n');
      (await m.exec(['httpd', '-p', '8080', '-h', '/tmp/www'])).assertSuccess();
      const res = await waitFor(async () => {
        try {
          const r = await m.fetch(8080, 'hello.txt', { headers: { 'x-test': '1' } });
          return r.status === 200 ? r : null;
        } catch {
          return null;
        }
      }, 10000);
      assert.ok(res, 'the guest server never answered');
      assert.equal(await res.text(), 'hello from the guest\n');
    });
  });

  test('a host port that is in use is a ConflictError', async () => {
    const srv = createServer();
    await new Promise((r) => srv.listen(0, '127.0.0.1', r));
    const { port } = srv.address();
    const name = uniqueName('busy');
    try {
      await assert.rejects(Machine.create({ name, ports: [{ host: port, guest: 80 }] }), (e) => e instanceof ConflictError && e.code === 'CONFLICT');
    } finally {
      srv.close();
    }
    assert.ok(!(await Machine.list()).some((r) => r.name === name), 'a failed create left a record');
  });
});

test('cloud-only autoStopSeconds / ttlSeconds are accepted and ignored locally (SPEC §11)', async () => {
  await withMachine({ autoStopSeconds: 1, ttlSeconds: 1 }, async (m) => {
    (await m.exec(['sleep', '2'])).assertSuccess();
    assert.equal(await m.state(), 'running');
    assert.equal((await m.exec(['echo', 'still here'])).stdout, 'still here\n');
  });
  // still checked: a value that is not > 0 is an InvalidConfigError
  await assert.rejects(Machine.create({ name: uniqueName('ttl'), ttlSeconds: 0 }), InvalidConfigError);
  await assert.rejects(Machine.create({ name: uniqueName('ttl'), autoStopSeconds: -1 }), InvalidConfigError);
});

test('stop, start, delete', async () => {
  const m = await Machine.create({ name: uniqueName('life') });
  try {
    await m.writeFile('/root/keep.txt', 'kept across stop/start');
    const pid = (await Machine.list()).find((r) => r.name === m.name).pid;
    await m.stop();
    assert.equal(await m.state(), 'stopped');
    assert.ok(!alive(pid), 'VMM still running after stop');
    await assert.rejects(m.exec(['true']), (e) => e instanceof InvalidStateError && e.code === 'INVALID_STATE');
    await m.start();
    assert.equal(await m.state(), 'running');
    assert.equal((await m.readFile('/root/keep.txt')).toString(), 'kept across stop/start');
  } finally {
    await m.delete();
  }
  assert.equal(await m.state(), 'deleted');
  await assert.rejects(m.exec(['true']), InvalidStateError);
  await m.delete(); // idempotent
  assert.ok(!(await Machine.list()).some((r) => r.name === m.name));
});
