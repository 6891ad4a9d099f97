// Shared test helpers: unique names, a machine per test that is always deleted, free ports,
// child Node processes, and the test OCI registry (scripts/test-registry.sh).
import { spawn, execFileSync } from 'node:child_process';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { Machine } from 'smolmachines';

export const pkgDir = fileURLToPath(new URL('..', import.meta.url));
export const repoRoot = path.resolve(pkgDir, '..', '..');
export const pkgEntry = new URL('../index.mjs', import.meta.url).href;

let seq = 0;
/** A machine name unique to this process and test. */
export function uniqueName(tag = 't') {
  return `node-${tag}-${process.pid}-${Date.now().toString(36)}-${seq++}`;
}

/** Runs `fn(machine)` on a fresh machine that is deleted afterwards, whatever happens. */
export async function withMachine(config, fn) {
  const m = await Machine.create({ name: uniqueName(), ...config });
  try {
    return await fn(m);
  } finally {
    await m.delete();
  }
}

/** A TCP port that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Whether a process exists. */
export function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Polls `cond` every 50 ms until it holds or `ms` passed; returns its last value. */
export async function waitFor(cond, ms = 5000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v || Date.now() > end) return v;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Runs an ES module body in a child Node process (with `smol` bound to the package) and
 * resolves with {code, signal, stdout, stderr}.
 */
export function runChild(body, { env = {}, timeoutMs = 60000, onStdout } = {}) {
  const code = `import * as smol from ${JSON.stringify(pkgEntry)};\nconst { Machine } = smol;\n${body}`;
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--input-type=module', '-e', code], {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => {
      stdout += d;
      if (onStdout) onStdout(stdout, child);
    });
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, pid: child.pid });
    });
  });
}

let registry = null;
/**
 * Starts the test registry once per process (stopped when this process exits) and returns
 * `127.0.0.1:<port>`.
 */
export function testRegistry() {
  if (!registry) {
    const out = execFileSync('bash', [path.join(repoRoot, 'scripts/test-registry.sh'), 'start', '--watch', String(process.pid)], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
      timeout: 600000,
    });
    const port = /^PORT=(\d+)$/m.exec(out);
    if (!port) throw new Error(`test-registry.sh printed no PORT: ${out}`);
    registry = `127.0.0.1:${port[1]}`;
  }
  return registry;
}
