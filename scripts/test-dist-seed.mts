// The local parts of the seed API page's TypeScript samples (shared/seed/machine-api.txt), as a
// user runs them after `npm install ./smolmachines-<v>.tgz` (scripts/test-dist.sh compiles this
// file with tsc against the installed package's declarations, on the build machine, and runs the
// JavaScript in the test root): create, exec (with options), execStream, writeFile / readFile,
// try/finally delete. Programs a bare machine lacks are swapped (`pip install numpy` -> a shell
// loop); files go under /tmp (no host mount). Throws (exit code 1) on any mismatch.
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { Machine, localAvailability, version } from 'smolmachines';

const pkg = createRequire(import.meta.url)('smolmachines/package.json') as { version: string };
console.log('smolmachines', version);
assert.equal(version, pkg.version);
const avail = localAvailability();
console.log('localAvailability:', avail);
assert.ok(avail.available, JSON.stringify(avail));
assert.equal(avail.assets?.source, 'packaged');

// Basic creation (local embedded engine — the default)
const machine = await Machine.create();
try {
  assert.equal(await machine.state(), 'running');
  const result = await machine.exec(['ls', '-la', '/']);
  assert.equal(result.exitCode, 0, result.stderr);
  assert.match(result.stdout, /proc/);
  // With options
  const result2 = await machine.exec(['sh', '-c', 'echo $MY_VAR; pwd'], {
    timeout: 60, // seconds
    env: { MY_VAR: 'value' },
    workdir: '/tmp',
  });
  assert.equal(result2.stdout, 'value\n/tmp\n');
  const uname = (await machine.exec(['uname', '-a'])).stdout;
  process.stdout.write(uname);
  assert.match(uname, /^Linux /);

  const kinds: string[] = [];
  for await (const ev of machine.execStream(['sh', '-c', 'for i in 1 2 3; do echo step $i; done; echo warn >&2'])) {
    if (ev.kind === 'stdout' || ev.kind === 'stderr') {
      process.stdout.write(ev.data);
      kinds.push(ev.kind);
    } else if (ev.kind === 'exit') {
      console.log('exit', ev.exitCode);
      assert.equal(ev.exitCode, 0);
      kinds.push('exit');
    }
  }
  assert.equal(kinds[kinds.length - 1], 'exit');
  assert.ok(kinds.includes('stdout') && kinds.includes('stderr'), kinds.join(','));

  await machine.writeFile('/tmp/script.py', 'print("hi")');
  await machine.writeFile('/tmp/run.sh', '#!/bin/sh\necho hi\n', 0o755);
  assert.equal((await machine.exec(['/tmp/run.sh'])).stdout, 'hi\n');
  const bytes = Buffer.alloc(256 * 1024, 0).map((_, i) => i % 256);
  await machine.writeFile('/tmp/out.bin', bytes);
  const buf = await machine.readFile('/tmp/out.bin'); // Buffer
  assert.ok(buf.equals(bytes), `read ${buf.length} bytes`);
} finally {
  await machine.delete();
}
assert.equal(await machine.state(), 'deleted');

const worker = await Machine.create({ name: 'worker' });
try {
  assert.equal((await worker.exec(['whoami'])).stdout, 'root\n');
} finally {
  await worker.delete();
}
console.log('typescript seed samples: ok');
