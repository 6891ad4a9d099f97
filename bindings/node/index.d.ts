/// <reference types="node" />
// smolmachines: microVM sandboxes for Node (SPEC §6). Every I/O method returns a Promise;
// `endpoint()`, `name` and `id` are synchronous.

/** `"local"` (the embedded engine, default) or `"cloud"` (not available in this build). */
export type Target = 'local' | 'cloud';

/** Backend selection (SPEC §2). Cloud is chosen by `target: 'cloud'`, `apiKey` or `SMOL_CLOUD_TOKEN`. */
export interface ConnectOptions {
  target?: Target;
  baseUrl?: string;
  apiKey?: string;
  /** Local only: stop this process's machines on SIGINT/SIGTERM, then re-raise (default true). */
  handleSignals?: boolean;
  /** Local only; not supported by the engine yet (NotSupportedError when set). */
  egressInterceptor?: EgressInterceptor;
}

export interface EgressInterceptor {
  address: string;
  token: string;
}

/** CPU, memory, disk and network (SPEC §3.1). Fields marked "not supported yet" reject when set. */
export interface ResourceSpec {
  cpus?: number;
  memoryMb?: number;
  /** Unrestricted egress; local default off. */
  /** Egress (local default off). The guest cannot reach host loopback services, but does reach
   *  host services bound to 0.0.0.0 through the host's own address (no egress policy yet). */
  network?: boolean;
  /** Writable disk in GiB (sparse; default 20). */
  storageGb?: number;
  /** Egress only to these CIDRs (cloud; the local engine rejects it with NotSupportedError). */
  allowCidrs?: string[];
  /** Egress only to these hosts and their subdomains (cloud; NotSupportedError locally). */
  allowHosts?: string[];
  /** Overlay disk in GiB (NotSupportedError locally for now). */
  overlayGb?: number;
  /** virtio-gpu (NotSupportedError locally for now). */
  gpu?: boolean;
  /** NotSupportedError locally for now. */
  gpuVramMib?: number;
  /** NotSupportedError locally for now. */
  cuda?: boolean;
  /** The local engine uses virtio-net; "tsi" rejects with NotSupportedError. */
  networkBackend?: 'tsi' | 'virtio-net';
  /** "deferred" is cloud only (NotSupportedError locally). */
  diskDurability?: 'full' | 'deferred';
}

/** A host directory shared into the guest (SPEC §3.2; read-only is enforced on the host). */
export interface MountSpec {
  source: string;
  target: string;
  readOnly?: boolean;
  /** @deprecated alias of readOnly; wins when set. */
  readonly?: boolean;
  /** A guest-local working copy (NotSupportedError locally for now). */
  staged?: boolean;
}

/** Host (127.0.0.1) -> guest TCP port (SPEC §3.3). */
export interface PortSpec {
  /** 0 asks the target to pick one (the cloud always does; NotSupportedError locally at create). */
  host: number;
  guest: number;
}

