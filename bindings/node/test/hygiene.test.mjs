// Input hygiene (issue 10): what the guest cannot take is refused on the host with a typed
// error naming the argument, before anything runs; the one validation is the core's.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import os from 'node:os';
import fs from 'node:fs';
import path from 'node:path';
import { Machine, InvalidConfigError, NotFoundError } from 'smolmachines';
import { uniqueName, withMachine } from './helpers.mjs';

const invalid = (re) => (e) => e instanceof InvalidConfigError && e.code === 'INVALID_CONFIG' && re.test(e.message);

test('ranges are the core\'s: cpus 65 and storage 16385 are refused with its message', async () => {
  await assert.rejects(Machine.create({ name: uniqueName('r'), resources: { cpus: 65 } }),
    invalid(/resources\.cpus must be 1\.\.=64, got 65/));
  await assert.rejects(Machine.create({ name: uniqueName('r'), resources: { storageGb: 16385 } }),
    invalid(/resources\.storage_gb must be 1\.\.=16384, got 16385/));
});

test('mount targets of the guest kernel are refused; mount sources are typed', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'smol-hyg-'));
  fs.writeFileSync(path.join(dir, 'f'), 'x');
  try {
    for (const target of ['/proc', '/sys/kernel', '/dev', '/dev/shm', '/']) {
      await assert.rejects(Machine.create({ name: uniqueName('m'), mounts: [{ source: dir, target }] }),
        invalid(/mount target/), target);
    }
    await assert.rejects(Machine.create({ name: uniqueName('m'), mounts: [{ source: '/no/such/dir', target: '/w' }] }),
      (e) => e instanceof NotFoundError && /\/no\/such\/dir/.test(e.message));
    await assert.rejects(Machine.create({ name: uniqueName('m'), mounts: [{ source: path.join(dir, 'f'), target: '/w' }] }),
      invalid(/not a directory/));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('argv and env the guest cannot take are refused; a huge timeout is allowed', async () => {
  await withMachine({}, async (m) => {
    await assert.rejects(m.exec(['echo', 'a', 'b\0c']), invalid(/argument 2 contains a NUL/));
    await assert.rejects(m.exec(['env'], { env: { 'A=B': 'c' } }), invalid(/"A=B"/));
    await assert.rejects(m.exec(['env'], { env: { '': 'c' } }), invalid(/is empty/));
    await assert.rejects(m.exec(['env'], { env: { V: 'x\0y' } }), invalid(/NUL/));
    const r = await m.exec(['sh', '-c', 'echo "$A"'], { env: { A: 'B=c' }, timeout: 1e300 });
    assert.equal(r.exitCode, 0);
    assert.equal(r.stdout, 'B=c\n');
    for (const timeout of [0, -1]) {
      await assert.rejects(m.exec(['true'], { timeout }), invalid(/timeout/));
    }
  });
});
