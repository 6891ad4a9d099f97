'use strict';
// smolmachines: microVM sandboxes for Node (SPEC §6), a thin async wrapper over the native
// addon `smol.node` (napi-rs, bindings/node/src). Every I/O method returns a Promise resolved on
// napi's tokio runtime; the event loop never waits on a VM.

const path = require('node:path');
const errors = require('./errors.js');

const {
  SmolError,
  ExecutionError,
  NotSupportedError,
  InvalidConfigError,
  wrapNativeError,
} = errors;

let native = null;
let loadError = null;
try {
  native = require(path.join(__dirname, 'smol.node'));
} catch (e) {
  loadError = e;
}

function nativeOrThrow() {
  if (native) return native;
  throw new NotSupportedError(
    `the smol native engine is not available (${loadError && loadError.message}); ` +
      'reinstall the package on linux-x64 with a Rust toolchain, or use the cloud target',
    { cause: loadError },
  );
}

/** Runs a native call, turning its rejection into the typed SmolError. */
async function call(fn) {
  try {
    return await fn();
  } catch (e) {
    throw wrapNativeError(e);
  }
}

function isPlainObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

/** Options as JSON for the native side (which refuses unknown fields by name). */
function toJson(what, value) {
  if (value === undefined || value === null) return '{}';
  if (!isPlainObject(value)) throw new InvalidConfigError(`${what} must be an object`);
  return JSON.stringify(value, function (key, v) {
    if (typeof v === 'number' && !Number.isFinite(v)) {
      throw new InvalidConfigError(`${what}${key ? `.${key}` : ''} must be a finite number, got ${v}`);
    }
    if (typeof v === 'bigint') return Number(v);
    if (typeof v === 'function' || typeof v === 'symbol') {
      throw new InvalidConfigError(`${what}${key ? `.${key}` : ''} must be plain data`);
    }
    return v;
  });
}

function checkArgv(command) {
  if (!Array.isArray(command) || command.length === 0 || command.some((a) => typeof a !== 'string')) {
    throw new InvalidConfigError('command must be a non-empty array of strings (argv, not a shell string)');
  }
  return command;
}

function checkString(what, v) {
  if (typeof v !== 'string') throw new InvalidConfigError(`${what} must be a string`);
  return v;
}

/** string | Uint8Array | ArrayBuffer as a Buffer (no copy for binary data). */
function toBuffer(what, data) {
  if (typeof data === 'string') return Buffer.from(data, 'utf8');
  if (Buffer.isBuffer(data)) return data;
  if (ArrayBuffer.isView(data)) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  if (data instanceof ArrayBuffer) return Buffer.from(data);
  throw new InvalidConfigError(`${what} must be a string or a Uint8Array`);
}

/** ExecOptions split into the JSON part, stdin and the AbortSignal. */
function splitExecOptions(opts) {
  if (opts === undefined || opts === null) return { json: '{}', stdin: undefined, signal: undefined };
  if (!isPlainObject(opts)) throw new InvalidConfigError('ExecOptions must be an object');
  const { signal, stdin, ...rest } = opts;
  if (signal !== undefined && signal !== null && !(signal instanceof AbortSignal)) {
    throw new InvalidConfigError('ExecOptions.signal must be an AbortSignal');
  }
  return {
    json: toJson('ExecOptions', rest),
    stdin: stdin === undefined || stdin === null ? undefined : toBuffer('ExecOptions.stdin', stdin),
    signal: signal || undefined,
  };
}

/** Node-style local name (SPEC §9.1). */
function generateName() {
  let r = '';
  while (r.length < 6) r += Math.floor(Math.random() * 36).toString(36);
  return `smol-${Date.now().toString(36)}-${r}`;
}

/** Result of a finished command (SPEC §3.7). A non-zero exit is not an error. */
class ExecResult {
  constructor(exitCode, stdoutBytes, stderrBytes, timedOut = false, command = undefined, truncated = [false, false]) {
    this.exitCode = exitCode;
    this.stdout = stdoutBytes.toString('utf8');
    this.stderr = stderrBytes.toString('utf8');
    this.stdoutBytes = stdoutBytes;
    this.stderrBytes = stderrBytes;
    // each stream is capped at 16 MiB locally (1 MiB of text in the cloud)
    this.stdoutTruncated = truncated[0];
    this.stderrTruncated = truncated[1];
    this.timedOut = timedOut;
    this.success = exitCode === 0;
    this.output = this.stdout + this.stderr;
    Object.defineProperty(this, 'command', { value: command, enumerable: false });
  }

