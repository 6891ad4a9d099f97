// Files: writeFile / readFile, modes, 64 MiB byte-exact, typed errors.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { Machine, SmolError, NotFoundError, IsADirectoryError, InvalidConfigError } from 'smolmachines';
import { uniqueName } from './helpers.mjs';

describe('files', () => {
  let m;
  before(async () => {
    m = await Machine.create({ name: uniqueName('files') });
  });
  after(async () => {
    if (m) await m.delete();
  });

  test('a string is written as UTF-8 and readFile returns a Buffer', async () => {
    await m.writeFile('/tmp/a.txt', 'héllo wörld');
    const b = await m.readFile('/tmp/a.txt');
    assert.ok(Buffer.isBuffer(b));
    assert.equal(b.toString('utf8'), 'héllo wörld');
    assert.equal((await m.exec(['cat', '/tmp/a.txt'])).stdout, 'héllo wörld');
  });

  test('bytes are written exactly (Uint8Array, Buffer, a view into a larger buffer)', async () => {
    await m.writeFile('/root/bin.dat', new Uint8Array([0, 1, 2, 255]));
    assert.deepEqual([...(await m.readFile('/root/bin.dat'))], [0, 1, 2, 255]);
    const big = Buffer.from('xxABCDyy');
    await m.writeFile('/root/view.dat', big.subarray(2, 6));
    assert.equal((await m.readFile('/root/view.dat')).toString(), 'ABCD');
    await m.writeFile('/root/empty', '');
    assert.equal((await m.readFile('/root/empty')).length, 0);
  });

  test('mode: given (0o755 runs as a script) or 0644 by default; parents are created', async () => {
    await m.writeFile('/tmp/deep/er/run.sh', '#!/bin/sh\necho hi\n', 0o755);
    assert.equal((await m.exec(['/tmp/deep/er/run.sh'])).stdout, 'hi\n');
    assert.equal((await m.exec(['stat', '-c', '%a', '/tmp/deep/er/run.sh'])).stdout.trim(), '755');
    await m.writeFile('/tmp/plain.txt', 'x');
    assert.equal((await m.exec(['stat', '-c', '%a', '/tmp/plain.txt'])).stdout.trim(), '644');
  });

  test('64 MiB written and read back byte-exact', async () => {
    const data = randomBytes(64 << 20);
    const sha = createHash('sha256').update(data).digest('hex');
    await m.writeFile('/root/big.bin', data);
    const guest = await m.exec(['sha256sum', '/root/big.bin']);
    assert.equal(guest.stdout.split(' ')[0], sha, 'guest sees other bytes');
    const back = await m.readFile('/root/big.bin');
    assert.equal(back.length, data.length);
    assert.ok(back.equals(data), 'read back other bytes');
    await m.exec(['rm', '/root/big.bin']);
  });

  test('readFile of a missing path is a NotFoundError naming the path', async () => {
    await assert.rejects(m.readFile('/no/such/file'), (e) => {
      assert.ok(e instanceof NotFoundError, `${e.name}: ${e.message}`);
      assert.ok(e instanceof SmolError);
      assert.equal(e.code, 'NOT_FOUND');
      assert.equal(e.name, 'NotFoundError');
      assert.match(e.message, /\/no\/such\/file/);
      return true;
    });
  });

  test('readFile of a directory is an IsADirectoryError', async () => {
    await assert.rejects(m.readFile('/tmp'), (e) => e instanceof IsADirectoryError && e.code === 'IS_A_DIRECTORY');
  });

  test('bad paths, data and modes are InvalidConfigErrors', async () => {
    const isInvalid = (e) => e instanceof InvalidConfigError && e.code === 'INVALID_CONFIG';
    await assert.rejects(m.readFile('relative/path'), isInvalid);
    await assert.rejects(m.writeFile('relative', 'x'), isInvalid);
    await assert.rejects(m.readFile(42), isInvalid);
    await assert.rejects(m.writeFile('/tmp/x', 42), isInvalid);
    await assert.rejects(m.writeFile('/tmp/x', 'x', 0o10000), isInvalid);
    await assert.rejects(m.writeFile('/tmp/x', 'x', -1), isInvalid);
    await assert.rejects(m.writeFile('/tmp/x', 'x', 1.5), isInvalid);
  });
});
