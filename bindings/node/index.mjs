// ESM entry: the same objects as the CommonJS entry (one module instance, no dual-package hazard).
import smol from './index.js';

export const {
  Machine,
  ExecResult,
  SmolError,
  ExecutionError,
  NotSupportedError,
  InvalidConfigError,
  NotFoundError,
  InvalidStateError,
  InterruptedError,
  ConflictError,
  TimeoutError,
  BootFailedError,
  HypervisorUnavailableError,
  KvmUnavailableError,
  StorageError,
  MountError,
  PermissionDeniedError,
  IsADirectoryError,
  NetworkError,
  RuntimeNotInstalledError,
  UnauthorizedError,
  ForbiddenError,
  PaymentRequiredError,
  RateLimitedError,
  ConnectionError,
  wrapNativeError,
  version,
  localAvailability,
} = smol;
export default smol;
