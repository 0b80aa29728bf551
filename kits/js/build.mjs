// Builds app.js into a component of the contract's `model-plugin` world:
//
//     node build.mjs [OUT.wasm]        (default: embedhost-plugin-js.wasm)
//
// with the componentize-js pinned in package.json (`npm ci` installs it).
// Only the WASI features the host grants are kept (clocks, random, and
// stdio, which goes to the host's log): no HTTP, no incoming fetch events.
import { writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { componentize } from '@bytecodealliance/componentize-js';

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2] ?? join(here, 'embedhost-plugin-js.wasm');

const { component } = await componentize({
  sourcePath: join(here, 'app.js'),
  witPath: join(here, 'wit', 'embedder.wit'),
  worldName: 'model-plugin',
  disableFeatures: ['http', 'fetch-event'],
});
await writeFile(out, component);
console.log(`wrote ${out} (${(component.length / 1048576).toFixed(1)} MiB)`);
