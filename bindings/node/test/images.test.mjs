// OCI images from the test registry (scripts/test-registry.sh): pullImage, listImages, a
// machine created from an image, run(image, argv).
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Machine, InvalidConfigError, NotFoundError, NotSupportedError } from 'smolmachines';
import { uniqueName, withMachine, testRegistry, waitFor } from './helpers.mjs';

const WORKLOAD_LOG = '/var/log/smol/workload.log';

/** The text of guest `path`, or '' while it does not exist. */
async function readText(m, path) {
  try {
    return new TextDecoder().decode(await m.readFile(path));
  } catch (e) {
    if (e instanceof NotFoundError) return '';
    throw e;
  }
}

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

  test("the image's workload (Entrypoint + Cmd) runs at create and at every boot; its output is in the workload log", async () => {
    // SPEC §3.4: busybox's Cmd is `sh -c 'cat /etc/motd'`
    await withMachine({ image: busybox }, async (im) => {
      const want = 'motd from layer 3\n';
      assert.equal(await waitFor(async () => (await readText(im, WORKLOAD_LOG)) === want, 20000), true, await readText(im, WORKLOAD_LOG));
      // relaunched by the next boot
      await im.writeFile(WORKLOAD_LOG, '');
      await im.stop();
      await im.start();
      assert.equal(await waitFor(async () => (await readText(im, WORKLOAD_LOG)) === want, 20000), true, await readText(im, WORKLOAD_LOG));
    });
  });

  test('env and workdir reach the image workload', async () => {
    await withMachine({ image: busybox, env: { GREETING: 'hi' }, workdir: '/tmp' }, async (im) => {
      assert.equal(await waitFor(async () => (await readText(im, WORKLOAD_LOG)).includes('motd from layer 3'), 20000), true);
      // they are the workload's: a plain exec keeps the image's Env and WorkingDir
      const r = await im.exec(['sh', '-c', 'echo "$SMOL_FIXTURE ${GREETING:-unset}"; pwd']);
      assert.equal(r.stdout, 'busybox unset\n/data\n', r.stderr);
    });
    // The image's Cmd (`/bin/sh -c 'cat /etc/motd'`, busybox applets) shows neither, so they are
    // observed through the failures they cause in the guest: the workload cannot start, create
    // rejects and leaves no machine.
    // (A missing workdir is reported by the core as NOT_FOUND, naming it.)
    for (const [config, ok] of [
      // a NUL in a value is refused on the host, naming the variable
      [{ env: { A: 'x\0y' } }, (e) => e instanceof InvalidConfigError && /NUL/.test(e.message) && /\bA\b/.test(e.message)],
      [{ workdir: '/no/such/dir' }, (e) => (e instanceof InvalidConfigError || e instanceof NotFoundError) && e.message.includes('/no/such/dir')],
    ]) {
      const name = uniqueName('wl');
      await assert.rejects(Machine.create({ name, image: busybox, ...config }), ok, JSON.stringify(config));
      assert.ok(!(await Machine.list()).some((x) => x.name === name), `${name} left behind`);
    }
  });

  test('invalid workload settings reject with InvalidConfigError', async () => {
    for (const config of [{ workdir: 'relative' }, { env: { 'A=B': 'x' } }, { env: { '': 'x' } }]) {
      const name = uniqueName('wl');
      await assert.rejects(
        Machine.create({ name, image: busybox, ...config }),
        (e) => e instanceof InvalidConfigError && e.code === 'INVALID_CONFIG',
        JSON.stringify(config),
      );
      assert.ok(!(await Machine.list()).some((x) => x.name === name), `${name} left behind`);
    }
    // `command` (SPEC §3.4) must be a non-empty argv of non-empty strings
    await assert.rejects(Machine.create({ name: uniqueName('wl'), image: busybox, command: [''] }), InvalidConfigError);
  });

  test('users of the image: per command and for the workload', async () => {
    const python = `${reg}/library/python:3.12`;
    const u = await Machine.create({ name: uniqueName('usr'), image: python, user: 'daemon', workdir: '/tmp' });
    try {
      const r = await u.exec(['sh', '-c', 'echo $(id -u):$(id -g) $USER'], { user: 'nobody', workdir: '/tmp' });
      assert.equal(r.stdout, '65534:65534 nobody\n');
      assert.equal((await u.exec(['id', '-u'])).stdout, '0\n');
      await assert.rejects(u.exec(['true'], { user: 'nosuch', workdir: '/tmp' }), InvalidConfigError);
    } finally {
      await u.delete();
    }
    const name = uniqueName('usr');
    await assert.rejects(Machine.create({ name, image: python, user: 'nosuch', workdir: '/tmp' }), InvalidConfigError);
    // a bare machine has no users to pick from
    await assert.rejects(m.exec(['true'], { user: 'nobody' }), InvalidConfigError);
  });

  test('run() refuses an AbortSignal and a user', async () => {
    await assert.rejects(m.run(busybox, ['true'], { signal: new AbortController().signal }), NotSupportedError);
    await assert.rejects(m.run(busybox, ['true'], { user: 'root' }), NotSupportedError);
  });
});