  /** Throws ExecutionError unless the command exited 0. */
  assertSuccess() {
    if (!this.success) throw new ExecutionError(this.exitCode, this.stdout, this.stderr, this.command);
    return this;
  }
}

function execResult(r, argv) {
  return new ExecResult(r.exitCode, r.stdout, r.stderr, r.timedOut, argv, [
    r.stdoutTruncated,
    r.stderrTruncated,
  ]);
}

// --- SIGINT / SIGTERM: stop this process's local machines, then re-raise (SPEC §6) -----------

const owned = new Set();
let handlersInstalled = false;
const SIGNALS = ['SIGINT', 'SIGTERM'];

async function onSignal(sig) {
  for (const s of SIGNALS) process.removeListener(s, onSignal);
  handlersInstalled = false;
  const stops = Promise.allSettled([...owned].map((m) => m.stop()));
  let timer;
  await Promise.race([stops, new Promise((r) => (timer = setTimeout(r, 10000)))]);
  clearTimeout(timer);
  // Re-raise unless the program listens for the signal itself.
  if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
}

function track(machine) {
  owned.add(machine);
  if (!handlersInstalled) {
    for (const s of SIGNALS) process.on(s, onSignal);
    handlersInstalled = true;
  }
}

// --- Machine ----------------------------------------------------------------------------------

const kNative = Symbol('smol.native');

// This process's native handle of each local machine it holds, by name. The engine lets one
// process attach to a machine once, so connect() to a machine this process already holds shares
// its handle (as the Python SDK does) instead of failing with "attached by another process".
const held = new Map();

function remember(handle) {
  held.set(handle.name, new WeakRef(handle));
}

/** The handle this process holds for `name` when `conn` selects the local target, else null. */
async function heldHandle(name, conn) {
  const c = conn || {};
  const cloud = c.target === 'cloud' || (c.target === undefined && (c.apiKey || process.env.SMOL_CLOUD_TOKEN));
  if (cloud) return null;
  const h = held.get(name)?.deref();
  if (!h) return null;
  if ((await call(() => h.state())) === 'deleted') {
    held.delete(name);
    return null;
  }
  return h;
}

/** A clone's native handle as a Machine of this process, cleaned up on SIGINT/SIGTERM like its source. */
function adopt(source, handle) {
  remember(handle);
  const m = new Machine(handle);
  if (owned.has(source)) track(m);
  return m;
}

class Machine {
  /** @internal Use Machine.create / Machine.connect. */
  constructor(handle) {
    if (!handle || !native || !(handle instanceof native.NativeMachine)) {
      throw new TypeError('use Machine.create() or Machine.connect()');
    }
    Object.defineProperty(this, kNative, { value: handle, enumerable: false });
    Object.defineProperty(this, '_name', { value: handle.name, enumerable: false });
  }

  /** Creates and starts a machine; resolves once it is ready. */
  static async create(config = {}, conn = {}) {
    const n = nativeOrThrow();
    if (config !== undefined && config !== null && !isPlainObject(config)) {
      throw new InvalidConfigError('MachineConfig must be an object');
    }
    const cfg = { ...(config || {}) };
    if (cfg.name === undefined || cfg.name === null) cfg.name = generateName();
    const cfgJson = toJson('MachineConfig', cfg);
    const connJson = toJson('ConnectOptions', conn);
    const handle = await call(() => n.create(cfgJson, connJson));
    remember(handle);
    const m = new Machine(handle);
    if ((conn || {}).handleSignals !== false && !cfg.detach) track(m);
    return m;
  }

  /** Attaches to an existing machine by name, booting it if it is stopped. */
  static async connect(id, conn = {}) {
    const n = nativeOrThrow();
    checkString('machine name', id);
    const connJson = toJson('ConnectOptions', conn);
    const own = await heldHandle(id, conn);
    if (own) {
      if ((await call(() => own.state())) !== 'running') await call(() => own.start());
      return new Machine(own);
    }
    const handle = await call(() => n.connect(id, connJson));
    remember(handle);
    return new Machine(handle);
  }