/** Machine configuration (SPEC §3.4). Unknown fields reject with InvalidConfigError. */
export interface MachineConfig {
  name?: string;
  /** OCI image whose root file system the machine boots into (optional locally). */
  image?: string;
  labels?: Record<string, string>;
  mounts?: MountSpec[];
  ports?: PortSpec[];
  resources?: ResourceSpec;
  /** Alias of resources.network (which wins). */
  network?: boolean;
  /** Keep the record and disk after the process exits; `Machine.connect` boots it again. */
  persistent?: boolean;
  /** Keep the VM running after the process exits (implies persistent). */
  detach?: boolean;
  /** Cloud only; ignored locally (SPEC §11). */
  autoStopSeconds?: number;
  /** Cloud only; ignored locally (SPEC §11). */
  ttlSeconds?: number;
  /** Start as a branch source, so that `branch()` can clone it (`branchable ?? forkable ?? checkpoint`). */
  branchable?: boolean;
  /** @deprecated alias of branchable. */
  forkable?: boolean;
  /** @deprecated alias of branchable. */
  checkpoint?: boolean;
  /** argv of the image workload, replacing the image's Entrypoint + Cmd. */
  command?: string[];
  /** Create waits for published ports too (default true; the local engine returns once the agent answers). */
  waitForPorts?: boolean;
  /** A cloud cache disk (SPEC §7.3; NotSupportedError locally). */
  cacheDisk?: CacheDiskRef;
  /**
   * Environment of the image workload (the image's Entrypoint + Cmd, launched in the background at
   * create and at every boot; SPEC §3.4), over the image's Env. Its output goes to the guest file
   * `/var/log/smol/workload.log`. InvalidConfigError when there is no workload (no image, or an
   * image without Entrypoint/Cmd).
   */
  env?: Record<string, string>;
  /** Working directory of that workload (an absolute guest path; default the image's WorkingDir). */
  workdir?: string;
  /** User of that workload (a name, `uid[:gid]` or `name:group`); needs an image. */
  user?: string;
  /** NotSupportedError locally for now; not with branchable. */
  egressInterceptor?: EgressInterceptor;
  /** Credentials substituted into HTTPS requests (SPEC §3.5; NotSupportedError locally for now). */
  credentials?: CredentialSpec[];
  /** Create's readiness deadline in seconds (default 120). */
  readyTimeoutSeconds?: number;
}

/** A credential (SPEC §3.5, the shape that reaches the cloud). */
export interface CredentialSpec {
  /** 1-64 characters of [a-z0-9_-]. */
  name: string;
  /** The guest variable holding a placeholder. */
  envVar: string;
  /** Exact host names (no wildcards). */
  hosts: string[];
  value?: string;
  /** HTTP verbs (local only). */
  methods?: string[];
}

/** @deprecated the credential shape is CredentialSpec. */
export type CredentialBinding = CredentialSpec;

/** A cloud cache disk attached at create (SPEC §7.3). */
export interface CacheDiskRef {
  cache: string;
  version?: number;
  mountPath?: string;
  slot?: boolean;
}

/** Per-command options (SPEC §3.6). */
export interface ExecOptions {
  /** Kill the command after this many seconds; the result then has exit code 124. */
  timeout?: number;
  env?: Record<string, string>;
  /** Absolute guest working directory. */
  workdir?: string;
  /** Needs a machine created from an image. */
  user?: string;
  /** Written to the command's stdin, which is then closed. */
  stdin?: string | Uint8Array;
  /** Cloud only; ignored locally. */
  output?: 'text' | 'b64' | 'both';
  /** Aborting kills the command; the call rejects with `signal.reason`. Not for run(). */
  signal?: AbortSignal;
}

/** Result of a finished command (SPEC §3.7). A non-zero exit is not an error. */
export declare class ExecResult {
  readonly exitCode: number;
  /** Lossy UTF-8. */
  readonly stdout: string;
  readonly stderr: string;
  /** Byte-exact. */
  readonly stdoutBytes: Buffer;
  readonly stderrBytes: Buffer;
  /** stdout went past the cap (16 MiB locally, 1 MiB of text in the cloud); the rest was dropped. */
  readonly stdoutTruncated: boolean;
  readonly stderrTruncated: boolean;
  /** True when the timeout killed the command (exit code 124). */
  readonly timedOut: boolean;
  /** exitCode === 0 */
  readonly success: boolean;
  /** stdout + stderr */
  readonly output: string;
  /** Throws ExecutionError unless the command exited 0. */
  assertSuccess(): this;
}

/** SPEC §3.9 */
export type ExecEvent =
  | { kind: 'stdout'; data: string }
  | { kind: 'stderr'; data: string }
  | { kind: 'exit'; exitCode: number }
  | { kind: 'error'; message: string; code: string; error: SmolError };

/** SPEC §3.8 */
export interface ImageInfo {
  reference: string;
  digest: string;
  /** Bytes. */
  size: number;
  architecture: string;
  os: string;
}

