// The errors of SPEC §8 that apply to the local target, each from a real situation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import net from 'node:net';
import {
  Machine,
  SmolError,
  InvalidConfigError,
  NotSupportedError,
  InterruptedError,
  InvalidStateError,
  MountError,
  NotFoundError,
  wrapNativeError,
} from 'smolmachines';
import { uniqueName, alive, runChild } from './helpers.mjs';

async function machineNames() {
  return new Set((await Machine.list()).map((r) => r.name));
}

test('invalid configurations reject with InvalidConfigError and create nothing', async () => {
  const before = await machineNames();
  const bad = [
    { name: 'bad name!' },
    { name: '-leading-dash' },
    { name: 'x'.repeat(64) },
    { memoryMB: 512 }, // a typo is not ignored
    { resources: { cpus: 'two' } },
    { resources: { memoryMb: -1 } },
    { resources: { cpus: NaN } },
    { ports: [{ host: 70000, guest: 80 }] },
    { ports: [{ guest: 80 }] },
    { mounts: [{ source: '/tmp' }] },
    { labels: { team: 1 } },
    { readyTimeoutSeconds: 0 },
    { persistent: 'yes' },
    // the core's one validation, its limits, and its alias rule
    { resources: { cpus: 1000 } },
    { resources: { allowCidrs: ['not-a-cidr'] } },
    { ttlSeconds: 0 },
    { resources: { diskDurability: 'sometimes' } },
    { credentials: [{ name: 'Bad Name', envVar: 'T', hosts: ['h.example'] }] },
  ];
  for (const config of bad) {
    await assert.rejects(
      Machine.create(config),
      (e) => e instanceof InvalidConfigError && e instanceof SmolError && e.code === 'INVALID_CONFIG',
      JSON.stringify(config),
    );
  }
  await assert.rejects(Machine.create('config'), InvalidConfigError);
  await assert.rejects(Machine.create({}, { target: 'moon' }), InvalidConfigError);
  await assert.rejects(Machine.create({}, { tagret: 'cloud' }), InvalidConfigError);
  await assert.rejects(Machine.connect('bad name!'), InvalidConfigError);
  const after = await machineNames();
  assert.deepEqual([...after].filter((n) => !before.has(n)), []);
});

test('branchable machines run locally (the alias forkable too)', async () => {
  const m = await Machine.create({ name: uniqueName('br'), forkable: true });
  try {
    assert.equal((await m.exec(['echo', 'ok'])).stdout, 'ok\n');
  } finally {
    await m.delete();
  }
});

test('fields the engine does not support yet reject with NotSupportedError naming field and target', async () => {
  const unsupported = [
    [{ credentials: [{ name: 'gh', envVar: 'GH_TOKEN', hosts: ['api.github.com'] }] }, 'credentials'],
    [{ egressInterceptor: { address: '127.0.0.1:1', token: 'a'.repeat(64) } }, 'egressInterceptor'],
    [{ cacheDisk: { cache: 'deps' } }, 'cacheDisk'],
    [{ resources: { gpu: true } }, 'resources.gpu'],
    [{ resources: { cuda: true } }, 'resources.cuda'],
    [{ resources: { overlayGb: 5 } }, 'resources.overlayGb'],
    [{ resources: { diskDurability: 'deferred' } }, 'resources.diskDurability'],
    [{ resources: { networkBackend: 'tsi' } }, 'resources.networkBackend'],
    [{ ports: [{ host: 0, guest: 80 }] }, 'ports[].host = 0'],
    [{ mounts: [{ source: '/tmp', target: '/mnt', staged: true }] }, 'mounts[].staged'],
  ];
  for (const [config, field] of unsupported) {
    await assert.rejects(
      Machine.create({ name: uniqueName('ns'), ...config }),
      (e) =>
        e instanceof NotSupportedError &&
        e.code === 'NOT_SUPPORTED' &&
        e.message.includes(field) &&
        e.message.includes('local target'),
      JSON.stringify(config),
    );
  }
  await assert.rejects(Machine.create({}, { egressInterceptor: { address: '127.0.0.1:1', token: 'x' } }), NotSupportedError);
});

