#!/usr/bin/env node
'use strict';
// The package's `install` script: builds the native addon with cargo (release) and copies it to
// smol.node beside index.js. Runs on `npm install ./bindings/node` (and `npm install` inside
// this directory). Needs a Rust toolchain; the crate is the workspace member `smol-node`.
// SMOL_NODE_SKIP_BUILD=1 skips it when smol.node already exists.

const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const here = path.resolve(__dirname, '..');
const out = path.join(here, 'smol.node');

function fail(msg) {
  console.error(`smolmachines: ${msg}`);
  process.exit(1);
}

if (process.env.SMOL_NODE_SKIP_BUILD && fs.existsSync(out)) process.exit(0);
if (process.platform !== 'linux' || process.arch !== 'x64') {
  fail(`the local engine runs on linux-x64 hosts (this is ${process.platform}-${process.arch})`);
}
if (!fs.existsSync(path.join(here, 'Cargo.toml'))) fail(`${here} has no Cargo.toml`);

const cargo = process.env.CARGO || 'cargo';
let meta;
try {
  meta = JSON.parse(
    execFileSync(cargo, ['metadata', '--format-version', '1', '--no-deps'], {
      cwd: here,
      encoding: 'utf8',
      maxBuffer: 64 << 20,
    }),
  );
} catch (e) {
  fail(
    `cannot run \`${cargo} metadata\` in ${here} (${e.message.split('\n')[0]}); ` +
      'install a Rust toolchain (rustup, or Debian\'s cargo) and install the package from a ' +
      'checkout of the smol repository (npm install ./bindings/node)',
  );
}
console.error('smolmachines: building the native addon (cargo build --release -p smol-node)');
try {
  execFileSync(cargo, ['build', '--release', '-p', 'smol-node'], { cwd: here, stdio: 'inherit' });
} catch (e) {
  fail(`cargo build failed (${e.message.split('\n')[0]})`);
}
const lib = path.join(meta.target_directory, 'release', 'libsmol_node.so');
if (!fs.existsSync(lib)) fail(`${lib} was not built`);
// copy, then rename: a process that has the old addon loaded keeps its mapping
const tmp = `${out}.${process.pid}.tmp`;
fs.copyFileSync(lib, tmp);
fs.renameSync(tmp, out);
console.error(`smolmachines: built ${out}`);
