'use strict';
// The error hierarchy of SPEC §8 and the one place that turns a native error into it.
//
// A native error's message is a JSON payload {"smolError":{code, message, problem}} (see
// src/errors.rs): the class comes from the stable `code` (one table, `byCode`), and the typed
// fields of the problem body become properties (`status`, `problemCode`, `retryable`,
// `retryAfterS`, `hint`, `port`, `exitCode`, `logTail`, `machine`, ...), like Python's.

class SmolError extends Error {
  /**
   * @param {string} code stable code (SPEC §8.2)
   * @param {string} message
   * @param {{hint?: string, cause?: unknown, status?: number, problemCode?: string,
   *   retryable?: boolean, retryAfterS?: number}} [options]
   */
  constructor(code, message, options = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    Object.defineProperty(this, 'name', { value: new.target.name, enumerable: false, configurable: true, writable: true });
    Object.defineProperty(this, 'code', { value: code, enumerable: true, writable: false });
    if (options.hint) this.hint = options.hint;
    for (const k of ['status', 'problemCode', 'retryable', 'retryAfterS']) {
      if (options[k] !== undefined && options[k] !== null) this[k] = options[k];
    }
  }
}

/** Raised by `ExecResult.assertSuccess()` (code `COMMAND_FAILED`). */
class ExecutionError extends SmolError {
  constructor(exitCode, stdout = '', stderr = '', command = undefined) {
    const cmd = Array.isArray(command) ? command.join(' ') : command;
    super('COMMAND_FAILED', `Command exited with code ${exitCode}${cmd ? `: ${cmd}` : ''}`);
    this.exitCode = exitCode;
    this.stdout = stdout;
    this.stderr = stderr;
    if (cmd !== undefined) this.command = cmd;
  }
}

// One subclass per stable code; each takes (message, options).
const classes = { SmolError, ExecutionError };
const byCode = Object.create(null);
byCode.COMMAND_FAILED = ExecutionError;
function define(className, code, ...aliases) {
  const cls = {
    [className]: class extends SmolError {
      constructor(message, options = {}) {
        super(options.code || code, message, options);
      }
    },
  }[className];
  classes[className] = cls;
  for (const c of [code, ...aliases]) byCode[c] = cls;
}
define('NotSupportedError', 'NOT_SUPPORTED', 'UNSUPPORTED_PLATFORM');
define('InvalidConfigError', 'INVALID_CONFIG', 'CONFIG_ERROR');
define('NotFoundError', 'NOT_FOUND');
define('InvalidStateError', 'INVALID_STATE');
// INTERRUPTED locally, MACHINE_INTERRUPTED from the cloud (SPEC §8.3)
define('InterruptedError', 'INTERRUPTED', 'MACHINE_INTERRUPTED');
define('ConflictError', 'CONFLICT');
define('TimeoutError', 'TIMEOUT');
define('BootFailedError', 'BOOT_FAILED');
define('HypervisorUnavailableError', 'HYPERVISOR_UNAVAILABLE');
define('KvmUnavailableError', 'KVM_UNAVAILABLE');
define('StorageError', 'STORAGE_ERROR');
define('MountError', 'MOUNT_ERROR');
define('PermissionDeniedError', 'PERMISSION_DENIED');
define('IsADirectoryError', 'IS_A_DIRECTORY');
define('NetworkError', 'NETWORK_ERROR');
define('RuntimeNotInstalledError', 'RUNTIME_NOT_INSTALLED');
define('InsufficientMemoryError', 'INSUFFICIENT_MEMORY');
define('UnauthorizedError', 'UNAUTHORIZED');
define('ForbiddenError', 'FORBIDDEN');
define('PaymentRequiredError', 'PAYMENT_REQUIRED');
define('RateLimitedError', 'RATE_LIMITED');
define('ConnectionError', 'CONNECTION');

/** A SmolError (the subclass of its code) from a code and a message. */
function smolError(code, message, options = {}) {
  const cls = byCode[code];
  if (cls === ExecutionError) {
    const e = new ExecutionError(options.exitCode ?? -1, options.stdout ?? '', options.stderr ?? '', options.command);
    if (message) e.message = message;
    if (options.hint) e.hint = options.hint;
    return e;
  }
  return cls ? new cls(message, { ...options, code }) : new SmolError(code, message, options);
}

// Problem members that become properties of the error as they are (camelCase, like the /v1 API).
const FIELDS = [
  'port', 'exitCode', 'logTail', 'machine', 'state', 'operation', 'path', 'reason', 'command',
  'stdout', 'stderr', 'program', 'package', 'neededFor', 'scope', 'registry', 'context',
  'requestedMib', 'availableMib',
];

/** The typed error of a native payload `{code, message, problem}`. */
function fromPayload({ code, message, problem = {} }, cause) {
  const e = smolError(code, message, {
    hint: problem.hint,
    status: problem.status,
    problemCode: problem.code,
    retryable: problem.retryable,
    retryAfterS: problem.retryAfterS,
    exitCode: problem.exitCode,
    stdout: problem.stdout,
    stderr: problem.stderr,
    command: problem.command,
    cause,
  });
  for (const k of FIELDS) {
    if (problem[k] !== undefined && problem[k] !== null && e[k] === undefined) e[k] = problem[k];
  }
  if (e instanceof ExecutionError) {
    for (const k of ['status', 'problemCode', 'retryable']) {
      const v = problem[k === 'problemCode' ? 'code' : k];
      if (v !== undefined && v !== null) e[k] = v;
    }
  }
  return e;
}

const PAYLOAD = '{"smolError":';
const NATIVE = /^\[([A-Z][A-Z0-9_]*)\] ([\s\S]*)$/;

/**
 * The typed SmolError of a native error: its JSON payload (src/errors.rs), or the older
 * "[CODE] message" (+ "\x1f" + hint) text. Anything else is `SMOLVM_ERROR`, except napi's own
 * argument errors, which are `INVALID_CONFIG`.
 */
function wrapNativeError(err) {
  if (err instanceof SmolError) return err;
  const text = err && typeof err.message === 'string' ? err.message : String(err);
  if (text.startsWith(PAYLOAD)) {
    try {
      return fromPayload(JSON.parse(text).smolError);
    } catch (parseError) {
      return smolError('SMOLVM_ERROR', text, { cause: parseError });
    }
  }
  const m = NATIVE.exec(text);
  if (m) {
    const [message, hint] = m[2].split('\x1f');
    return smolError(m[1], message, { hint, cause: undefined });
  }
  const code = err && err.code === 'InvalidArg' ? 'INVALID_CONFIG' : 'SMOLVM_ERROR';
  return smolError(code, text, { cause: err });
}

module.exports = { ...classes, smolError, wrapNativeError };
