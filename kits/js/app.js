// An embedhost plugin in JavaScript: a component of the `model-plugin` world.
//
// The host runs its BERT engine (the model its config names; by default
// all-MiniLM-L6-v2, 384 dimensions) beside this plugin, in the same sandbox,
// and this plugin asks it for vectors through the `encoder` import. What the
// plugin adds, set by `[plugin.config]` (every value a string):
//
// - `dimensions = "N"`: keep the first N numbers of each vector and scale it
//   back to unit length (Matryoshka truncation; a model trained for it keeps
//   most of its quality, another loses some).
// - `strip_markup = "true"`: remove HTML tags, Markdown heading marks and
//   emphasis marks before encoding.
// - `lowercase = "true"`: lowercase every text before encoding.
//
// Another key is refused naming it, except those the host passes a plugin
// given a model (`model_id`, `pooling`, `normalize`): the encoder already
// follows them, and they are accepted so that one table serves both.
// The Rust and Python kits do exactly the same.
//
// Errors are values: throw `{ tag: 'invalid-config', val: '...' }` and the
// like. Any other exception is a trap, and the host replaces the instance.

import { info, encode } from 'embedhost:embedder/encoder@0.1.1';
import { log } from 'embedhost:embedder/host-log@0.1.1';

// Keys the host passes a plugin given a model: the encoder follows them.
const HOST_KEYS = ['model_id', 'pooling', 'normalize'];
const KEYS = ['dimensions', 'strip_markup', 'lowercase'];

// ASCII whitespace and punctuation: what ends a word for emphasis marks.
const BOUNDARY = new Set(' \t\n\r\f\v!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~');

let state = null;
let processed = 0;

const invalidConfig = (message) => ({ tag: 'invalid-config', val: message });

function parseBool(key, value) {
  if (value === 'true' || value === 'false') return value === 'true';
  throw invalidConfig(`\`${key} = ${value}\`: expected true or false`);
}

function parseConfig(config, encoderDimension) {
  const settings = { dimensions: encoderDimension, stripMarkup: false, lowercase: false };
  for (const [key, value] of config) {
    if (key === 'dimensions') {
      const n = /^[0-9]+$/.test(value) ? Number(value) : 0;
      if (!(n >= 1 && n <= encoderDimension)) {
        throw invalidConfig(
          `\`dimensions = ${value}\`: expected a whole number from 1 to ${encoderDimension}` +
            " (the encoder's dimension)",
        );
      }
      settings.dimensions = n;
    } else if (key === 'strip_markup') {
      settings.stripMarkup = parseBool(key, value);
    } else if (key === 'lowercase') {
      settings.lowercase = parseBool(key, value);
    } else if (!HOST_KEYS.includes(key)) {
      throw invalidConfig(`unknown key \`${key}\` (known: ${KEYS.join(', ')})`);
    }
  }
  return settings;
}

// The encoder's model id, with a mark for each setting that changes the
// vectors: an index made with one is refused by another.
function modelId(base, settings, encoderDimension) {
  let out = base;
  if (settings.dimensions < encoderDimension) out += `+d${settings.dimensions}`;
  if (settings.stripMarkup) out += '+strip';
  if (settings.lowercase) out += '+lower';
  return out;
}

// `<` then a letter, `/` or `!`, up to the next `>` with no `<` inside.
function stripTags(text) {
  const chars = [...text];
  const out = [];
  let i = 0;
  while (i < chars.length) {
    const next = chars[i + 1];
    if (chars[i] === '<' && next !== undefined && /^[A-Za-z/!]$/.test(next)) {
      let end = i + 1;
      while (end < chars.length && chars[end] !== '<' && chars[end] !== '>') end++;
      if (end < chars.length && chars[end] === '>') {
        i = end + 1;
        continue;
      }
    }
    out.push(chars[i]);
    i++;
  }
  return out.join('');
}

// One to six `#` at the start of a line, and the spaces or tabs after.
function stripHeadings(text) {
  return text
    .split('\n')
    .map((line) => {
      const hashes = line.length - line.replace(/^#+/, '').length;
      const rest = line.slice(hashes);
      if (hashes >= 1 && hashes <= 6 && (rest[0] === ' ' || rest[0] === '\t')) {
        return rest.replace(/^[ \t]+/, '');
      }
      return line;
    })
    .join('\n');
}

// A run of `*` and `_` is dropped unless a word character stands on both
// sides of it (`snake_case` and `2*3` stay).
function stripEmphasis(text) {
  const chars = [...text];
  const out = [];
  let i = 0;
  while (i < chars.length) {
    if (chars[i] === '*' || chars[i] === '_') {
      let end = i;
      while (end < chars.length && (chars[end] === '*' || chars[end] === '_')) end++;
      const before = i > 0 ? chars[i - 1] : ' ';
      const after = end < chars.length ? chars[end] : ' ';
      if (!BOUNDARY.has(before) && !BOUNDARY.has(after)) out.push(...chars.slice(i, end));
      i = end;
      continue;
    }
    out.push(chars[i]);
    i++;
  }
  return out.join('');
}

function prepare(text, settings) {
  let out = text;
  if (settings.stripMarkup) out = stripEmphasis(stripHeadings(stripTags(out)));
  if (settings.lowercase) out = out.toLowerCase();
  return out;
}

// Each row of `width` floats cut to its first `keep`, at unit length.
function cut(data, width, keep, out, at) {
  for (let start = 0; start < data.length; start += width) {
    let norm = 0;
    for (let j = 0; j < keep; j++) norm += data[start + j] * data[start + j];
    norm = Math.sqrt(norm);
    for (let j = 0; j < keep; j++) out[at + j] = norm > 0 ? data[start + j] / norm : data[start + j];
    at += keep;
  }
  return at;
}

export const embedder = {
  init(config) {
    const encoderInfo = info();
    const settings = parseConfig(config, encoderInfo.dimension);
    state = { settings, encoderInfo };
    log('debug', `js kit: ${settings.dimensions} dimensions`);
    return {
      modelId: modelId(encoderInfo.modelId, settings, encoderInfo.dimension),
      dimension: settings.dimensions,
      maxInputTokens: encoderInfo.maxInputTokens,
      normalized: true,
    };
  },

  // `kind` is not used: the host puts a model's query or document prompt
  // before each text itself.
  embed(texts, _kind) {
    if (state === null) throw { tag: 'not-initialized' };
    const { settings, encoderInfo } = state;
    const prepared = texts.map((t) => prepare(t, settings));
    const data = new Float32Array(texts.length * settings.dimensions);
    const step = Math.max(1, encoderInfo.maxBatch);
    let at = 0;
    for (let start = 0; start < prepared.length; start += step) {
      let got;
      try {
        got = encode(prepared.slice(start, start + step));
      } catch (e) {
        // The encoder's error, unchanged, its index in this batch.
        const error = e && Object.hasOwn(e, 'payload') ? e.payload : e;
        if (error && error.tag === 'invalid-input' && start > 0) {
          throw { tag: 'invalid-input', val: { index: error.val.index + start, reason: error.val.reason } };
        }
        throw error;
      }
      at = cut(got.data, got.dimension, settings.dimensions, data, at);
    }
    processed += texts.length;
    return { dimension: settings.dimensions, data };
  },

  health() {
    // JavaScript cannot read its linear memory: 0, and the host measures
    // it anyway.
    return { memoryBytes: 0n, processed: BigInt(processed) };
  },
};
