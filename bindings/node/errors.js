'use strict';
// The error hierarchy of SPEC §8 and the one place that turns a native error into it.

class SmolError extends Error {
  /**
   * @param {string} code stable code (SPEC §8.2)
   * @param {string} message
   * @param {{hint?: string, cause?: unknown}} [options]
   */
  constructor(code, message, options = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    Object.defineProperty(this, 'name', { value: new.target.name, enumerable: false, configurable: true, writable: true });
    Object.defineProperty(this, 'code', { value: code, enumerable: true, writable: false });
    if (options.hint) this.hint = options.hint;
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
function define(className, code) {
  const cls = {
    [className]: class extends SmolError {
      constructor(message, options) {
        super(code, message, options);
      }
    },
  }[className];
  classes[className] = cls;
  byCode[code] = cls;
}
define('NotSupportedError', 'NOT_SUPPORTED');
define('InvalidConfigError', 'INVALID_CONFIG');
define('NotFoundError', 'NOT_FOUND');
define('InvalidStateError', 'INVALID_STATE');
define('InterruptedError', 'INTERRUPTED');
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

/** A SmolError (the subclass of its code) from a code and a message. */
function smolError(code, message, options) {
  const cls = byCode[code];
  return cls ? new cls(message, options) : new SmolError(code, message, options);
}

const NATIVE = /^\[([A-Z][A-Z0-9_]*)\] ([\s\S]*)$/;

/**
 * The native layer formats errors as "[CODE] message" (+ "\x1f" + hint). Anything else is
 * `SMOLVM_ERROR`, except napi's own argument errors, which are `INVALID_CONFIG`.
 */
function wrapNativeError(err) {
  if (err instanceof SmolError) return err;
  const text = err && typeof err.message === 'string' ? err.message : String(err);
  const m = NATIVE.exec(text);
  if (m) {
    const [message, hint] = m[2].split('\x1f');
    return smolError(m[1], message, { hint, cause: undefined });
  }
  const code = err && err.code === 'InvalidArg' ? 'INVALID_CONFIG' : 'SMOLVM_ERROR';
  return smolError(code, text, { cause: err });
}

module.exports = { ...classes, smolError, wrapNativeError };
