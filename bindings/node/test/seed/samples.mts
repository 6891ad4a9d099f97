// The TypeScript samples of the seed API page (shared/seed/machine-api.txt), EXECUTED against the
// real local engine, as written, with the image names pointed at the test registry
// (scripts/test-registry.sh), host paths at a temporary directory and machine names made unique.
// Programs a sample names that the test images lack are swapped for ones they have, as in
// bindings/python/tests/test_seed.py (whose approach and scope this mirrors): `python` ->
// `python3`, `node script.js` -> a python3 one-liner, `pip install numpy` -> a shell script. The
// cloud samples go to a loopback port nothing listens on: a typed ConnectionError (never a
// local machine); test/cloud.test.mjs runs them, and the rest in cloud mode, against a fleet.
//
// test/seed.test.mjs compiles this file with tsc (test/seed/tsconfig.json, into the ignored
// test/seed/.build) and registers these tests with node:test. The declarations-only check of the
// same samples (and of mistakes the types must catch) is test/types/seed-samples.mts.
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createServer } from 'node:net';
import { Machine, ConnectionError, type ExecResult, type ImageInfo } from 'smolmachines';

export interface SeedContext {
  /** `127.0.0.1:<port>` of the test registry (started on first use, stopped with the process). */
  registry(): string;
  /** A machine name unique to this process and call. */
  unique(tag: string): string;
}

const connectionError = (e: unknown): boolean => e instanceof ConnectionError && e.code === 'CONNECTION';

/** `http://127.0.0.1:<port>` of a loopback port that was free a moment ago (nothing listens). */
function closedLoopbackUrl(): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      const port = typeof a === 'object' && a ? a.port : 0;
      s.close(() => resolve(`http://127.0.0.1:${port}`));
    });
  });
}

/** Runs `fn` with process.stdout captured (console.log writes there too); returns what it wrote. */
async function captureStdout(fn: () => Promise<void>): Promise<string> {
  const write = process.stdout.write;
  let out = '';
  process.stdout.write = ((chunk: string | Uint8Array) => {
    out += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
    return true;
  }) as typeof process.stdout.write;
  try {
    await fn();
  } finally {
    process.stdout.write = write;
  }
  return out;
}

