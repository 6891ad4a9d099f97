// The TypeScript samples of the seed page (shared/seed/machine-api.txt), type-checked against
// the shipped declarations (`tsc --noEmit -p test/types`), plus mistakes they must catch. Image
// names point at a local registry. Not executed here: test/seed/samples.mts runs each sample
// against the real engine (test/seed.test.mjs).
import {
  Machine,
  ExecResult,
  ExecEvent,
  SmolError,
  NotSupportedError,
  InvalidConfigError,
  ExecutionError,
  type ImageInfo,
  type MachineSummary,
  type LocalAvailability,
  type PortEndpoint,
  type WaitReadyOptions,
} from 'smolmachines';

const REG = '127.0.0.1:5000';
declare const tasks: { command: string[] }[];

export async function creating(): Promise<void> {
  // Basic creation (local embedded engine — the default)
  const machine = await Machine.create();
  // With configuration
  const configured = await Machine.create({
    name: 'configured-machine',
    mounts: [{ source: '/host/code', target: '/workspace' }],
    resources: {
      cpus: 2,
      memoryMb: 1024,
    },
  });
  await machine.delete();
  await configured.delete();
}

export async function choosingABackend(): Promise<void> {
  // Cloud — image is required on the cloud target
  const machine = await Machine.create(
    { image: `${REG}/library/python:3.12`, resources: { cpus: 2, memoryMb: 1024 } },
    { target: 'cloud', apiKey: 'smk_...' },
  );
  console.log(await machine.url()); // public ingress URL (cloud)
}

export async function lifecycle(machine: Machine): Promise<void> {
  const s = await machine.state(); // "running"
  const url: string | null = await machine.url(); // "https://…" or null
  await machine.stop();
  await machine.delete();
  const other = await Machine.connect('my-machine');
  console.log(s, url, other.name);
}

export async function execution(machine: Machine): Promise<void> {
  const result = await machine.exec(['ls', '-la', '/']);
  // With options
  const result2 = await machine.exec(['long-running-task'], {
    timeout: 60, // seconds
    env: { MY_VAR: 'value' },
    workdir: '/tmp',
  });
  const r3: ExecResult = await machine.run(`${REG}/library/python:3.12`, ['python', '-c', 'print("Hello")']);
  // With options
  const r4 = await machine.run(`${REG}/library/node:22-alpine`, ['node', 'script.js'], {
    timeout: 30,
    env: { NODE_ENV: 'production' },
  });
  for await (const ev of machine.execStream(['pip', 'install', 'numpy'])) {
    if (ev.kind === 'stdout' || ev.kind === 'stderr') process.stdout.write(ev.data);
    else if (ev.kind === 'exit') console.log('exit', ev.exitCode);
  }
  const code: number = result.exitCode;
  const out: string = result2.stdout + r3.output + r4.stderr;
  const ok: boolean = result.success;
  const bytes: Uint8Array = result.stdoutBytes;
  result.assertSuccess();
  console.log(code, out, ok, bytes.length);
}

export async function files(machine: Machine): Promise<void> {
  const buf = await machine.readFile('/tmp/out.bin'); // Buffer
  const b: Buffer = buf;
  await machine.writeFile('/workspace/script.py', 'print("hi")');
  await machine.writeFile('/workspace/run.sh', '#!/bin/sh\necho hi\n', 0o755);
  await machine.writeFile('/workspace/data.bin', new Uint8Array([1, 2, 3]));
  console.log(b.length);
}

export async function images(machine: Machine): Promise<void> {
  const info: ImageInfo = await machine.pullImage(`${REG}/library/python:3.12-alpine`);
  const images: ImageInfo[] = await machine.listImages();
  console.log(info.digest, info.size + 1, images.length);
}

export async function bestPractices(): Promise<void> {
  const machine = await Machine.create({ name: 'worker' });
  try {
    await machine.exec(['whoami']);
  } finally {
    await machine.delete();
  }
  // Good — one machine, many commands
  const m2 = await Machine.create({ name: 'worker' });
  try {
    for (const task of tasks) {
      await m2.exec(task.command);
    }
  } finally {
    await m2.delete();
  }
}

export async function extras(machine: Machine): Promise<void> {
  const ep: PortEndpoint = machine.endpoint(8080, '/health');
  const res: Response = await machine.fetch(8080, '/health', { method: 'POST', body: 'x', headers: { a: 'b' } });
  const rows: MachineSummary[] = await Machine.list({}, { labels: { team: 'red' } });
  const a: LocalAvailability = Machine.localAvailability();
  if (!a.available) console.log(a.code, a.reason);
  const ac = new AbortController();
  await machine.exec(['sleep', '9'], { signal: ac.signal, stdin: 'x' });
  try {
    await machine.exec(['false']);
  } catch (e) {
    if (e instanceof ExecutionError) console.log(e.exitCode, e.stderr);
    else if (e instanceof NotSupportedError || e instanceof InvalidConfigError) console.log(e.code);
    else if (e instanceof SmolError) console.log(e.code, e.hint);
  }
  const ev: ExecEvent = { kind: 'exit', exitCode: 0 };
  console.log(ep.httpUrl, res.status, rows[0]?.pid, ev);
  // readiness (SPEC §4.2)
  const isReady: boolean = await machine.ready();
  const readyAt: string | null = await machine.readyAt();
  await machine.waitUntilReady();
  await machine.waitUntilReady({ timeoutMs: 30000, intervalMs: 250 });
  const wait: WaitReadyOptions = { timeoutMs: 1 };
  console.log(isReady, readyAt, wait);
}

// Mistakes the declarations must catch.
export async function mistakes(machine: Machine): Promise<void> {
  // @ts-expect-error argv, not a shell string
  await machine.exec('ls -la');
  // @ts-expect-error memoryMb, not memoryMB
  await Machine.create({ resources: { memoryMB: 1 } });
  // @ts-expect-error the stream event of an exit has exitCode, not exit_code
  const bad: ExecEvent = { kind: 'exit', exit_code: 0 };
  // @ts-expect-error endpoint is synchronous
  await machine.endpoint(8080).then(() => {});
  // @ts-expect-error waitUntilReady takes timeoutMs (milliseconds), not timeout_s
  await machine.waitUntilReady({ timeout_s: 5 });
  // @ts-expect-error ready() is a Promise
  if (machine.ready() === true) console.log('never');
  console.log(bad);
}
