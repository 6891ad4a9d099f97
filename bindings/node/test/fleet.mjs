// A real fleet server for the cloud tests: the `smolfleet` binary built by cargo
// (`cargo build --release -p smol-fleet`; ci.sh does it; SMOLFLEET names another), started on
// 127.0.0.1 over a fresh home; its bootstrap admin key is read from its stdout. Without a built
// binary, startFleet() says why (the callers skip; SMOL_VM_TESTS=required makes it an error).
import { spawn } from 'node:child_process';
import { accessSync, constants, mkdtempSync, openSync, closeSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { Machine } from 'smolmachines';
import { repoRoot } from './helpers.mjs';

function binary() {
  const target = process.env.CARGO_TARGET_DIR || path.join(repoRoot, 'target');
  const candidates = process.env.SMOLFLEET
    ? [process.env.SMOLFLEET]
    : [path.join(target, 'release/smolfleet'), path.join(target, 'debug/smolfleet')];
  for (const c of candidates) {
    try {
      accessSync(c, constants.X_OK);
      return { path: c };
    } catch {
      // next candidate
    }
  }
  return { missing: `no smolfleet binary (${candidates.join(', ')}): cargo build --release -p smol-fleet` };
}

/**
 * Starts a fleet. Resolves with `{ baseUrl, apiKey, conn, stop() }`, or `{ skip: reason }` when
 * no binary is built (an error instead under SMOL_VM_TESTS=required).
 */
export async function startFleet() {
  const bin = binary();
  if (bin.missing) {
    if (process.env.SMOL_VM_TESTS === 'required') {
      throw new Error(`the fleet is required (SMOL_VM_TESTS=required) but ${bin.missing}`);
    }
    return { skip: bin.missing };
  }
  const home = mkdtempSync('/tmp/sfnd'); // short: unix socket paths under it
  const logPath = path.join(home, 'smolfleet.log');
  const log = openSync(logPath, 'w');
  const env = { ...process.env, SMOL_LOG: process.env.SMOL_LOG || 'warn' };
  delete env.SMOL_CLOUD_TOKEN;
  delete env.SMOL_CLOUD_URL;
  const child = spawn(bin.path, ['serve', '--listen', '127.0.0.1:0', '--home', home], {
    env,
    stdio: ['ignore', 'pipe', log],
  });
  closeSync(log);
  let out = '';
  const ready = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`smolfleet printed no key and address in 60 s: ${out}`)), 60000);
    child.stdout.on('data', (d) => {
      out += d;
      const url = /^listening on (http:\/\/\S+)$/m.exec(out);
      const key = /^bootstrap admin key .*: (smk_\S+)$/m.exec(out);
      if (url && key) {
        clearTimeout(timer);
        resolve({ baseUrl: url[1], apiKey: key[1] });
      }
    });
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`smolfleet exited (${code ?? signal}): ${out}\n${readFileSync(logPath, 'utf8')}`));
    });
  });
  let started;
  try {
    started = await ready;
  } catch (e) {
    child.kill('SIGKILL');
    rmSync(home, { recursive: true, force: true });
    throw e;
  }
  const conn = { target: 'cloud', baseUrl: started.baseUrl, apiKey: started.apiKey };
  const exited = new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', resolve);
  });
  return {
    ...started,
    conn,
    home,
    /** Deletes every machine of the tenant (detached VMs outlive the server), then stops it. */
    async stop() {
      try {
        for (const s of await Machine.list(conn)) {
          try {
            await (await Machine.connect(s.name, conn)).delete();
          } catch (e) {
            if (e.code !== 'NOT_FOUND') throw e;
          }
        }
      } finally {
        child.kill('SIGINT'); // its ctrl-c: a clean shutdown
        const timer = setTimeout(() => child.kill('SIGKILL'), 30000);
        await exited;
        clearTimeout(timer);
        rmSync(home, { recursive: true, force: true });
      }
    },
  };
}
