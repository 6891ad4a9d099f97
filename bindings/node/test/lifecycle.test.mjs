// Machines across processes: connect() to a detached machine another process made; the
// SIGINT/SIGTERM handler stopping this process's machines before the process dies.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Machine } from 'smolmachines';
import { uniqueName, runChild, alive, waitFor } from './helpers.mjs';

test('connect() attaches to a detached machine created by another process', async () => {
  const name = uniqueName('detached');
  const child = await runChild(`
    const m = await Machine.create({ name: ${JSON.stringify(name)}, detach: true });
    await m.writeFile('/root/note.txt', 'written by the child');
    console.log('CREATED');`);
  assert.equal(child.code, 0, child.stderr);
  assert.match(child.stdout, /CREATED/);
  let m;
  try {
    const row = (await Machine.list()).find((r) => r.name === name);
    assert.ok(row, 'the detached machine is gone with its process');
    assert.equal(row.state, 'running');
    assert.equal(row.persistent, true);
    assert.equal(row.detached, true);
    m = await Machine.connect(name);
    assert.equal(m.name, name);
    assert.equal(await m.state(), 'running');
    assert.equal((await m.readFile('/root/note.txt')).toString(), 'written by the child');
    assert.equal((await m.exec(['echo', 'attached'])).stdout, 'attached\n');
  } finally {
    if (m) await m.delete();
    else await Machine.connect(name).then((x) => x.delete()).catch(() => {});
  }
  assert.ok(!(await Machine.list()).some((r) => r.name === name));
});

test('SIGTERM: the process stops its machines, then dies of the signal', async () => {
  const name = uniqueName('sig');
  let vmmPid;
  const child = await runChild(
    `
    const m = await Machine.create({ name: ${JSON.stringify(name)} });
    const pid = (await Machine.list()).find((r) => r.name === m.name).pid;
    console.log('READY ' + pid);
    setInterval(() => {}, 1000);`,
    {
      onStdout(out, proc) {
        const m = /READY (\d+)/.exec(out);
        if (m && !vmmPid) {
          vmmPid = Number(m[1]);
          proc.kill('SIGTERM');
        }
      },
    },
  );
  assert.ok(vmmPid, `child never got ready: ${child.stderr}`);
  assert.equal(child.signal, 'SIGTERM', `exit code ${child.code}: ${child.stderr}`);
  // stopped by the handler before the process died: no linger, no reaper needed
  assert.ok(!alive(vmmPid), 'the VMM outlived the process that got SIGTERM');
  // the reaper (run by list) removes the record of the dead owner's machine
  assert.ok(await waitFor(async () => !(await Machine.list()).some((r) => r.name === name), 5000));
});

test('handleSignals: false leaves the signal alone (the default action kills the process)', async () => {
  const name = uniqueName('nosig');
  const child = await runChild(
    `
    const m = await Machine.create({ name: ${JSON.stringify(name)} }, { handleSignals: false });
    console.log('READY ' + process.listenerCount('SIGTERM'));
    setInterval(() => {}, 1000);`,
    {
      onStdout(out, proc) {
        if (/READY/.test(out)) proc.kill('SIGTERM');
      },
    },
  );
  assert.match(child.stdout, /READY 0/);
  assert.equal(child.signal, 'SIGTERM');
  // the machine does not outlive its process
  assert.ok(await waitFor(async () => !(await Machine.list()).some((r) => r.name === name), 10000));
});
