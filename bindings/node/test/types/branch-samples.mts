// The branch API (SPEC §4.8) type-checked against the shipped declarations (`tsc --noEmit -p
// test/types`), plus mistakes they must catch. Not executed: test/branch.test.mjs runs it.
import { Machine, ExecResult, type BranchOptions, type BranchBatchOptions, type MachineState } from 'smolmachines';

export async function branches(): Promise<void> {
  const src = await Machine.create({ branchable: true });
  await src.pause();
  await src.resume();
  await src.pause();
  await src.resume({ waitUntilReady: false });
  const a: Machine = await src.branch('a');
  const b: Machine = await src.branch('b', [{ host: 0, guest: 80 }]);
  const opts: BranchOptions = { ports: [], branchable: true, freezeSource: false };
  const c: Machine = await src.branch('c', opts);
  const batch: BranchBatchOptions = { count: 3, namePrefix: 'rl', ports: [] };
  const clones: Machine[] = await src.branchBatch(batch);
  const named: Machine[] = await src.forkBatch({ names: ['x', 'y'] });
  const f: Machine = await src.fork('f');
  const r: ExecResult = await src.rewardFork(['true'], { timeout: 5 }, 'episode');
  const s: MachineState = 'paused';
  void [a, b, c, clones, named, f, r, s];
  // @ts-expect-error: a name is a string
  await src.branch(1);
  // @ts-expect-error: unknown batch option
  await src.branchBatch({ counts: 3 });
  // @ts-expect-error: unknown resume option
  await src.resume({ waitUntilReadyMs: 5 });
  // @ts-expect-error: rewardFork takes an argv, not a shell string
  await src.rewardFork('true');
}