  /** Every machine of the selected backend (locally: of every process) carrying all `labels`. */
  static async list(conn = {}, options = {}) {
    const n = nativeOrThrow();
    const connJson = toJson('ConnectOptions', conn);
    const labels = toJson('labels', (options || {}).labels);
    const rows = await call(() => n.list(connJson, labels));
    // The native rows are already MachineSummary objects (mapped once, in the core's terms);
    // an absent optional field is `undefined`, not `null`.
    const defined = (o) => Object.fromEntries(Object.entries(o).filter(([, v]) => v != null));
    return rows.map((r) => ({ ...defined(r), resources: defined(r.resources) }));
  }

  /**
   * A new running machine `name` from checkpoint `checkpointId` (SPEC §4.8): locally a
   * `.smolcheckpoint` file (verified whole before anything starts), on the cloud a checkpoint
   * id. Without `conn` the target is inferred from the id (SPEC §2.2). `options`:
   * `{ports, keepIdentity, networkPolicy}`.
   */
  static async restoreCheckpoint(checkpointId, name, conn = undefined, options = {}) {
    const n = nativeOrThrow();
    checkString('checkpoint id', checkpointId);
    checkString('machine name', name);
    const connJson = conn === undefined || conn === null ? null : toJson('ConnectOptions', conn);
    const opts = options === undefined || options === null ? {} : options;
    if (!isPlainObject(opts)) throw new InvalidConfigError('RestoreCheckpointOptions must be an object');
    const json = toJson('RestoreCheckpointOptions', opts);
    const handle = await call(() => n.restoreCheckpoint(checkpointId, name, connJson, json));
    remember(handle);
    const m = new Machine(handle);
    if ((conn || {}).handleSignals !== false) track(m);
    return m;
  }

  /** Alias of restoreCheckpoint. */
  static async restore(checkpointId, name, conn = undefined, options = {}) {
    return Machine.restoreCheckpoint(checkpointId, name, conn, options);
  }

  /**
   * Writes the local checkpoint `source` (made with `checkpoint(output, {store})`, or a
   * standalone file) as one standalone `.smolcheckpoint` file `output`, verified whole first.
   * Synchronous; returns the bytes written.
   */
  static exportCheckpoint(source, output) {
    const n = nativeOrThrow();
    checkString('checkpoint source', source);
    checkString('export output', output);
    try {
      return n.exportCheckpoint(source, output);
    } catch (e) {
      throw wrapNativeError(e);
    }
  }

  /** Removes the chunks of local checkpoint store `store` that no checkpoint names; bytes freed. */
  static pruneCheckpointStore(store) {
    const n = nativeOrThrow();
    checkString('checkpoint store', store);
    try {
      return n.pruneCheckpointStore(store);
    } catch (e) {
      throw wrapNativeError(e);
    }
  }

  /** Whether this host can run local machines (SPEC §3.10). Never throws. */
  static localAvailability() {
    if (!native) {
      return {
        available: false,
        code: 'RUNTIME_NOT_INSTALLED',
        reason: `the smol native engine could not be loaded: ${loadError && loadError.message}`,
      };
    }
    try {
      const a = native.localAvailability();
      const assets = native.localAssets() ?? undefined;
      return a.available
        ? { available: true, accel: a.accel, assets }
        : { available: false, code: a.code, reason: a.reason, assets };
    } catch (e) {
      return { available: false, code: 'SMOLVM_ERROR', reason: String(e && e.message) };
    }
  }

  get name() {
    return this._name;
  }

  /** The target's id: locally the name, on the cloud the server's `mach-…`. */
  get id() {
    return this[kNative].id;
  }

  /** `'local'` or `'cloud'`: where this machine is. */
  get target() {
    return this[kNative].target;
  }

  async state() {
    return call(() => this[kNative].state());
  }

  /** Public ingress URL (cloud); always null locally. */
  async url() {
    return this[kNative].url() ?? null;
  }

  /** Running, and every published guest port has a listener behind it (SPEC §4.2). */
  async ready() {
    return call(() => this[kNative].ready());
  }

  /** When the machine became ready (cloud, RFC 3339); always null locally. */
  async readyAt() {
    return null;
  }

