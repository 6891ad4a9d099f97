#!/usr/bin/env node
// Per-call overhead of the Node binding: exec(["true"]) from Node against the same call made by
// Rust (a loop inside the addon, no JS in between) on the same machine in the same run.
//   node bench.mjs [N]      (default 200 calls each, after 20 warm-up calls)
import { Machine } from 'smolmachines';

const N = Number(process.argv[2] || 200);
const WARM = 20;

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
};
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))];

const m = await Machine.create({ name: `bench-node-${process.pid}` });
try {
  const native = m[Object.getOwnPropertySymbols(m).find((s) => s.description === 'smol.native')];
  const argv = ['true'];
  for (let i = 0; i < WARM; i++) await m.exec(argv);
  await native.benchExec(argv, WARM);
  // interleave rounds so that drift in the guest affects both sides alike
  const node = [];
  const rust = [];
  const rounds = 4;
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < N / rounds; i++) {
      const t = process.hrtime.bigint();
      const res = await m.exec(argv);
      node.push(Number(process.hrtime.bigint() - t) / 1000);
      if (res.exitCode !== 0) throw new Error(`exit ${res.exitCode}`);
    }
    rust.push(...(await native.benchExec(argv, N / rounds)));
  }
  const mn = median(node);
  const mr = median(rust);
  const f = (x) => `${(x / 1000).toFixed(3)} ms`;
  console.log(`exec(["true"]) on one machine, ${node.length} calls each (accelerator: ${Machine.localAvailability().accel})`);
  console.log(`  Rust (in the addon): median ${f(mr)}  p90 ${f(pct(rust, 90))}`);
  console.log(`  Node (smolmachines): median ${f(mn)}  p90 ${f(pct(node, 90))}`);
  console.log(`  overhead: ${((mn - mr) / 1000).toFixed(3)} ms per call; ratio Node/Rust = ${(mn / mr).toFixed(3)}x`);
} finally {
  await m.delete();
}