/** Options of `branch` (SPEC §4.8). */
export interface BranchOptions {
  /** The clone's published ports; absent or empty: the source's guest ports on free host ports. */
  ports?: PortSpec[];
  /** The clone is a branch source too. */
  branchable?: boolean;
  /** NotSupportedError when true: a clone cannot be checkpointed yet. */
  checkpointable?: boolean;
  /** The source becomes a frozen base: it can be branched again but never runs commands again. */
  freezeSource?: boolean;
}

/** Options of `branchBatch` (SPEC §4.8): `names`, or `count` (1..64) clones `{namePrefix}-{n}`. */
export interface BranchBatchOptions extends Omit<BranchOptions, 'checkpointable'> {
  /** How many clones, 1..64 (ignored when `names` is given). */
  count?: number;
  /** The clones' names; wins over `count`. */
  names?: string[];
  /** Prefix of generated names (default `"branch"`): `branch-1`, `branch-2`, ... */
  namePrefix?: string;
  checkpointable?: boolean;
}

/** @deprecated alias of BranchBatchOptions. */
export type ForkBatchOptions = BranchBatchOptions;

/** Options of `resume` (SPEC §4.6). */
export interface ResumeOptions {
  /** Wait for `ready()` after resuming (`waitUntilReady()` defaults); default true. */
  waitUntilReady?: boolean;
}

/** Options of `checkpoint` (SPEC §4.8); locally the output path is `checkpoint`'s first argument. */
export interface CheckpointOptions {
  /** A content-addressed chunk store shared by checkpoints (local; NotSupportedError: not built yet). */
  store?: string;
}

/** A portable checkpoint (SPEC §3 `PortableCheckpointInfo`). */
export interface PortableCheckpointInfo {
  /** Locally the absolute path of the `.smolcheckpoint` file; on the cloud `ckpt-…`. */
  id: string;
  /** The machine it was taken of. */
  machineId: string;
  /** `"available"` (local), `"ready"` once restorable (cloud), `"uploading"`. */
  status: string;
  sizeBytes: number;
  /** Guest architecture (`x86_64`); restores only on the same one. */
  arch: string;
  /** RFC 3339, UTC. */
  createdAt: string;
  /** Cloud; null locally. */
  downloadUrl: string | null;
  /** Bytes a chunk store already had. */
  reusedBytes?: number;
  /** The file (local). */
  path?: string;
  /** How long the source's vCPUs were stopped, ms (local). */
  sourcePauseMs?: number;
  /** How long the checkpoint took, ms (local). */
  elapsedMs?: number;
}

/** Guest egress of a restored machine. An allow-list is NotSupportedError for a restore. */
export type RestoreNetworkPolicy = 'allow-all' | 'deny-all' | { allowHosts?: string[]; allowCidrs?: string[] };

/** Options of `Machine.restoreCheckpoint` (SPEC §4.8). */
export interface RestoreCheckpointOptions {
  /** Published ports; absent or empty: the checkpointed machine's guest ports on free host ports. */
  ports?: PortSpec[];
  /** Keep the checkpointed hostname and RNG state (local only). */
  keepIdentity?: boolean;
  /** Cloud: egress of the restored machine (unset: blocked). */
  networkPolicy?: RestoreNetworkPolicy;
}

/** Options of `waitUntilReady` (SPEC §4.2). */
export interface WaitReadyOptions {
  /** Give up after this many milliseconds (default 120000): `TimeoutError`. */
  timeoutMs?: number;
  /** Poll `ready()` this often, in milliseconds (default 1000). */
  intervalMs?: number;
}

export interface PortEndpoint {
  httpUrl: string;
  wsUrl: string;
  headers: Record<string, string>;
}

export type MachineState = 'created' | 'started' | 'running' | 'stopped' | 'pausing' | 'paused' | 'frozen' | 'deleted';

/** Sizes of a listed machine (SPEC §3.10). */
export interface MachineSizes {
  cpus: number;
  memoryMib: number;
  /** Writable disk in GiB. */
  storageGib?: number;
}

/** A published port (SPEC §3.10): `host` on 127.0.0.1 forwards to `guest`. */
export interface PublishedPort {
  guest: number;
  /** The host port (cloud: the node port, 0 or absent before placement). */
  host?: number;
  protocol: 'tcp' | 'udp';
}