  /**
   * Polls `ready()` every `intervalMs` until it is true; rejects with `TimeoutError` (code
   * `TIMEOUT`) after `timeoutMs`. Both must be numbers > 0 (`InvalidConfigError`).
   */
  async waitUntilReady(options = {}) {
    if (options === undefined || options === null) options = {};
    if (!isPlainObject(options)) throw new InvalidConfigError('waitUntilReady options must be an object');
    const { timeoutMs = 120000, intervalMs = 1000, ...rest } = options;
    const unknown = Object.keys(rest);
    if (unknown.length) {
      throw new InvalidConfigError(`unknown waitUntilReady option ${JSON.stringify(unknown[0])} (expected timeoutMs, intervalMs)`);
    }
    for (const [what, v] of [['timeoutMs', timeoutMs], ['intervalMs', intervalMs]]) {
      if (typeof v !== 'number' || !Number.isFinite(v) || !(v > 0)) {
        throw new InvalidConfigError(`${what} must be a number of milliseconds > 0, got ${String(v)}`);
      }
    }
    return call(() => this[kNative].waitUntilReady(timeoutMs, intervalMs));
  }

  /** Runs argv to completion. Never rejects on a non-zero exit; a timeout gives exit 124. */
  async exec(command, opts = {}) {
    const argv = checkArgv(command);
    const { json, stdin, signal } = splitExecOptions(opts);
    const h = this[kNative];
    if (!signal) return execResult(await call(() => h.exec(argv, json, stdin)), argv);
    signal.throwIfAborted();
    const token = native.cancelToken();
    const onAbort = () => native.cancel(token);
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      return execResult(await h.exec(argv, json, stdin, token), argv);
    } catch (e) {
      if (signal.aborted) throw signal.reason;
      throw wrapNativeError(e);
    } finally {
      signal.removeEventListener('abort', onAbort);
      native.releaseCancelToken(token);
    }
  }

  /** Pulls `image` if needed and runs argv in a container of it (local only). */
  async run(image, command, opts = {}) {
    checkString('image', image);
    const argv = checkArgv(command);
    const { json, stdin, signal } = splitExecOptions(opts);
    if (signal) throw new NotSupportedError('run() does not take an AbortSignal');
    // SPEC §3.6: run() with a user is NOT_SUPPORTED (the core validates the options first and
    // would call it INVALID_CONFIG)
    if (opts && opts.user !== undefined && opts.user !== null) {
      throw new NotSupportedError('run(image, ...) does not take a user; use exec() in a machine created from the image');
    }
    return execResult(await call(() => this[kNative].run(image, argv, json, stdin)), argv);
  }

  /**
   * Streams a command's output: `{kind:'stdout'|'stderr', data}`, then `{kind:'exit', exitCode}`
   * (or `{kind:'error', message, code, error}`: `throw ev.error` throws the typed error of the
   * code). Leaving the loop early kills the command.
   */
  execStream(command, opts = {}) {
    // argument errors, like every other error, surface on the first iteration
    return streamEvents(this[kNative], command, opts);
  }

  /** The file's raw bytes. */
  async readFile(filePath) {
    checkString('path', filePath);
    return call(() => this[kNative].readFile(filePath));
  }

  /** Writes a string (UTF-8) or bytes; parent directories are created; mode defaults to 0o644. */
  async writeFile(filePath, data, mode = undefined) {
    checkString('path', filePath);
    const buf = toBuffer('data', data);
    if (mode !== undefined && mode !== null && !(Number.isInteger(mode) && mode >= 0 && mode <= 0o7777)) {
      throw new InvalidConfigError(`mode must be an integer permission mode (0 to 0o7777), got ${mode}`);
    }
    return call(() => this[kNative].writeFile(filePath, buf, mode ?? undefined));
  }

  /** Pulls an OCI image into the engine's cache (local only). */
  async pullImage(image) {
    checkString('image', image);
    return call(() => this[kNative].pullImage(image));
  }

  /** The images in the engine's cache (local only). */
  async listImages() {
    return call(() => this[kNative].listImages());
  }

  /** Boots a stopped machine again (its disk is kept). */
  async start() {
    return call(() => this[kNative].start());
  }

  /** Clean power-off; the disk stays. In-flight commands fail with INTERRUPTED. */
  async stop() {
    return call(() => this[kNative].stop());
  }

  /** Stops the machine and deletes its storage, permanently. */
  async delete(options = undefined) {
    if (options && options.includeUsage) {
      throw new NotSupportedError('delete({includeUsage}) is cloud-only');
    }
    await call(() => this[kNative].delete());
    owned.delete(this);
  }

  /** Stops the vCPUs; the machine keeps its memory (state `paused`). exec then fails with INVALID_STATE. */
  async pause() {
    return call(() => this[kNative].pause());
  }

  /**
   * Lets a paused machine go on where it was, then waits for readiness (`waitUntilReady()`, as
   * Python's `resume(wait_until_ready=True)`); `{waitUntilReady: false}` resolves once it runs.
   */
  async resume(options = {}) {
    if (options === undefined || options === null) options = {};
    if (!isPlainObject(options)) throw new InvalidConfigError('resume options must be an object');
    const { waitUntilReady = true, ...rest } = options;
    const unknown = Object.keys(rest);
    if (unknown.length) {
      throw new InvalidConfigError(`unknown resume option ${JSON.stringify(unknown[0])} (expected waitUntilReady)`);
    }
    if (typeof waitUntilReady !== 'boolean') {
      throw new InvalidConfigError(`waitUntilReady must be a boolean, got ${String(waitUntilReady)}`);
    }
    await call(() => this[kNative].resume());
    if (waitUntilReady) await this.waitUntilReady();
  }

  /**
   * A running copy-on-write clone of this running, branchable machine (SPEC §4.8). `options` is
   * a `PortSpec[]` or `{ports, branchable, checkpointable, freezeSource}`.
   */
  async branch(name, options = undefined) {
    checkString('branch name', name);
    const opts = Array.isArray(options) ? { ports: options } : options;
    const json = toJson('BranchOptions', opts);
    return adopt(this, await call(() => this[kNative].branch(name, json)));
  }

  /** @deprecated alias of branch(name, ports). */
  async fork(name, options = undefined) {
    return this.branch(name, options);
  }

  /** Several clones, all or nothing: `{count, names, namePrefix, ports, branchable, freezeSource}`. */
  async branchBatch(options = {}) {
    const json = toJson('BranchBatchOptions', options);
    const handles = await call(() => this[kNative].branchBatch(json));
    return handles.map((h) => adopt(this, h));
  }

  /** @deprecated alias of branchBatch. */
  async forkBatch(options = {}) {
    return this.branchBatch(options);
  }

  /**
   * A portable checkpoint of this machine (SPEC §4.8). Locally `output` (a `.smolcheckpoint`
   * path) is required; the cloud takes neither `output` nor `store`. Resolves to a
   * PortableCheckpointInfo (camelCase).
   */
  async checkpoint(output = undefined, options = {}) {
    if (output !== undefined && output !== null) checkString('checkpoint output', output);
    const opts = options === undefined || options === null ? {} : options;
    if (!isPlainObject(opts)) throw new InvalidConfigError('CheckpointOptions must be an object');
    const { store, ...rest } = opts;
    const unknown = Object.keys(rest);
    if (unknown.length) {
      throw new InvalidConfigError(`unknown checkpoint option ${JSON.stringify(unknown[0])} (expected store)`);
    }
    const json = toJson('CheckpointOptions', { output: output ?? undefined, store });
    return JSON.parse(await call(() => this[kNative].checkpoint(json)));
  }

  /** This machine's checkpoints (cloud; locally NotSupportedError). */
  async checkpoints() {
    const rows = await call(() => this[kNative].checkpoints());
    return rows.map((r) => JSON.parse(r));
  }

  /** Runs argv in a throw-away clone `{name}-rf-{8 hex}` that is always deleted; its ExecResult. */
  async rewardFork(command, opts = {}, name = undefined) {
    const argv = checkArgv(command);
    const { json, stdin, signal } = splitExecOptions(opts);
    if (signal) throw new NotSupportedError('rewardFork() does not take an AbortSignal');
    if (name !== undefined && name !== null) checkString('name', name);
    return execResult(await call(() => this[kNative].rewardFork(argv, json, stdin, name ?? undefined)), argv);
  }

  /** URLs of a published guest port (synchronous). */
  endpoint(port, urlPath = undefined) {
    if (!Number.isInteger(port) || port < 1 || port > 65535) {
      throw new InvalidConfigError(`port must be an integer from 1 to 65535, got ${port}`);
    }
    if (urlPath !== undefined && urlPath !== null) checkString('path', urlPath);
    try {
      const e = this[kNative].endpoint(port, urlPath ?? undefined);
      return { httpUrl: e.httpUrl, wsUrl: e.wsUrl, headers: { ...e.headers } };
    } catch (e) {
      throw wrapNativeError(e);
    }
  }

  /** `fetch()` against a published guest port; the endpoint headers go under `init.headers`. */
  async fetch(port, urlPath = undefined, init = {}) {
    const ep = this.endpoint(port, urlPath);
    const headers = new Headers(ep.headers);
    if (init && init.headers) new Headers(init.headers).forEach((v, k) => headers.set(k, v));
    return fetch(ep.httpUrl, { ...(init || {}), headers });
  }

  /** The published ports, `{host, guest}`. */
  ports() {
    return this[kNative].ports().map((p) => ({ host: p.host, guest: p.guest }));
  }

  toJSON() {
    return { name: this.name, id: this.id };
  }

  [Symbol.for('nodejs.util.inspect.custom')]() {
    return `Machine { name: ${JSON.stringify(this.name)} }`;
  }
}

