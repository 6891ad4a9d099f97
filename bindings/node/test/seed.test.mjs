// The seed page's TypeScript samples, executed (test/seed/samples.mts): tsc compiles them into
// test/seed/.build (ignored by git), then they register here as node:test tests against the real
// engine. Needs the dev dependencies (`npm ci` in bindings/node; ci.sh does it).
import { execFileSync } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import path from 'node:path';
import { pkgDir, uniqueName, testRegistry } from './helpers.mjs';

const seedDir = path.join(pkgDir, 'test', 'seed');
const tsc = path.join(pkgDir, 'node_modules', 'typescript', 'bin', 'tsc');
if (!existsSync(tsc)) {
  throw new Error(`${tsc} is missing: run \`npm ci\` in ${pkgDir} (dev dependencies) first`);
}
rmSync(path.join(seedDir, '.build'), { recursive: true, force: true });
try {
  execFileSync(process.execPath, [tsc, '-p', seedDir], { encoding: 'utf8', stdio: 'pipe' });
} catch (e) {
  throw new Error(`tsc -p ${seedDir} failed:\n${e.stdout || ''}${e.stderr || ''}`);
}
const { seedTests } = await import('./seed/.build/samples.mjs');
seedTests({ registry: testRegistry, unique: uniqueName });
