// OCI images from the test registry (scripts/test-registry.sh): pullImage, listImages, a
// machine created from an image, run(image, argv).
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Machine, NotFoundError, NotSupportedError } from 'smolmachines';
import { uniqueName, withMachine, testRegistry } from './helpers.mjs';

describe('images', () => {
  let reg;
  let busybox;
  let m;
  before(async () => {
    reg = testRegistry();
    busybox = `${reg}/test/busybox:latest`;
    m = await Machine.create({ name: uniqueName('img') });
  });
  after(async () => {
    if (m) await m.delete();
  });

  test('pullImage returns an ImageInfo; listImages lists it', async () => {
    const info = await m.pullImage(busybox);
    assert.match(info.reference, /test\/busybox:latest$/);
    assert.match(info.digest, /^sha256:[0-9a-f]{64}$/);
    assert.ok(Number.isInteger(info.size) && info.size > 0, `size ${info.size}`);
    assert.equal(info.architecture, 'amd64');
    assert.equal(info.os, 'linux');
    const images = await m.listImages();
    assert.ok(images.some((i) => i.digest === info.digest), JSON.stringify(images));
    // pulled once: a second pull gives the same image
    assert.deepEqual(await m.pullImage(busybox), info);
  });

  test('an unknown tag is a NotFoundError naming it', async () => {
    const ref = `${reg}/test/busybox:no-such-tag`;
    await assert.rejects(m.pullImage(ref), (e) => e instanceof NotFoundError && e.code === 'NOT_FOUND' && e.message.includes(ref));
  });

  test('a machine created from an image runs in its root file system with its Env and WorkingDir', async () => {
    await withMachine({ image: busybox }, async (im) => {
      const row = (await Machine.list()).find((x) => x.name === im.name);
      assert.equal(row.image, busybox, 'list() shows the image reference');
      const r = await im.exec(['sh', '-c', 'cat /etc/motd; echo "$SMOL_FIXTURE"; pwd']);
      assert.equal(r.stdout, 'motd from layer 3\nbusybox\n/data\n', r.stderr);
    });
  });

  test('run(image, argv) runs the command in a container of the image', async () => {
    const r = await m.run(`${reg}/library/python:3.12`, ['python3', '-c', 'print(2**10)']);
    assert.equal(r.exitCode, 0, r.stderr);
    assert.equal(r.stdout, '1024\n');
  });

  test('run() refuses an AbortSignal and a user', async () => {
    await assert.rejects(m.run(busybox, ['true'], { signal: new AbortController().signal }), NotSupportedError);
    await assert.rejects(m.run(busybox, ['true'], { user: 'root' }), NotSupportedError);
  });
});