async function* streamEvents(handle, command, opts) {
  const argv = checkArgv(command);
  const { json, stdin, signal } = splitExecOptions(opts);
  if (signal) signal.throwIfAborted();
  const s = await call(() => handle.execStream(argv, json, stdin));
  const onAbort = () => s.kill();
  if (signal) signal.addEventListener('abort', onAbort, { once: true });
  const decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };
  try {
    for (;;) {
      const batch = await call(() => s.next());
      if (!batch) break;
      for (const ev of batch) {
        if (ev.kind === 'stdout' || ev.kind === 'stderr') {
          const data = decoders[ev.kind].decode(ev.data, { stream: true });
          if (data) yield { kind: ev.kind, data };
          continue;
        }
        for (const kind of ['stdout', 'stderr']) {
          const tail = decoders[kind].decode();
          if (tail) yield { kind, data: tail };
        }
        if (ev.kind === 'exit') yield { kind: 'exit', exitCode: ev.exitCode };
        else {
          // SPEC §3.9's event, plus the stable code and its typed error (`throw ev.error`)
          const code = ev.code || 'SMOLVM_ERROR';
          yield { kind: 'error', message: ev.message, code, error: errors.smolError(code, ev.message) };
        }
        return;
      }
    }
    if (signal && signal.aborted) throw signal.reason;
  } finally {
    if (signal) signal.removeEventListener('abort', onAbort);
    s.kill();
  }
}