/** One row of `Machine.list` (SPEC §3.10). */
export interface MachineSummary {
  id: string;
  name: string;
  state: MachineState;
  labels: Record<string, string>;
  /** The image reference the machine was created from (absent for a bare machine). */
  image?: string;
  persistent: boolean;
  /** The VM keeps running after its process exits. */
  detached: boolean;
  branchable: boolean;
  /** Creation time, RFC 3339 UTC with whole seconds (`"2025-01-31T12:00:00Z"`); `new Date(createdAt)` parses it. */
  createdAt?: string;
  /** The VMM's process id while it runs (local). */
  pid?: number;
  /** `kvm` or `tcg` (local). */
  accel?: string;
  resources?: MachineSizes;
  /** Published ports; empty when none is. */
  ports?: PublishedPort[];
}

export interface ListOptions {
  /** Keep machines that carry all of these. */
  labels?: Record<string, string>;
}

/** The guest assets the local engine uses (`localAvailability().assets`). */
export interface AssetsInfo {
  /** `env`: SMOL_ASSETS; `packaged`: inside this installed package; `home`: the set-up's. */
  source: 'env' | 'packaged' | 'home' | string;
  dir: string;
  /** The smol version that packaged them (packaged assets). */
  version?: string;
  /** One line: where they are, why, and what their manifest says. */
  description: string;
}

export type LocalAvailability =
  | { available: true; accel?: 'kvm' | 'tcg' | string; assets?: AssetsInfo }
  | {
      available: false;
      code: 'UNSUPPORTED_PLATFORM' | 'RUNTIME_NOT_INSTALLED' | 'KVM_UNAVAILABLE' | 'HYPERVISOR_UNAVAILABLE' | string;
      reason: string;
      assets?: AssetsInfo;
    };

/** A microVM sandbox. */
export declare class Machine {
  private constructor();
  /** Creates and starts a machine; resolves once it is ready. */
  static create(config?: MachineConfig, conn?: ConnectOptions): Promise<Machine>;
  /** Attaches to an existing machine by name, booting it if it is stopped. */
  static connect(id: string, conn?: ConnectOptions): Promise<Machine>;
  /** Machines of the selected backend (locally: of every process). */
  static list(conn?: ConnectOptions, options?: ListOptions): Promise<MachineSummary[]>;
  /** Whether this host can run local machines. Never throws. */
  static localAvailability(): LocalAvailability;
  /**
   * A new running machine `name` from a checkpoint: locally a `.smolcheckpoint` file (verified
   * whole first: a damaged file is InvalidConfigError and nothing is left; a missing one
   * NotFoundError), on the cloud a checkpoint id. Without `conn` the target is inferred from the id.
   */
  static restoreCheckpoint(
    checkpointId: string,
    name: string,
    conn?: ConnectOptions | null,
    options?: RestoreCheckpointOptions,
  ): Promise<Machine>;
  /** Alias of restoreCheckpoint. */
  static restore(
    checkpointId: string,
    name: string,
    conn?: ConnectOptions | null,
    options?: RestoreCheckpointOptions,
  ): Promise<Machine>;
  /**
   * Writes a local checkpoint (made with a chunk store, or standalone) as one standalone
   * `.smolcheckpoint` file, verified whole first. Returns the bytes written.
   */
  static exportCheckpoint(source: string, output: string): number;
  /** Removes the chunks of a local checkpoint store that no checkpoint names; bytes freed. */
  static pruneCheckpointStore(store: string): number;

  readonly name: string;
  /** The target's id: locally the name, on the cloud the server's `mach-…`. */
  readonly id: string;
  /** Where the machine is. */
  readonly target: 'local' | 'cloud';

