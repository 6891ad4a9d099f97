// execStream: live events, early break kills the command; AbortSignal on exec.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Machine, InvalidConfigError } from 'smolmachines';
import { uniqueName, waitFor } from './helpers.mjs';

describe('streaming and cancellation', () => {
  let m;
  before(async () => {
    m = await Machine.create({ name: uniqueName('stream') });
  });
  after(async () => {
    if (m) await m.delete();
  });

  /** Whether guest process `pid` is gone within 5 s. */
  async function goneInGuest(pid) {
    return waitFor(async () => (await m.exec(['kill', '-0', String(pid)])).exitCode !== 0, 5000);
  }

  test('events arrive while the command runs, then one exit event', async () => {
    const t0 = Date.now();
    const events = [];
    for await (const ev of m.execStream(['sh', '-c', 'echo a; sleep 1; echo b >&2; exit 7'])) {
      events.push({ ...ev, at: Date.now() - t0 });
    }
    assert.deepEqual(
      events.map(({ at, ...e }) => e),
      [
        { kind: 'stdout', data: 'a\n' },
        { kind: 'stderr', data: 'b\n' },
        { kind: 'exit', exitCode: 7 },
      ],
    );
    assert.ok(events[2].at - events[0].at >= 800, `first output came with the exit: ${JSON.stringify(events)}`);
  });

  test('a large output arrives complete and in order', async () => {
    let out = '';
    let exit;
    for await (const ev of m.execStream(['sh', '-c', 'seq 1 200000'])) {
      if (ev.kind === 'stdout') out += ev.data;
      else if (ev.kind === 'exit') exit = ev.exitCode;
    }
    assert.equal(exit, 0);
    const lines = out.trimEnd().split('\n');
    assert.equal(lines.length, 200000);
    assert.equal(lines[0], '1');
    assert.equal(lines[199999], '200000');
  });

  test('breaking out of the loop kills the command', async () => {
    let seen = '';
    for await (const ev of m.execStream(['sh', '-c', 'echo $$ > /tmp/stream.pid; echo started; exec sleep 60'])) {
      if (ev.kind === 'stdout') {
        seen += ev.data;
        break;
      }
    }
    assert.equal(seen, 'started\n');
    const pid = (await m.readFile('/tmp/stream.pid')).toString().trim();
    assert.ok(await goneInGuest(pid), `sleep (pid ${pid}) still runs after break`);
  });

  test('an invalid command rejects on the first iteration', async () => {
    const it = m.execStream([]);
    await assert.rejects(async () => {
      for await (const _ of it); // eslint-disable-line no-unused-vars
    }, InvalidConfigError);
  });

  test('an AbortSignal on exec kills the command and rejects with its reason', async () => {
    const ac = new AbortController();
    const reason = new Error('enough');
    setTimeout(() => ac.abort(reason), 1000);
    const t0 = Date.now();
    await assert.rejects(m.exec(['sh', '-c', 'echo $$ > /tmp/abort.pid; exec sleep 60'], { signal: ac.signal }), (e) => e === reason);
    assert.ok(Date.now() - t0 < 5000);
    const pid = (await m.readFile('/tmp/abort.pid')).toString().trim();
    assert.ok(await goneInGuest(pid), `sleep (pid ${pid}) still runs after abort`);
    // already aborted: rejects at once, nothing runs
    await assert.rejects(m.exec(['true'], { signal: AbortSignal.abort() }), { name: 'AbortError' });
    // a signal that never fires changes nothing
    assert.equal((await m.exec(['echo', 'ok'], { signal: new AbortController().signal })).stdout, 'ok\n');
  });

  test('an AbortSignal on execStream ends the stream with its reason', async () => {
    const ac = new AbortController();
    const reason = new Error('stop streaming');
    const kinds = [];
    await assert.rejects(async () => {
      for await (const ev of m.execStream(['sh', '-c', 'echo go; exec sleep 60'], { signal: ac.signal })) {
        kinds.push(ev.kind);
        ac.abort(reason);
      }
    }, (e) => e === reason);
    assert.deepEqual(kinds, ['stdout']);
  });
});