module.exports = {
  Machine,
  ExecResult,
  SmolError,
  ExecutionError,
  NotSupportedError,
  InvalidConfigError,
  NotFoundError: errors.NotFoundError,
  InvalidStateError: errors.InvalidStateError,
  InterruptedError: errors.InterruptedError,
  ConflictError: errors.ConflictError,
  TimeoutError: errors.TimeoutError,
  BootFailedError: errors.BootFailedError,
  HypervisorUnavailableError: errors.HypervisorUnavailableError,
  KvmUnavailableError: errors.KvmUnavailableError,
  StorageError: errors.StorageError,
  MountError: errors.MountError,
  PermissionDeniedError: errors.PermissionDeniedError,
  IsADirectoryError: errors.IsADirectoryError,
  NetworkError: errors.NetworkError,
  RuntimeNotInstalledError: errors.RuntimeNotInstalledError,
  InsufficientMemoryError: errors.InsufficientMemoryError,
  UnauthorizedError: errors.UnauthorizedError,
  ForbiddenError: errors.ForbiddenError,
  PaymentRequiredError: errors.PaymentRequiredError,
  RateLimitedError: errors.RateLimitedError,
  ConnectionError: errors.ConnectionError,
  wrapNativeError,
  localAvailability: () => Machine.localAvailability(),
  /** The package's version: the workspace's, as the addon was built with it. */
  version: native ? native.version() : require('./package.json').version,
  // Not public API: the typed error of an HTTP error response (status, body bytes, Retry-After)
  // through the core's Error::from_problem (tests; the cloud client later).
  _errorFromProblem: (status, body, retryAfter) =>
    wrapNativeError(new Error(nativeOrThrow()._errorFromProblem(status, Buffer.from(body), retryAfter ?? null))),
};