export function seedTests(ctx: SeedContext): void {
  test('Creating a Machine (basic), Lifecycle Methods, exec()', async () => {
    // Basic creation (local embedded engine — the default)
    const machine = await Machine.create();
    try {
      const s = await machine.state(); // "running"
      assert.equal(s, 'running');
      const url = await machine.url(); // "https://…" or null
      assert.equal(url, null);

      const result = await machine.exec(['ls', '-la', '/']);
      assert.equal(result.exitCode, 0, result.stderr);
      assert.match(result.stdout, /proc/);
      // With options
      const result2 = await machine.exec(['long-running-task'], {
        timeout: 60, // seconds
        env: { MY_VAR: 'value' },
        workdir: '/tmp',
      });
      assert.equal(result2.exitCode, 127); // no such program in a bare machine: an exit code

      await machine.stop();
      assert.equal(await machine.state(), 'stopped');
    } finally {
      await machine.delete();
    }
    assert.equal(await machine.state(), 'deleted');
  });

  test('Creating a Machine (with configuration), Files, connect()', async () => {
    const hostCode = mkdtempSync(path.join(tmpdir(), 'smol-node-seed-')); // stands for /host/code
    writeFileSync(path.join(hostCode, 'main.py'), "print('from the host')\n");
    try {
      // With configuration
      const machine = await Machine.create({
        name: ctx.unique('configured-machine'),
        mounts: [{ source: hostCode, target: '/workspace' }],
        resources: {
          cpus: 2,
          memoryMb: 1024,
        },
      });
      try {
        assert.equal((await machine.exec(['cat', '/workspace/main.py'])).stdout, "print('from the host')\n");
        assert.equal((await machine.exec(['nproc'])).stdout, '2\n');

        // writeFile(): a string, then a string with a mode; readFile() gives a Buffer
        await machine.writeFile('/workspace/script.py', 'print("hi")');
        await machine.writeFile('/workspace/run.sh', '#!/bin/sh\necho hi\n', 0o755);
        assert.equal(readFileSync(path.join(hostCode, 'script.py'), 'utf8'), 'print("hi")'); // through the mount
        assert.equal((await machine.exec(['/workspace/run.sh'])).stdout, 'hi\n');
        (await machine.exec(['sh', '-c', "printf '\\001\\002' > /tmp/out.bin"])).assertSuccess();
        const buf = await machine.readFile('/tmp/out.bin'); // Buffer
        assert.ok(Buffer.isBuffer(buf));
        assert.deepEqual([...buf], [1, 2]);
      } finally {
        await machine.delete();
      }
    } finally {
      rmSync(hostCode, { recursive: true, force: true });
    }
  });

  test('connect(): attach to a persisted machine by name', async () => {
    const name = ctx.unique('my-machine');
    const made = await Machine.create({ name, persistent: true });
    try {
      await made.writeFile('/root/note.txt', 'kept');
      await made.stop();
      const machine = await Machine.connect(name); // starts it if stopped
      assert.equal(machine.name, name);
      assert.equal(await machine.state(), 'running');
      assert.equal((await machine.readFile('/root/note.txt')).toString(), 'kept');
    } finally {
      await made.delete();
    }
  });

  test('Choosing a backend: the cloud sample goes to the configured server, never a local machine', async () => {
    const baseUrl = await closedLoopbackUrl();
    await assert.rejects(async () => {
      // Cloud — image is required on the cloud target
      const machine = await Machine.create(
        { image: 'python:3.12', resources: { cpus: 2, memoryMb: 1024 } },
        { target: 'cloud', apiKey: 'smk_...', baseUrl },
      );
      console.log(await machine.url()); // public ingress URL (cloud)
    }, connectionError);
  });

  test('fork(): the cloud sample goes to the configured server at create', async () => {
    // The sample as printed, type-checked; its fork() is not reached here: creating the golden
    // on an unreachable server rejects first (test/cloud.test.mjs forks on a real fleet, and
    // test/branch.test.mjs branches locally).
    const baseUrl = await closedLoopbackUrl();
    await assert.rejects(async () => {
      const golden = await Machine.create(
        { image: 'python:3.12', forkable: true },
        { target: 'cloud', apiKey: 'smk_...', baseUrl },
      );
      const clone = await golden.fork('clone-1');
      await clone.delete();
      await golden.delete();
    }, connectionError);
  });

  describe('on one machine', () => {
    let machine: Machine;
    before(async () => {
      machine = await Machine.create({ name: ctx.unique('seed') });
    });
    after(async () => {
      if (machine) await machine.delete();
    });

    test('execStream()', async () => {
      const out = await captureStdout(async () => {
        for await (const ev of machine.execStream(['sh', '-c', 'echo Collecting numpy; echo warn >&2; exit 0'])) {
          if (ev.kind === 'stdout' || ev.kind === 'stderr') process.stdout.write(ev.data);
          else if (ev.kind === 'exit') console.log('exit', ev.exitCode);
        }
      });
      assert.ok(out.includes('Collecting numpy\n') && out.includes('warn\n'), out);
      assert.ok(out.endsWith('exit 0\n'), out);
    });

    test('Images: pullImage(), listImages()', async () => {
      const REG = ctx.registry();
      const info = await machine.pullImage(`${REG}/library/python:3.12`);
      assert.equal(info.os, 'linux');
      assert.match(info.digest, /^sha256:[0-9a-f]{64}$/);
      const images: ImageInfo[] = await machine.listImages();
      assert.ok(images.some((i) => i.reference.endsWith('library/python:3.12')), JSON.stringify(images));
    });

    test('run()', async () => {
      const REG = ctx.registry();
      const result = await machine.run(`${REG}/library/python:3.12`, ['python3', '-c', 'print("Hello")']);
      assert.equal(result.stdout, 'Hello\n', result.stderr);
      // With options
      const result2: ExecResult = await machine.run(
        `${REG}/library/python:3.12`,
        ['python3', '-c', 'import os; print(os.environ["NODE_ENV"])'],
        {
          timeout: 30,
          env: { NODE_ENV: 'production' },
        },
      );
      assert.equal(result2.stdout, 'production\n', result2.stderr);
    });
  });

  test('Best Practices: try/finally', async () => {
    const machine = await Machine.create({ name: ctx.unique('worker') });
    let who = '';
    try {
      who = (await machine.exec(['whoami'])).stdout;
    } finally {
      await machine.delete();
    }
    assert.equal(who, 'root\n');
    assert.equal(await machine.state(), 'deleted');
    assert.ok(!(await Machine.list()).some((r) => r.name === machine.name));
  });

  test('Best Practices: reuse machines', async () => {
    const tasks = [{ command: ['sh', '-c', 'echo 1 >> /tmp/log'] }, { command: ['sh', '-c', 'echo 2 >> /tmp/log'] }];
    let log = '';
    // Good — one machine, many commands
    const machine = await Machine.create({ name: ctx.unique('worker') });
    try {
      for (const task of tasks) {
        await machine.exec(task.command);
      }
      log = (await machine.readFile('/tmp/log')).toString();
    } finally {
      await machine.delete();
    }
    assert.equal(log, '1\n2\n');
  });
}
