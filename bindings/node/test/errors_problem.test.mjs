// Problem+json bodies (RFC 9457, SPEC §10.1) become the typed errors of SPEC §8 through the
// core's Error::from_problem (the non-public `_errorFromProblem`): the class of the code, the
// same code and the typed fields as properties. No VM needed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const smol = require('../index.js');

function fromProblem(status, body, retryAfter) {
  const raw = typeof body === 'string' ? body : JSON.stringify(body);
  const e = smol._errorFromProblem(status, Buffer.from(raw), retryAfter);
  assert.ok(e instanceof smol.SmolError, String(e));
  return e;
}

// a body the way the core's Error::to_problem writes it
const ours = (status, code, kind, detail, fields = {}) => ({
  type: `urn:smolmachines:problem:${code}`, title: code, status, detail, code, kind, ...fields,
});

test('a port conflict keeps its port, status and hint', () => {
  const e = fromProblem(409, ours(409, 'conflict', 'portUnavailable', 'host port 8080 cannot be published: in use', { port: 8080, reason: 'in use' }));
  assert.ok(e instanceof smol.ConflictError);
  assert.equal(e.name, 'ConflictError');
  assert.equal(e.code, 'CONFLICT');
  assert.equal(e.port, 8080);
  assert.equal(e.status, 409);
  assert.equal(e.problemCode, 'conflict');
  assert.equal(e.retryable, false);
  assert.equal(e.message, 'host port 8080 cannot be published: in use');
  assert.match(e.hint, /port/);
});

test('boot failures carry the log tail; failed commands are ExecutionError with their fields', () => {
  const b = fromProblem(500, ours(500, 'boot_failed', 'bootFailed', 'machine "m" failed to boot: no agent', { machine: 'm', reason: 'no agent', logTail: 'Kernel panic' }));
  assert.ok(b instanceof smol.BootFailedError);
  assert.equal(b.code, 'BOOT_FAILED');
  assert.equal(b.logTail, 'Kernel panic');
  assert.equal(b.machine, 'm');
  const c = fromProblem(500, ours(500, 'command_failed', 'commandFailed', 'command exited with code 3: false', { command: 'false', exitCode: 3, stdout: 'o', stderr: 'e' }));
  assert.ok(c instanceof smol.ExecutionError);
  assert.equal(c.code, 'COMMAND_FAILED');
  assert.deepEqual([c.exitCode, c.command, c.stdout, c.stderr], [3, 'false', 'o', 'e']);
  assert.equal(c.message, 'command exited with code 3: false');
});

test('interrupted: INTERRUPTED from our body, MACHINE_INTERRUPTED from the cloud\'s', () => {
  const e = fromProblem(503, ours(503, 'machine_interrupted', 'interrupted', 'machine "m" stopped during the operation: SIGKILL', { machine: 'm', reason: 'SIGKILL', retryable: true }));
  assert.ok(e instanceof smol.InterruptedError);
  assert.equal(e.code, 'INTERRUPTED');
  assert.equal(e.retryable, true);
  const c = fromProblem(503, { type: 'about:blank', status: 503, detail: 'interrupted', code: 'machine_interrupted', retryable: true });
  assert.ok(c instanceof smol.InterruptedError);
  assert.equal(c.code, 'MACHINE_INTERRUPTED');
  assert.equal(c.problemCode, 'machine_interrupted');
});

test('the cloud codes from any body shape', () => {
  const u = fromProblem(401, '');
  assert.ok(u instanceof smol.UnauthorizedError);
  assert.equal(u.code, 'UNAUTHORIZED');
  assert.equal(u.status, 401);
  const k = fromProblem(401, { code: 'expired_key', error: 'key expired' });
  assert.ok(k instanceof smol.UnauthorizedError);
  assert.match(k.message, /key expired/);
  const f = fromProblem(403, 'missing scope: machine:exec');
  assert.ok(f instanceof smol.ForbiddenError);
  assert.equal(f.scope, 'machine:exec');
  const p = fromProblem(402, { type: 'about:blank', title: 'Payment Required', status: 402, code: 'payment_required' });
  assert.ok(p instanceof smol.PaymentRequiredError);
  assert.equal(p.code, 'PAYMENT_REQUIRED');
  const r = fromProblem(429, 'slow down', '5');
  assert.ok(r instanceof smol.RateLimitedError);
  assert.equal(r.code, 'RATE_LIMITED');
  assert.equal(r.retryAfterS, 5);
  assert.equal(r.retryable, true);
  const n = fromProblem(404, 'machine not found');
  assert.ok(n instanceof smol.NotFoundError);
  assert.match(n.message, /machine not found/);
});

test('unknown codes and non-JSON bodies map by status (SPEC §8.3)', () => {
  const h = fromProblem(502, '<html>bad gateway</html>');
  assert.equal(h.constructor, smol.SmolError);
  assert.equal(h.code, 'SMOLVM_ERROR');
  assert.equal(h.status, 502);
  assert.equal(h.retryable, true);
  assert.equal(h.message, '<html>bad gateway</html>');
  const q = fromProblem(422, { detail: 'quota exceeded', code: 'quota_exceeded' });
  assert.equal(q.code, 'SMOLVM_ERROR');
  assert.equal(q.problemCode, 'quota_exceeded');
  const c = fromProblem(409, 'machine name already exists');
  assert.ok(c instanceof smol.ConflictError);
});

test('a missing host program names the program and the package', () => {
  const e = fromProblem(503, ours(503, 'runtime_not_installed', 'programMissing', 'qemu-img is needed to create a machine but it is not installed (Debian package qemu-utils)', { program: 'qemu-img', package: 'qemu-utils', neededFor: 'to create a machine', reason: 'it is not installed' }));
  assert.ok(e instanceof smol.RuntimeNotInstalledError);
  assert.equal(e.code, 'RUNTIME_NOT_INSTALLED');
  assert.equal(e.program, 'qemu-img');
  assert.equal(e.package, 'qemu-utils');
  assert.match(e.hint, /apt-get install qemu-utils/);
});

test('a create the host cannot hold is INSUFFICIENT_MEMORY with the figures', () => {
  const e = fromProblem(503, ours(503, 'insufficient_memory', 'insufficientMemory', 'machine "w" needs 640 MiB of host memory but 300 MiB is available: cgroup', { machine: 'w', requestedMib: 640, availableMib: 300, reason: 'cgroup' }));
  assert.ok(e instanceof smol.InsufficientMemoryError);
  assert.equal(e.code, 'INSUFFICIENT_MEMORY');
  assert.equal(e.requestedMib, 640);
  assert.equal(e.availableMib, 300);
  assert.equal(e.retryable, true);
  assert.match(e.hint, /smaller machine/);
});

test('wrapNativeError still reads "[CODE] message" and a broken payload is SMOLVM_ERROR', () => {
  const e = smol.wrapNativeError(new Error('[NOT_FOUND] not found: x\x1fdo this'));
  assert.ok(e instanceof smol.NotFoundError);
  assert.equal(e.hint, 'do this');
  const b = smol.wrapNativeError(new Error('{"smolError":'));
  assert.equal(b.code, 'SMOLVM_ERROR');
});
