// Portable checkpoints (SPEC §4.8) against real microVMs: checkpoint(output) writes one
// .smolcheckpoint file, Machine.restoreCheckpoint / restore brings its RAM and disk back as a new
// machine with its own hostname; a damaged or missing file is refused with nothing left.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Machine, InvalidConfigError, NotFoundError, NotSupportedError } from 'smolmachines';
import { uniqueName, withMachine } from './helpers.mjs';

const names = async () => new Set((await Machine.list()).map((r) => r.name));

async function sh(m, script) {
  const r = await m.exec(['sh', '-c', script]);
  assert.equal(r.exitCode, 0, r.stderr);
  return r.stdout;
}

function tmpFile(tag) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'smol-ckpt-'));
  return { dir, file: path.join(dir, `${tag}.smolcheckpoint`) };
}

const withSource = (fn) => withMachine({ name: uniqueName('ck'), branchable: true }, fn);

test('checkpoint + restoreCheckpoint: RAM and disk come back under a new hostname', async () => {
  const { dir, file } = tmpFile('a');
  try {
    await withSource(async (src) => {
      await sh(src, 'echo ram > /tmp/ram && echo disk > /root/disk && sync');
      const info = await src.checkpoint(file);
      assert.equal(info.id, file);
      assert.equal(info.status, 'available');
      assert.equal(info.machineId, src.name);
      assert.equal(info.sizeBytes, fs.statSync(file).size);
      assert.equal(typeof info.createdAt, 'string');
      assert.equal(typeof info.arch, 'string');
      await assert.rejects(src.checkpoints(), NotSupportedError);
      const name = uniqueName('rs');
      const r = await Machine.restoreCheckpoint(file, name);
      try {
        assert.equal(r.name, name);
        assert.equal(await sh(r, 'cat /tmp/ram /root/disk'), 'ram\ndisk\n');
        assert.equal((await sh(r, 'hostname')).trim(), name);
        // the source goes on
        assert.equal(await sh(src, 'cat /tmp/ram'), 'ram\n');
      } finally {
        await r.delete();
      }
      // the alias, with options
      const name2 = uniqueName('rs');
      const r2 = await Machine.restore(file, name2, undefined, { keepIdentity: true });
      try {
        assert.equal((await sh(r2, 'hostname')).trim(), src.name);
      } finally {
        await r2.delete();
      }
    });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a flipped byte is InvalidConfigError and leaves no machine; a missing file NotFoundError', async () => {
  const { dir, file } = tmpFile('b');
  try {
    await withSource(async (src) => {
      await src.checkpoint(file);
    });
    const fd = fs.openSync(file, 'r+');
    const at = Math.floor(fs.statSync(file).size / 2);
    const b = Buffer.alloc(1);
    fs.readSync(fd, b, 0, 1, at);
    b[0] ^= 0xff;
    fs.writeSync(fd, b, 0, 1, at);
    fs.closeSync(fd);
    const name = uniqueName('bad');
    await assert.rejects(Machine.restoreCheckpoint(file, name), (e) => e instanceof InvalidConfigError);
    assert.ok(!(await names()).has(name), 'a refused restore left a machine');
    await assert.rejects(
      Machine.restoreCheckpoint(path.join(dir, 'missing.smolcheckpoint'), uniqueName('nf')),
      NotFoundError,
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('argument errors are InvalidConfigError before anything runs', async () => {
  await withSource(async (src) => {
    await assert.rejects(src.checkpoint(), InvalidConfigError);
    await assert.rejects(src.checkpoint(5), InvalidConfigError);
    await assert.rejects(src.checkpoint('/tmp/x.smolcheckpoint', { stor: 'x' }), InvalidConfigError);
  });
  const id = '/tmp/none.smolcheckpoint';
  await assert.rejects(Machine.restoreCheckpoint(1, 'x'), InvalidConfigError);
  await assert.rejects(Machine.restoreCheckpoint(id, 'x', undefined, { keepIdentiy: true }), InvalidConfigError);
  await assert.rejects(Machine.restoreCheckpoint(id, 'x', undefined, { keepIdentity: 'yes' }), InvalidConfigError);
  await assert.rejects(Machine.restore(id, 'x', undefined, { networkPolicy: 'open' }), InvalidConfigError);
  await assert.rejects(Machine.restore(id, 'x', undefined, []), InvalidConfigError);
});

test('checkpoints into a store: manifest-only files, reused chunks, export, prune', async () => {
  const { dir, file } = tmpFile('s1');
  const store = path.join(dir, 'store');
  const second = path.join(dir, 's2.smolcheckpoint');
  const exported = path.join(dir, 'x.smolcheckpoint');
  try {
    let want;
    await withSource(async (src) => {
      await sh(src, 'head -c 3000000 /dev/urandom > /dev/shm/r; echo disk > /root/d');
      want = await sh(src, 'sha256sum /dev/shm/r /root/d');
      const a = await src.checkpoint(file, { store });
      assert.equal(a.sizeBytes, fs.statSync(file).size);
      assert.ok(a.sizeBytes < 1 << 20, `${a.sizeBytes}`);
      const b = await src.checkpoint(second, { store });
      assert.ok(b.reusedBytes >= 3000000, `${b.reusedBytes}`);
    });
    const n = Machine.exportCheckpoint(file, exported);
    assert.equal(n, fs.statSync(exported).size);
    assert.throws(() => Machine.exportCheckpoint(file, exported), InvalidConfigError);
    const r = await Machine.restoreCheckpoint(exported, uniqueName('sx'));
    try {
      assert.equal(await sh(r, 'sha256sum /dev/shm/r /root/d'), want);
    } finally {
      await r.delete();
    }
    assert.equal(Machine.pruneCheckpointStore(store), 0);
    fs.rmSync(file);
    fs.rmSync(second);
    assert.ok(Machine.pruneCheckpointStore(store) > 3000000);
    assert.throws(() => Machine.pruneCheckpointStore(path.join(dir, 'none')), NotFoundError);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