  state(): Promise<MachineState>;
  /** Public ingress URL (cloud); null locally. */
  url(): Promise<string | null>;
  /** Running, and every published guest port has a listener behind it (SPEC §4.2). */
  ready(): Promise<boolean>;
  /** When the machine became ready (cloud, RFC 3339); null locally. */
  readyAt(): Promise<string | null>;
  /** Polls `ready()` until it is true; rejects with `TimeoutError` (code `TIMEOUT`) after `timeoutMs`. */
  waitUntilReady(options?: WaitReadyOptions): Promise<void>;
  exec(command: string[], opts?: ExecOptions): Promise<ExecResult>;
  run(image: string, command: string[], opts?: Omit<ExecOptions, 'signal'>): Promise<ExecResult>;
  /** Live output; leaving the loop early kills the command. */
  execStream(command: string[], opts?: ExecOptions): AsyncGenerator<ExecEvent, void, undefined>;
  readFile(path: string): Promise<Buffer>;
  writeFile(path: string, data: string | Uint8Array, mode?: number): Promise<void>;
  pullImage(image: string): Promise<ImageInfo>;
  listImages(): Promise<ImageInfo[]>;
  start(): Promise<void>;
  stop(): Promise<void>;
  delete(): Promise<void>;
  /** URLs of a published guest port. Throws InvalidConfigError when it is not published. */
  endpoint(port: number, path?: string): PortEndpoint;
  /** fetch() against a published guest port. */
  fetch(port: number, path?: string, init?: RequestInit): Promise<Response>;
  /** The published ports. */
  ports(): PortSpec[];
  /** Stops the vCPUs; the machine keeps its memory (state `paused`); exec rejects with InvalidStateError until `resume()`. */
  pause(): Promise<void>;
  /** Lets a paused machine go on where it was, then waits for readiness unless `{waitUntilReady: false}`. */
  resume(options?: ResumeOptions): Promise<void>;
  /**
   * A running copy-on-write clone of this running, branchable machine: its memory, processes,
   * files and disk as of now, its own hostname (`name`). A source that is not branchable rejects
   * with InvalidStateError.
   */
  branch(name: string, options?: PortSpec[] | BranchOptions): Promise<Machine>;
  /** @deprecated alias of branch. */
  fork(name: string, options?: PortSpec[] | BranchOptions): Promise<Machine>;
  /** Several clones, all or nothing: a failure deletes the clones already made and rejects. */
  branchBatch(options: BranchBatchOptions): Promise<Machine[]>;
  /** @deprecated alias of branchBatch. */
  forkBatch(options: BranchBatchOptions): Promise<Machine[]>;
  /**
   * A portable checkpoint of this running, paused or frozen branchable machine. Locally `output`
   * (a `.smolcheckpoint` path) is required (InvalidConfigError); the cloud takes no `output`.
   */
  checkpoint(output?: string | null, options?: CheckpointOptions): Promise<PortableCheckpointInfo>;
  /** This machine's checkpoints (cloud; locally NotSupportedError). */
  checkpoints(): Promise<PortableCheckpointInfo[]>;
  /** Runs `command` in a throw-away clone `{name}-rf-{8 hex}` (name: this machine's by default), always deleted. */
  rewardFork(command: string[], opts?: Omit<ExecOptions, 'signal'>, name?: string): Promise<ExecResult>;
}

/** Options of the error constructors. */
export interface SmolErrorOptions {
  hint?: string;
  cause?: unknown;
  status?: number;
  problemCode?: string;
  retryable?: boolean;
  retryAfterS?: number;
}
/**
 * Base of every error (SPEC §8): `code` is stable. Errors of the engine or the cloud also carry
 * their typed fields (those of the error's kind), as the /v1 problem body names them.
 */
