// The checkpoint API (SPEC §4.8) type-checked against the shipped declarations (`tsc --noEmit -p
// test/types`), plus mistakes they must catch. Not executed: test/checkpoint.test.mjs runs it.
import {
  Machine,
  type CheckpointOptions,
  type PortableCheckpointInfo,
  type RestoreCheckpointOptions,
} from 'smolmachines';

export async function checkpoints(): Promise<void> {
  const src = await Machine.create({ branchable: true });
  const info: PortableCheckpointInfo = await src.checkpoint('/tmp/a.smolcheckpoint');
  const opts: CheckpointOptions = {};
  const again: PortableCheckpointInfo = await src.checkpoint('/tmp/b.smolcheckpoint', opts);
  const size: number = info.sizeBytes;
  const where: string | undefined = info.path;
  const listed: PortableCheckpointInfo[] = await src.checkpoints();
  const r: RestoreCheckpointOptions = { ports: [{ host: 0, guest: 80 }], keepIdentity: false, networkPolicy: 'deny-all' };
  const a: Machine = await Machine.restoreCheckpoint(info.id, 'restored');
  const b: Machine = await Machine.restore(info.id, 'restored-2', { target: 'local' }, r);
  const c: Machine = await Machine.restoreCheckpoint(info.id, 'restored-3', null, {
    networkPolicy: { allowHosts: ['pypi.org'] },
  });
  void [again, size, where, listed, a, b, c];
  // @ts-expect-error: a checkpoint id is a string
  await Machine.restoreCheckpoint(1, 'x');
  // @ts-expect-error: unknown restore option
  await Machine.restore(info.id, 'x', undefined, { keepIdentiy: true });
  // @ts-expect-error: networkPolicy is a mode or an allow-list
  await Machine.restore(info.id, 'x', undefined, { networkPolicy: 'open' });
  // @ts-expect-error: the output is a path
  await src.checkpoint(5);
}
