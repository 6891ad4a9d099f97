// Readiness (SPEC §4.2): ready(), readyAt(), waitUntilReady() against real microVMs with a
// published port, before and after a guest listener exists, and on a stopped machine.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TimeoutError, InvalidConfigError, SmolError } from 'smolmachines';
import { withMachine, freePort } from './helpers.mjs';

test('ready() waits for a guest listener behind the published port', async () => {
  const port = await freePort();
  await withMachine({ ports: [{ host: port, guest: 8080 }] }, async (m) => {
    assert.equal(await m.state(), 'running');
    assert.equal(await m.readyAt(), null);
    // running, but nothing listens on guest port 8080 yet (the host side accepts and resets)
    assert.equal(await m.ready(), false);
    const t0 = Date.now();
    await assert.rejects(
      m.waitUntilReady({ timeoutMs: 1500, intervalMs: 200 }),
      (e) => e instanceof TimeoutError && e instanceof SmolError && e.code === 'TIMEOUT',
    );
    const took = Date.now() - t0;
    assert.ok(took >= 1000 && took < 15000, `waitUntilReady gave up after ${took} ms`);
    for (const bad of [{ timeoutMs: 0 }, { intervalMs: -1 }, { timeoutMs: '5' }, { intervalMs: NaN }, { timeout: 5 }]) {
      await assert.rejects(m.waitUntilReady(bad), InvalidConfigError, JSON.stringify(bad));
    }
    await assert.rejects(m.waitUntilReady(5), InvalidConfigError);

    // a guest listener on 8080 (Node has no background exec: the shell detaches it)
    (await m.exec(['sh', '-c', 'nc -ll -p 8080 -e cat </dev/null >/dev/null 2>&1 &'])).assertSuccess();
    await m.waitUntilReady({ timeoutMs: 30000, intervalMs: 200 });
    assert.equal(await m.ready(), true);
    await m.waitUntilReady(); // already ready: resolves at once
    await m.waitUntilReady({ intervalMs: 100 });

    // a stopped machine is not ready
    await m.stop();
    assert.equal(await m.ready(), false);
    await assert.rejects(m.waitUntilReady({ timeoutMs: 500, intervalMs: 100 }), TimeoutError);
  });
});

test('a machine without published ports is ready while it runs', async () => {
  await withMachine({}, async (m) => {
    assert.equal(await m.ready(), true);
    await m.waitUntilReady({ timeoutMs: 5000 });
    await m.stop();
    assert.equal(await m.ready(), false);
    await m.start();
    await m.waitUntilReady({ timeoutMs: 30000, intervalMs: 100 });
    assert.equal(await m.ready(), true);
  });
});