export declare class SmolError extends Error {
  constructor(code: string, message: string, options?: SmolErrorOptions);
  readonly code: string;
  /** What to do about it, when the engine knows. */
  readonly hint?: string;
  /** The HTTP status of the error on the /v1 API (the response's for a cloud error). */
  status?: number;
  /** The problem body's `code` (`machine_interrupted`, `not_found`, ...). */
  problemCode?: string;
  /** Whether trying again may succeed. */
  retryable?: boolean;
  /** Seconds the service asked to wait (`Retry-After`). */
  retryAfterS?: number;
  /** A host port (CONFLICT of a published port). */
  port?: number;
  /** The end of the console and VMM logs (BOOT_FAILED). */
  logTail?: string;
  /** The machine's name (CONFLICT, INVALID_STATE, INTERRUPTED, BOOT_FAILED). */
  machine?: string;
  /** The machine's state and the operation refused (INVALID_STATE). */
  state?: string;
  operation?: string;
  /** A guest path, engine file, mount source or asset. */
  path?: string;
  /** The error's main text (what was not found, why). */
  reason?: string;
  /** A host program and its Debian package (RUNTIME_NOT_INSTALLED). */
  program?: string;
  package?: string;
  neededFor?: string;
  /** MiB a machine asked for and the host had for it (INSUFFICIENT_MEMORY). */
  requestedMib?: number;
  availableMib?: number;
  /** The missing credential scope (FORBIDDEN). */
  scope?: string;
  /** An image registry. */
  registry?: string;
}
declare class CodedError extends SmolError {
  constructor(message: string, options?: SmolErrorOptions);
}
/** NOT_SUPPORTED */
export declare class NotSupportedError extends CodedError {}
/** INVALID_CONFIG */
export declare class InvalidConfigError extends CodedError {}
/** COMMAND_FAILED, from ExecResult.assertSuccess() */
export declare class ExecutionError extends SmolError {
  constructor(exitCode: number, stdout?: string, stderr?: string, command?: string | string[]);
  readonly exitCode: number;
  readonly stdout: string;
  readonly stderr: string;
  readonly command?: string;
}
/** NOT_FOUND */
export declare class NotFoundError extends CodedError {}
/** INVALID_STATE */
export declare class InvalidStateError extends CodedError {}
/** INTERRUPTED (local) or MACHINE_INTERRUPTED (cloud): the VM stopped during the operation */
export declare class InterruptedError extends CodedError {}
/** CONFLICT */
export declare class ConflictError extends CodedError {}
/** TIMEOUT */
export declare class TimeoutError extends CodedError {}
/** BOOT_FAILED */
export declare class BootFailedError extends CodedError {}
/** HYPERVISOR_UNAVAILABLE */
export declare class HypervisorUnavailableError extends CodedError {}
/** KVM_UNAVAILABLE */
export declare class KvmUnavailableError extends CodedError {}
/** STORAGE_ERROR */
export declare class StorageError extends CodedError {}
/** MOUNT_ERROR */
export declare class MountError extends CodedError {}
/** PERMISSION_DENIED */
export declare class PermissionDeniedError extends CodedError {}
/** IS_A_DIRECTORY */
export declare class IsADirectoryError extends CodedError {}
/** NETWORK_ERROR */
export declare class NetworkError extends CodedError {}
/** RUNTIME_NOT_INSTALLED: a host program the engine runs is missing (`program`, `package`) */
export declare class RuntimeNotInstalledError extends CodedError {}
/** INSUFFICIENT_MEMORY: the host cannot hold the machine now (`requestedMib`, `availableMib`; retryable) */
export declare class InsufficientMemoryError extends CodedError {}
/** UNAUTHORIZED: no, unknown or expired API key (HTTP 401) */
export declare class UnauthorizedError extends CodedError {}
/** FORBIDDEN: the API key lacks a scope (`scope`, HTTP 403) */
export declare class ForbiddenError extends CodedError {}
/** PAYMENT_REQUIRED: billing or budget (HTTP 402) */
export declare class PaymentRequiredError extends CodedError {}
/** RATE_LIMITED: too many requests (HTTP 429, `retryAfterS`) */
export declare class RateLimitedError extends CodedError {}
/** CONNECTION: the service cannot be reached */
export declare class ConnectionError extends CodedError {}

/** Turns a native error (its JSON payload, or "[CODE] message") into the SmolError subclass of its code. */
export declare function wrapNativeError(err: unknown): SmolError;
/** Same as Machine.localAvailability(). */
export declare function localAvailability(): LocalAvailability;
/** The package's version (the workspace's: `smol --version`, `smol.__version__`). */
export declare const version: string;