test('env and workdir of a machine without a workload reject with InvalidConfigError', async () => {
  // SPEC §3.4: they apply to the image workload; a bare machine has none
  const before = await machineNames();
  for (const config of [{ env: { A: '1' } }, { workdir: '/srv' }, { env: { A: 1 } }, { workdir: 7 }]) {
    await assert.rejects(
      Machine.create({ name: uniqueName('wl'), ...config }),
      (e) => e instanceof InvalidConfigError && e.code === 'INVALID_CONFIG',
      JSON.stringify(config),
    );
  }
  // `command` (SPEC §3.4, Python's; taken by this package too) must be a non-empty argv
  await assert.rejects(
    Machine.create({ name: uniqueName('wl'), command: [''] }),
    (e) => e instanceof InvalidConfigError && /command/.test(e.message),
  );
  const after = await machineNames();
  assert.deepEqual([...after].filter((n) => !before.has(n)), []);
});

/** A loopback URL nothing listens on: a cloud call there fails at once. */
async function closedUrl() {
  const srv = net.createServer();
  await new Promise((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const { port } = srv.address();
  await new Promise((resolve) => srv.close(resolve));
  return `http://127.0.0.1:${port}`;
}

test('the cloud target goes to the cloud and never falls back to local', async () => {
  const before = await machineNames();
  const url = await closedUrl();
  const is = (code) => (e) => e instanceof SmolError && e.code === code && !/smk_test/.test(e.message);
  await assert.rejects(Machine.create({}, { target: 'cloud' }), is('INVALID_CONFIG')); // no key
  await assert.rejects(
    Machine.create({ image: 'python:3.12' }, { target: 'cloud', apiKey: 'smk_test', baseUrl: url }),
    is('CONNECTION'),
  );
  await assert.rejects(Machine.create({}, { apiKey: 'smk_test', baseUrl: url }), is('INVALID_CONFIG')); // no image
  await assert.rejects(Machine.connect('mach-123', { target: 'cloud' }), is('INVALID_CONFIG'));
  await assert.rejects(Machine.list({ target: 'cloud', apiKey: 'smk_test', baseUrl: url }), is('CONNECTION'));
  const saved = process.env.SMOL_CLOUD_TOKEN;
  const savedUrl = process.env.SMOL_CLOUD_URL;
  process.env.SMOL_CLOUD_TOKEN = 'smk_from_env';
  process.env.SMOL_CLOUD_URL = url;
  try {
    await assert.rejects(Machine.create(), is('INVALID_CONFIG'));
    await assert.rejects(Machine.list(), is('CONNECTION'));
    // an explicit local target wins over the key
    assert.ok(Array.isArray(await Machine.list({ target: 'local' })));
  } finally {
    if (saved === undefined) delete process.env.SMOL_CLOUD_TOKEN;
    else process.env.SMOL_CLOUD_TOKEN = saved;
    if (savedUrl === undefined) delete process.env.SMOL_CLOUD_URL;
    else process.env.SMOL_CLOUD_URL = savedUrl;
  }
  assert.ok(Array.isArray(await Machine.list({ target: 'local', apiKey: 'smk_test' })));
  const after = await machineNames();
  assert.deepEqual([...after].filter((n) => !before.has(n)), []);
});

test('a killed VMM: the running exec fails with InterruptedError, the next with InvalidStateError, Node lives on', async () => {
  const m = await Machine.create({ name: uniqueName('kill') });
  try {
    const pid = (await Machine.list()).find((r) => r.name === m.name).pid;
    assert.ok(pid && alive(pid));
    const running = m.exec(['sleep', '60']);
    await new Promise((r) => setTimeout(r, 500));
    process.kill(pid, 'SIGKILL');
    const t0 = Date.now();
    await assert.rejects(running, (e) => {
      assert.ok(e instanceof InterruptedError, `${e.name}: ${e.message}`);
      assert.equal(e.code, 'INTERRUPTED');
      assert.match(e.message, /SIGKILL/);
      return true;
    });
    assert.ok(Date.now() - t0 < 5000);
    assert.equal(await m.state(), 'stopped');
    await assert.rejects(m.exec(['true']), (e) => e instanceof InvalidStateError && e.code === 'INVALID_STATE');
    await assert.rejects(m.readFile('/etc/passwd'), InvalidStateError);
  } finally {
    await m.delete();
  }
  // the process is fine and the engine still works
  await Machine.create({ name: uniqueName('after') }).then(async (m2) => {
    try {
      assert.equal((await m2.exec(['echo', 'alive'])).stdout, 'alive\n');
    } finally {
      await m2.delete();
    }
  });
});

test('a mount of a missing host directory is a NotFoundError naming it', async () => {
  await assert.rejects(
    Machine.create({ name: uniqueName('mnt'), mounts: [{ source: '/nonexistent/smol-node-test', target: '/mnt/x' }] }),
    (e) => e instanceof NotFoundError && e.code === 'NOT_FOUND' && e.message.includes('/nonexistent/smol-node-test'),
  );
});

test('engine errors of a misconfigured host are typed, and localAvailability() says why', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'smol-node-test-'));
  const bogusKernel = path.join(dir, 'bogus-kernel');
  writeFileSync(bogusKernel, 'not a kernel');
  const assets = process.env.SMOL_ASSETS || path.join(process.env.SMOL_HOME || path.join(process.env.HOME, '.local/share/smol'), 'assets');
  const probe = `
    const out = { availability: Machine.localAvailability() };
    try { const m = await Machine.create(); await m.delete(); out.created = true; }
    catch (e) { out.error = { name: e.name, code: e.code, message: e.message, smol: e instanceof smol.SmolError, hint: e.hint }; }
    console.log(JSON.stringify(out));`;
  const cases = [
    { env: { SMOL_QEMU: '/nonexistent/qemu' }, code: 'HYPERVISOR_UNAVAILABLE', cls: 'HypervisorUnavailableError', avail: 'HYPERVISOR_UNAVAILABLE' },
    { env: { SMOL_KERNEL: '/nonexistent/vmlinux' }, code: 'NOT_FOUND', cls: 'NotFoundError', avail: 'RUNTIME_NOT_INSTALLED' },
    { env: { SMOL_KERNEL: bogusKernel }, code: 'BOOT_FAILED', cls: 'BootFailedError', avail: null },
    { env: { SMOL_HOME: '/dev/null/home', SMOL_ASSETS: assets }, code: 'STORAGE_ERROR', cls: 'StorageError', avail: null },
  ];
  if (Machine.localAvailability().accel === 'tcg') {
    cases.push({ env: { SMOL_ACCEL: 'kvm' }, code: 'KVM_UNAVAILABLE', cls: 'KvmUnavailableError', avail: 'KVM_UNAVAILABLE' });
  } else {
    t.diagnostic('KVM works here: the KVM_UNAVAILABLE case is not run');
  }
  try {
    const results = await Promise.all(cases.map((c) => runChild(probe, { env: c.env })));
    results.forEach((r, i) => {
      const c = cases[i];
      assert.equal(r.code, 0, `${JSON.stringify(c.env)}: ${r.stderr}`);
      const out = JSON.parse(r.stdout.trim().split('\n').pop());
      assert.ok(out.error, `${JSON.stringify(c.env)}: create succeeded`);
      assert.equal(out.error.code, c.code, `${JSON.stringify(c.env)}: ${out.error.message}`);
      assert.equal(out.error.name, c.cls);
      assert.equal(out.error.smol, true);
      if (c.avail) {
        assert.equal(out.availability.available, false);
        assert.equal(out.availability.code, c.avail);
        assert.ok(out.availability.reason.length > 0);
      }
      if (c.code === 'BOOT_FAILED') assert.ok(out.error.hint, 'BootFailed carries a hint');
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('wrapNativeError parses "[CODE] message" and falls back to SMOLVM_ERROR', () => {
  const e = wrapNativeError(new Error('[NOT_FOUND] not found: x\x1fdo this'));
  assert.equal(e.name, 'NotFoundError');
  assert.equal(e.code, 'NOT_FOUND');
  assert.equal(e.message, 'not found: x');
  assert.equal(e.hint, 'do this');
  const o = wrapNativeError(new Error('[SOMETHING_NEW] y'));
  assert.ok(o instanceof SmolError);
  assert.equal(o.code, 'SOMETHING_NEW');
  const f = wrapNativeError(new Error('plain'));
  assert.equal(f.code, 'SMOLVM_ERROR');
  assert.equal(f.message, 'plain');
});
