// The engine's tracing events go to stderr when SMOL_LOG (or RUST_LOG) is set, and nowhere
// otherwise. Each case runs in a child process (the subscriber is installed when the addon loads).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { runChild } from './helpers.mjs';

const body = `
const m = await Machine.create();
await m.exec(['true']);
await m.delete();
console.log('done');
`;

test('SMOL_LOG=smolmachines=debug logs the engine on stderr', async () => {
  const r = await runChild(body, { env: { SMOL_LOG: 'smolmachines=debug', RUST_LOG: '' } });
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^done$/m);
  assert.match(r.stderr, /DEBUG.*smolmachines/, r.stderr);
});

test('without SMOL_LOG nothing is logged', async () => {
  const r = await runChild(body, { env: { SMOL_LOG: '', RUST_LOG: '' } });
  assert.equal(r.code, 0, r.stderr);
  assert.doesNotMatch(r.stderr, /DEBUG|INFO/, r.stderr);
});

test('a malformed SMOL_LOG says so and carries on', async () => {
  const r = await runChild(`console.log('loaded')`, { env: { SMOL_LOG: 'smolmachines=[[[' } });
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /not a log filter/);
});
