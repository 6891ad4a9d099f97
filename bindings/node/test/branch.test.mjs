// pause / resume and branching (SPEC §4.6, §4.8) against real microVMs: a clone has the
// source's RAM and disk as of the branch, then lives on its own.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Machine,
  InvalidStateError,
  InvalidConfigError,
  NotSupportedError,
  ConflictError,
} from 'smolmachines';
import { uniqueName, withMachine, freePort } from './helpers.mjs';

const names = async () => new Set((await Machine.list()).map((r) => r.name));

async function sh(m, script) {
  const r = await m.exec(['sh', '-c', script]);
  assert.equal(r.exitCode, 0, r.stderr);
  return r.stdout;
}

/** Runs `fn(source)` on a fresh branchable machine, deleted afterwards. */
const withSource = (fn) => withMachine({ name: uniqueName('src'), branchable: true }, fn);

test('pause: exec rejects with InvalidStateError; resume goes on with the memory kept', async () => {
  await withMachine({}, async (m) => {
    await sh(m, 'echo kept > /tmp/ram');
    await m.pause();
    assert.equal(await m.state(), 'paused');
    await assert.rejects(m.exec(['true']), (e) => e instanceof InvalidStateError && /paused/.test(e.message));
    await m.resume();
    assert.equal(await m.state(), 'running');
    assert.equal(await sh(m, 'cat /tmp/ram'), 'kept\n');
  });
});

test('resume() waits for readiness: a published port listened on again answers when it resolves', async () => {
  const port = await freePort();
  await withMachine({ ports: [{ host: port, guest: 8080 }] }, async (m) => {
    await assert.rejects(m.resume({ wait: true }), InvalidConfigError);
    await assert.rejects(m.resume({ waitUntilReady: 'yes' }), InvalidConfigError);
    // not ready: nothing listens on the guest port; without the wait resume resolves at once
    await m.pause();
    await m.resume({ waitUntilReady: false });
    assert.equal(await m.state(), 'running');
    assert.equal(await m.ready(), false);
    // a listener that starts 2 s (guest time, which stands still while paused) after the pause
    await sh(m, '(sleep 2; nc -ll -p 8080 -e cat) </dev/null >/dev/null 2>&1 &');
    await m.pause();
    await m.resume();
    assert.equal(await m.state(), 'running');
    assert.equal(await m.ready(), true, 'resume() resolved before the machine was ready');
  });
});

test('a clone has the RAM of its source at the branch, then diverges; its hostname is its name', async () => {
  await withSource(async (src) => {
    await sh(src, 'echo before > /tmp/mark');
    const clone = await src.branch(uniqueName('clone'));
    try {
      assert.equal(await clone.state(), 'running');
      assert.equal(await sh(clone, 'cat /tmp/mark'), 'before\n');
      assert.equal((await sh(clone, 'hostname')).trim(), clone.name);
      await sh(src, 'echo source > /tmp/after');
      await sh(clone, 'echo clone > /tmp/after');
      assert.equal(await sh(src, 'cat /tmp/after'), 'source\n');
      assert.equal(await sh(clone, 'cat /tmp/after'), 'clone\n');
    } finally {
      await clone.delete();
    }
    assert.ok(!(await names()).has(clone.name));
  });
});

test('branch refusals are typed', async () => {
  await withMachine({}, async (plain) => {
    await assert.rejects(plain.branch(uniqueName('c')), (e) => e instanceof InvalidStateError && /branchable/.test(e.message));
  });
  await withSource(async (src) => {
    await assert.rejects(src.branch('bad name!'), InvalidConfigError);
    await assert.rejects(src.branch(uniqueName('c'), { checkpointable: true }),
      (e) => e instanceof NotSupportedError && /checkpointable/.test(e.message));
    await assert.rejects(src.branch(uniqueName('c'), { bogus: 1 }), InvalidConfigError);
    await assert.rejects(src.branchBatch({}), (e) => e instanceof InvalidConfigError && /count >= 1 or a non-empty names/.test(e.message));
    await assert.rejects(src.forkBatch({ count: 65 }), InvalidConfigError);
    await assert.rejects(src.rewardFork([]), InvalidConfigError);
  });
});

test('branchBatch({count: 3}) gives three running clones; fork and forkBatch are aliases', async () => {
  await withSource(async (src) => {
    await sh(src, 'echo base > /tmp/base');
    const prefix = uniqueName('b');
    const clones = await src.branchBatch({ count: 3, namePrefix: prefix });
    try {
      assert.deepEqual(clones.map((c) => c.name), [1, 2, 3].map((n) => `${prefix}-${n}`));
      for (const c of clones) {
        assert.equal(await c.state(), 'running');
        assert.equal(await sh(c, 'cat /tmp/base; hostname'), `base\n${c.name}\n`);
      }
      const f = await src.fork(uniqueName('f'), []);
      clones.push(f);
      assert.equal((await sh(f, 'hostname')).trim(), f.name);
      const [fb] = await src.forkBatch({ names: [uniqueName('fb')] });
      clones.push(fb);
      assert.equal(await fb.state(), 'running');
    } finally {
      for (const c of clones) await c.delete();
    }
  });
});

test('a failed batch leaves no clone behind', async () => {
  await withSource(async (src) => {
    await withMachine({}, async (other) => {
      const first = uniqueName('ok');
      await assert.rejects(src.branchBatch({ names: [first, 'bad name!'] }), InvalidConfigError);
      assert.ok(!(await names()).has(first));
      // the third name is taken: the two clones made before it are deleted
      const second = uniqueName('ok');
      await assert.rejects(src.branchBatch({ names: [first, second, other.name] }), ConflictError);
      const after = await names();
      assert.ok(!after.has(first) && !after.has(second));
      assert.ok(after.has(other.name) && after.has(src.name));
      assert.equal(await other.state(), 'running');
    });
  });
});

test('rewardFork runs the grader in a throw-away clone and leaves no machine behind', async () => {
  await withSource(async (src) => {
    await sh(src, 'echo 0.75 > /tmp/score');
    const r = await src.rewardFork(['sh', '-c', 'cat /tmp/score; echo graded > /tmp/score; hostname']);
    assert.equal(r.exitCode, 0);
    const [score, host] = r.stdout.split(/\s+/);
    assert.equal(score, '0.75');
    assert.match(host, new RegExp(`^${src.name}-rf-[0-9a-f]{8}$`));
    assert.equal(await sh(src, 'cat /tmp/score'), '0.75\n');
    const failed = await src.rewardFork(['sh', '-c', 'exit 3'], {}, 'episode');
    assert.equal(failed.exitCode, 3);
    assert.deepEqual([...(await names())].filter((n) => n.includes('-rf-')), []);
  });
});

test('freezeSource leaves a frozen base that branches again', async () => {
  await withSource(async (src) => {
    await sh(src, 'echo base > /tmp/base');
    const clones = [await src.branch(uniqueName('fz'), { freezeSource: true })];
    try {
      assert.equal(await src.state(), 'frozen');
      await assert.rejects(src.exec(['true']), (e) => e instanceof InvalidStateError && /frozen/.test(e.message));
      clones.push(...(await src.branchBatch({ count: 2, namePrefix: uniqueName('fz') })));
      for (const c of clones) assert.equal(await sh(c, 'cat /tmp/base'), 'base\n');
    } finally {
      for (const c of clones) await c.delete();
    }
  });
});
