// bitfit.js: BitFit task packs in the browser. One onnxruntime-web session runs the frozen graph; a task is
// a few arrays (its trained biases and head) fed to that session by name, fetched on first use and kept.
//
//   import { loadSite } from "./bitfit.js";
//   const site = await loadSite();                       // site.json, the graph, the tokenizer: once
//   const out = await site.predict("sms-spam", ["Text WIN to 80086 now!"]);
//   out.records[0]  // {label: "spam", scores: {ham: 0.02, spam: 0.98}, logits: [...]}: as `bitfit predict`
//
// The site is written by `bitfit export-web` (docs/web.md has its layout). Every file is checked against the
// sha256 the index gives before it is used: a damaged file is refused with a BitFitError, never answered with.
// Nothing is fetched from anywhere but the site itself: onnxruntime-web's wasm files lie in its vendor/.
import * as ort from "./vendor/ort.wasm.min.mjs";
import { Tokenizer } from "./vendor/tokenizers.min.mjs";

export const FORMAT = "bitfit-web-site";
export const TASK_FORMAT = "bitfit-web-task";
export const FORMAT_VERSION = 1;
export const MAX_TEXTS = 256; // texts per predict call (the server's /v1 default); call again for more
export const MAX_TEXT_CHARS = 100000; // characters per text: the tokenizer would read them all before truncating
export const MAX_ABS_VALUE = 1e4; // as the Python runtime: trained values are O(1)-O(10); beyond is damage
const SITE_FILE = "site.json";
const MiB = 2 ** 20;
// the most a file of each kind may be (as runtime/fs.py bounds the Python side's): more is not one of ours
const LIMITS = { index: 64 * MiB, description: 4 * MiB, binary: 256 * MiB, tokenizer: 256 * MiB, graph: 2048 * MiB };
const REFETCH = "re-export the site (bitfit export-web) and reload the page";

export class BitFitError extends Error {
  constructor(message) {
    super(message);
    this.name = "BitFitError";
  }
}

ort.env.wasm.wasmPaths = new URL("./vendor/", import.meta.url).href; // served by the site: never a CDN
// Every bias and head input has a default (an initializer), which onnxruntime warns about once per input at
// load: by design here (docs/onnx.md), so only errors reach the console.
ort.env.logLevel = "error";

// -- fetching and checking -----------------------------------------------------------------------------
async function fetchOk(url, what, init) {
  let response;
  try {
    response = await fetch(url, init);
  } catch (e) {
    throw new BitFitError(`cannot fetch ${what} (${url}): ${e.message}; check that the site is being served`);
  }
  if (!response.ok) {
    throw new BitFitError(`cannot fetch ${what} (${url}): HTTP ${response.status}; ${REFETCH}`);
  }
  return response;
}

async function sha256Hex(bytes) {
  if (!globalThis.crypto || !globalThis.crypto.subtle) {
    throw new BitFitError("this page is not in a secure context (https://, or http://localhost), so it cannot check " +
                          "its files' digests: serve the site over https, or open it from localhost");
  }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The bytes of one file the index lists ({file, sha256, bytes}), refused unless they are exactly those. */
async function fetchChecked(base, entry, what, limit) {
  if (entry.bytes > limit) {
    throw new BitFitError(`${what} (${entry.file}) is listed as ${entry.bytes} bytes, more than such a file can be ` +
                          `(${limit}): it is not one bitfit export-web wrote; ${REFETCH}`);
  }
  const url = new URL(entry.file, base);
  const bytes = new Uint8Array(await (await fetchOk(url, what)).arrayBuffer());
  if (bytes.length !== entry.bytes) {
    throw new BitFitError(`${what} (${entry.file}) is ${bytes.length} bytes where the index says ${entry.bytes}: ` +
                          `it is damaged or was replaced, and is not used; ${REFETCH}`);
  }
  const sha = await sha256Hex(bytes);
  if (sha !== entry.sha256) {
    throw new BitFitError(`${what} (${entry.file}) does not match its digest (sha256 ${sha.slice(0, 16)}..., the ` +
                          `index says ${entry.sha256.slice(0, 16)}...): it is damaged or was replaced, and is not ` +
                          `used; ${REFETCH}`);
  }
  return bytes;
}

function parseJson(bytes, what) {
  try {
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (e) {
    throw new BitFitError(`${what} is not valid JSON (${e.message}); ${REFETCH}`);
  }
}

// -- the shapes of site.json and a task's description ---------------------------------------------------
const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const isCount = (v, min = 0) => Number.isSafeInteger(v) && v >= min;
const isHex = (v) => typeof v === "string" && /^[0-9a-f]{64}$/.test(v);
const isFile = (v) => isObject(v) && typeof v.file === "string" && /^[A-Za-z0-9._/-]{1,300}$/.test(v.file) &&
  !v.file.includes("..") && !v.file.startsWith("/") && isHex(v.sha256) && isCount(v.bytes); // inside the site only

function need(ok, what, field, expected) {
  if (!ok) throw new BitFitError(`${what}: ${field} must be ${expected}; ${REFETCH}`);
}

function checkFormat(data, format, what) {
  need(isObject(data), what, "the file", "a JSON object");
  if (data.format !== format) {
    throw new BitFitError(`${what} declares format ${JSON.stringify(data.format)}, not ${format}: it is not a ` +
                          `file bitfit export-web wrote; ${REFETCH}`);
  }
  if (data.format_version !== FORMAT_VERSION) {
    const newer = typeof data.format_version === "number" && data.format_version > FORMAT_VERSION;
    throw new BitFitError(`${what} is format version ${JSON.stringify(data.format_version)}, this bitfit.js reads ` +
                          `${FORMAT_VERSION}: ${newer ? "the site was exported by a newer bitfit; " : ""}${REFETCH}`);
  }
}

function checkSpecs(list, what, field) {
  need(Array.isArray(list) && list.every((s) => isObject(s) && typeof s.name === "string" && Array.isArray(s.shape) &&
       s.shape.every((d) => Number.isSafeInteger(d) && (d >= 1 || d === -1))), what, field,
       "a list of {name, shape} with whole-number dimensions");
}

function checkSite(site) {
  const what = SITE_FILE;
  checkFormat(site, FORMAT, what);
  need(isHex(site.base_fingerprint), what, "base_fingerprint", "a sha256 hex digest");
  const g = site.graph;
  need(isObject(g) && isFile(g), what, "graph", "{file, sha256, bytes, ...}");
  need(Array.isArray(g.token_inputs) && g.token_inputs[0] === "input_ids" && g.token_inputs[1] === "attention_mask",
       what, "graph.token_inputs", "[input_ids, attention_mask(, token_type_ids)]");
  checkSpecs(g.bias_inputs, what, "graph.bias_inputs");
  checkSpecs(g.head_inputs, what, "graph.head_inputs");
  need(isCount(g.vocab_size, 1) && isCount(g.max_positions, 1), what, "graph.vocab_size and max_positions",
       "whole numbers >= 1");
  need(isFile(site.tokenizer) && typeof site.tokenizer.pad_token === "string" &&
       isCount(site.tokenizer.pad_token_id), what, "tokenizer", "{file, sha256, bytes, pad_token, pad_token_id}");
  need(isFile(site.base_biases), what, "base_biases", "{file, sha256, bytes, tensors}");
  need(Array.isArray(site.tasks) && site.tasks.length > 0 &&
       site.tasks.every((t) => isObject(t) && typeof t.name === "string" && isFile(t.description) && isHex(t.digest)),
       what, "tasks", "a non-empty list of {name, digest, description: {file, sha256, bytes}}");
  const names = new Set(site.tasks.map((t) => t.name));
  need(names.size === site.tasks.length, what, "tasks", "tasks of distinct names");
}

/** A float32 binary's tensors by name, each checked against where the graph takes it and against damage. */
function readTensors(bytes, specs, expected, what) {
  need(bytes.byteLength % 4 === 0, what, "the binary", "float32 values (a multiple of 4 bytes long)");
  const all = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  const out = new Map();
  for (const s of specs) {
    need(isObject(s) && typeof s.name === "string" && Array.isArray(s.shape) && isCount(s.offset) &&
         isCount(s.length), what, "tensors", "a list of {name, shape, offset, length}");
    const want = expected.get(s.name);
    if (want === undefined) throw new BitFitError(`${what} holds ${s.name}, which the graph does not take; ${REFETCH}`);
    const size = s.shape.reduce((a, b) => a * b, 1);
    const fits = s.shape.length === want.length && s.shape.every((d, i) => d >= 1 && (want[i] === -1 || want[i] === d));
    if (!fits || size !== s.length || s.offset + s.length > all.length) {
      throw new BitFitError(`${what}: ${s.name} is [${s.shape}] at ${s.offset}+${s.length} where the graph takes ` +
                            `[${want}] within ${all.length} values; ${REFETCH}`);
    }
    const values = all.subarray(s.offset, s.offset + s.length);
    for (let i = 0; i < values.length; i++) {
      if (!(Math.abs(values[i]) <= MAX_ABS_VALUE)) {
        throw new BitFitError(`${what}: ${s.name}[${i}] is ${values[i]}: not a trained value (NaN, infinite or ` +
                              `beyond ${MAX_ABS_VALUE}); ${REFETCH}`);
      }
    }
    out.set(s.name, new ort.Tensor("float32", values, s.shape));
  }
  return out;
}

// -- tokenizing, as the Python runtime does (runtime/tokenize.py) ----------------------------------------
/** The pair truncation of Hugging Face tokenizers' longest_first: how many tokens of each text stay. */
export function longestFirst(n1, n2, room) {
  if (n1 + n2 <= room) return [n1, n2];
  let [a, b] = n1 > n2 ? [n2, n1] : [n1, n2];
  b = a > room ? a : Math.max(a, room - a);
  if (a + b > room) {
    a = Math.floor(room / 2);
    b = a + (room % 2);
  }
  return n1 > n2 ? [b, a] : [a, b];
}

class TokenEncoder {
  constructor(tokenizerJson, padToken, padId, tokenInputs) {
    try {
      this.tokenizer = new Tokenizer(tokenizerJson, {});
      this.tokenizer.tokenize("a");
    } catch (e) {
      throw new BitFitError(`tokenizers.js cannot load the site's tokenizer.json (${e.message}); ${REFETCH}`);
    }
    this.vocab = this.tokenizer.get_vocab(true);
    this.padId = padId;
    this.tokenInputs = tokenInputs;
    const model = tokenizerJson.model || {};
    const unk = Number.isSafeInteger(model.unk_id) ? model.unk_id : this.vocab.get(model.unk_token);
    this.unkId = unk === undefined ? null : unk;
    this.unkToken = this.unkId === null ? null : this.tokenizer.id_to_token(this.unkId) ?? model.unk_token;
    this.specials = [this.post([], null).tokens.length, this.post([], []).tokens.length];
  }

  post(a, b) {
    const pp = this.tokenizer.post_processor;
    return pp ? pp(a, b, true) : { tokens: b ? [...a, ...b] : a };
  }

  id(token) {
    const id = this.vocab.get(token);
    return id === undefined ? this.unkId : id;
  }

  /** One text (and pair) as ids and type ids, truncated to maxLength; refused when it has no token of its own. */
  row(text, pair, maxLength, index) {
    const parts = [text, pair].map((t, segment) => {
      if (t === null) return null;
      const name = segment === 0 ? "texts" : "text_pairs";
      if (typeof t !== "string") throw new BitFitError(`${name}[${index}] is ${typeof t}, not a string`);
      if (!t.trim()) throw new BitFitError(`${name}[${index}] is empty: give some text`);
      if (t.length > MAX_TEXT_CHARS) {
        throw new BitFitError(`${name}[${index}] is ${t.length} characters, more than ${MAX_TEXT_CHARS}: shorten it`);
      }
      const tokens = this.tokenizer.tokenize(t, { add_special_tokens: false });
      if (tokens.length === 0) {
        throw new BitFitError(`${name}[${index}] gives no token (empty after tokenization: only invisible or ` +
                              "control characters?): give some text");
      }
      if (this.unkId !== null && tokens.every((tok) => this.id(tok) === this.unkId)) {
        throw new BitFitError(`${name}[${index}] gives only the unknown token ${this.unkToken} (none of its ` +
                              "characters is in the tokenizer's vocabulary): the answer would mean nothing; give " +
                              "text in a language the model knows");
      }
      return tokens;
    });
    let [a, b] = parts;
    const room = maxLength - this.specials[b === null ? 0 : 1];
    if (b === null) {
      a = a.slice(0, Math.max(room, 0));
    } else {
      const [n1, n2] = longestFirst(a.length, b.length, room);
      a = a.slice(0, n1);
      b = b.slice(0, n2);
    }
    const out = this.post(a, b);
    const ids = out.tokens.map((tok) => this.id(tok));
    const types = out.token_type_ids ?? new Array(ids.length).fill(0);
    return { ids, types };
  }

  /** The graph's int64 token inputs for a batch, padded to its longest row. */
  encode(texts, pairs, maxLength) {
    const rows = texts.map((t, i) => this.row(t, pairs ? pairs[i] : null, maxLength, i));
    const width = Math.max(...rows.map((r) => r.ids.length));
    const n = rows.length * width;
    const arrays = { input_ids: new BigInt64Array(n).fill(BigInt(this.padId)), attention_mask: new BigInt64Array(n),
                     token_type_ids: new BigInt64Array(n) };
    rows.forEach((r, i) => {
      for (let j = 0; j < r.ids.length; j++) {
        arrays.input_ids[i * width + j] = BigInt(r.ids[j]);
        arrays.attention_mask[i * width + j] = 1n;
        arrays.token_type_ids[i * width + j] = BigInt(r.types[j]);
      }
    });
    const feeds = {};
    for (const name of this.tokenInputs) feeds[name] = new ort.Tensor("int64", arrays[name], [rows.length, width]);
    return { feeds, ids: rows.map((r) => r.ids) };
  }
}

// -- decoding, as runtime/decode.py ------------------------------------------------------------------------
const DECODERS = {
  classes(task, logits, k) {
    return logits.map((row) => {
      const max = Math.max(...row);
      const e = row.map((x) => Math.exp(x - max));
      const sum = e.reduce((a, b) => a + b, 0);
      const p = e.map((x) => x / sum);
      const best = p.indexOf(Math.max(...p));
      return { label: task.labels[best], scores: Object.fromEntries(task.labels.map((n, i) => [n, p[i]])),
               logits: row };
    });
  },
  value(task, logits) {
    return logits.map((row) => ({ label: row[0], scores: { value: row[0] }, logits: row }));
  },
};

// -- the site --------------------------------------------------------------------------------------------
export class Site {
  constructor(base, index, session, encoder, baseTensors, stats) {
    this.base = base;
    this.index = index;
    this.session = session;
    this.encoder = encoder;
    this.baseTensors = baseTensors;
    this.stats = stats; // what loading cost: bytes and milliseconds, and each task's as it loads
    this.entries = new Map(index.tasks.map((t) => [t.name, t])); // O(1) a lookup: a site may list 10,000 tasks
    this.loaded = new Map(); // task name -> Promise of its feeds: fetched once, kept
  }

  /** The tasks the site holds: [{name, task_kind, digest}]. */
  get tasks() {
    return this.index.tasks.map(({ name, task_kind, digest }) => ({ name, task_kind, digest }));
  }

  /** A task's description and feeds (fetched and checked on first use, then kept). */
  task(name) {
    let pending = this.loaded.get(name);
    if (!pending) {
      pending = this.fetchTask(name);
      this.loaded.set(name, pending);
      pending.catch(() => this.loaded.delete(name)); // a failed load is tried again next time, never kept
    }
    return pending;
  }

  async fetchTask(name) {
    const entry = this.entries.get(name);
    if (!entry) {
      const names = this.index.tasks.map((t) => t.name);
      const known = names.slice(0, 20).join(", ") + (names.length > 20 ? `, ... (${names.length} in all)` : "");
      throw new BitFitError(`unknown task ${JSON.stringify(String(name).slice(0, 100))}: this site serves ${known}`);
    }
    const t0 = performance.now();
    const what = `task ${JSON.stringify(name)}`;
    const d = parseJson(await fetchChecked(this.base, entry.description, `${what}'s description`, LIMITS.description), `${what}'s description`);
    checkFormat(d, TASK_FORMAT, `${what}'s description`);
    need(d.task === name && d.digest === entry.digest, what, "its description", "the one site.json lists (name, digest)");
    if (d.base_fingerprint !== this.index.base_fingerprint) {
      throw new BitFitError(`${what} was trained on another base model (fingerprint ${String(d.base_fingerprint).slice(0, 12)}..., ` +
                            `the graph's is ${this.index.base_fingerprint.slice(0, 12)}...); ${REFETCH}`);
    }
    const decode = DECODERS[d.decoder];
    need(Object.hasOwn(DECODERS, d.decoder), what, "decoder", `one of ${Object.keys(DECODERS).join(", ")}`);
    need(Array.isArray(d.labels) && d.labels.every((l) => typeof l === "string"), what, "labels", "a list of names");
    need(["mean", "cls", "pooler"].includes(d.pooling), what, "pooling", "mean, cls or pooler");
    need(isCount(d.max_length, 1) && d.max_length <= this.index.graph.max_positions, what, "max_length",
         `a whole number from 1 to ${this.index.graph.max_positions}`);
    need(isFile(d.binary), what, "binary", "{file, sha256, bytes}");
    const k = d.decoder === "value" ? 1 : d.labels.length;
    const takes = new Map([...this.index.graph.bias_inputs, ...this.index.graph.head_inputs].map((s) => [s.name, s.shape]));
    const bytes = await fetchChecked(this.base, d.binary, `${what}'s biases and head`, LIMITS.binary);
    const tensors = readTensors(bytes, d.tensors, takes, `${what}'s biases and head`);
    const weight = tensors.get("head.weight");
    if (!weight || weight.dims[0] !== k || !tensors.has("head.bias") || tensors.get("head.bias").dims[0] !== k) {
      throw new BitFitError(`${what}: its head must have ${k} output(s) (one per label); ${REFETCH}`);
    }
    if (d.pooling === "pooler" && !(tensors.has("head.pooler.weight") && tensors.has("head.pooler.bias"))) {
      throw new BitFitError(`${what} pools with the BERT pooler but holds no pooler weights; ${REFETCH}`);
    }
    const feeds = {};
    for (const s of this.index.graph.bias_inputs) feeds[s.name] = tensors.get(s.name) ?? this.baseTensors.get(s.name);
    // every head input is fed (the graph has no defaults): a head without the BERT pooler gets zeros there
    for (const s of this.index.graph.head_inputs) feeds[s.name] = tensors.get(s.name) ?? this.zeros(s);
    const pooling = new Float32Array(3);
    pooling[["mean", "cls", "pooler"].indexOf(d.pooling)] = 1;
    feeds["head.pooling"] = new ort.Tensor("float32", pooling, [3]);
    const ms = performance.now() - t0;
    this.stats.tasks[name] = { bytes: entry.description.bytes + d.binary.bytes, ms };
    return { name, kind: d.task_kind, digest: d.digest, labels: d.labels, maxLength: d.max_length,
             textPair: d.text_pair, decode, k, feeds };
  }

  /** A zero tensor of a fixed-shape input, made once and shared by every task that does not set it. */
  zeros(spec) {
    this.zeroTensors ??= new Map();
    if (!this.zeroTensors.has(spec.name)) {
      const dims = spec.shape.map((d) => (d === -1 ? 1 : d));
      this.zeroTensors.set(spec.name, new ort.Tensor("float32", new Float32Array(dims.reduce((a, b) => a * b, 1)), dims));
    }
    return this.zeroTensors.get(spec.name);
  }

  /**
   * Run `task` on `texts` (and `textPairs` for a task trained on pairs): {task, kind, digest, labels, records,
   * ms}, each record as `bitfit predict --json` prints it.
   */
  async predict(name, texts, textPairs = null) {
    if (!Array.isArray(texts) || texts.length === 0) throw new BitFitError("texts must be a non-empty list of strings");
    if (texts.length > MAX_TEXTS) {
      throw new BitFitError(`${texts.length} texts in one call, more than ${MAX_TEXTS}: send them in smaller batches`);
    }
    const t0 = performance.now();
    const task = await this.task(name);
    if (task.textPair && textPairs === null) {
      throw new BitFitError(`task ${JSON.stringify(name)} was trained on pairs of texts: give text_pairs too`);
    }
    if (!task.textPair && textPairs !== null) {
      throw new BitFitError(`task ${JSON.stringify(name)} takes single texts: drop text_pairs`);
    }
    if (textPairs !== null && (!Array.isArray(textPairs) || textPairs.length !== texts.length)) {
      throw new BitFitError(`text_pairs must be a list of ${texts.length} strings, one per text`);
    }
    const t1 = performance.now();
    const { feeds: tokens } = this.encoder.encode(texts, textPairs, task.maxLength);
    const t2 = performance.now();
    // calls at once are safe: onnxruntime-web serializes a session's runs, and each call brings its own feeds
    const out = (await this.session.run({ ...task.feeds, ...tokens }, ["logits"])).logits;
    const t3 = performance.now();
    const values = out.data;
    const logits = [];
    for (let i = 0; i < texts.length; i++) logits.push(Array.from(values.subarray(i * task.k, (i + 1) * task.k)));
    if (!logits.every((row) => row.every(Number.isFinite))) {
      throw new BitFitError(`task ${JSON.stringify(name)} gave non-finite logits: the task or the graph is damaged; ${REFETCH}`);
    }
    const records = task.decode(task, logits, task.k);
    return { task: name, kind: task.kind, digest: task.digest, labels: records.map((r) => r.label), records,
             ms: { task: t1 - t0, tokenize: t2 - t1, run: t3 - t2, total: performance.now() - t0 } };
  }

  /** Token ids as the page's tokenizer gives them (tests compare them with the Python tokenizer's). */
  tokenize(texts, textPairs = null, maxLength = 512) {
    return this.encoder.encode(texts, textPairs, maxLength).ids;
  }
}

/**
 * Load a site written by `bitfit export-web`: its index, graph, tokenizer and base biases, each checked against its
 * digest; one onnxruntime-web session. numThreads: wasm threads (default: up to 4 where the page is cross-origin
 * isolated, which threads need, else 1).
 */
export async function loadSite(url = new URL(".", import.meta.url), { numThreads } = {}) {
  const t0 = performance.now();
  const base = new URL(url, location.href);
  const indexBytes = new Uint8Array(await (await fetchOk(new URL(SITE_FILE, base), SITE_FILE, { cache: "no-cache" })).arrayBuffer());
  if (indexBytes.length > LIMITS.index) {
    throw new BitFitError(`${SITE_FILE} is ${indexBytes.length} bytes, more than an index can be (${LIMITS.index}); ${REFETCH}`);
  }
  const index = parseJson(indexBytes, SITE_FILE);
  checkSite(index);
  const g = index.graph;
  const [graph, tokenizerBytes, baseBytes] = await Promise.all([
    fetchChecked(base, g, "the graph", LIMITS.graph),
    fetchChecked(base, index.tokenizer, "the tokenizer", LIMITS.tokenizer),
    fetchChecked(base, index.base_biases, "the base biases", LIMITS.binary),
  ]);
  const t1 = performance.now();
  const baseTensors = readTensors(baseBytes, index.base_biases.tensors,
                                  new Map(g.bias_inputs.map((s) => [s.name, s.shape])), "the base biases");
  const missing = g.bias_inputs.filter((s) => !baseTensors.has(s.name)).map((s) => s.name);
  if (missing.length) throw new BitFitError(`the base biases lack ${missing.join(", ")}; ${REFETCH}`);
  const encoder = new TokenEncoder(parseJson(tokenizerBytes, "the tokenizer"), index.tokenizer.pad_token,
                                  index.tokenizer.pad_token_id, g.token_inputs);
  const threads = numThreads ?? (globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1);
  ort.env.wasm.numThreads = threads;
  let session;
  try {
    session = await ort.InferenceSession.create(graph, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  } catch (e) {
    throw new BitFitError(`onnxruntime-web cannot load the graph (${String(e.message || e).slice(0, 300)}): ` +
                          "export a plain fp32 or int8 graph (docs/web.md)");
  }
  // inputNames lists the required inputs only: the bias and head inputs, which have defaults, are checked by
  // the run itself (a feed of a name the graph does not take is an error there)
  const absent = g.token_inputs.filter((n) => !session.inputNames.includes(n));
  if (absent.length || !session.outputNames.includes("logits")) {
    throw new BitFitError(`the graph does not take what site.json says (${absent.length ? `no input ${absent.join(", ")}` :
                          "no logits output"}); ${REFETCH}`);
  }
  const t2 = performance.now();
  const stats = { graphBytes: g.bytes, threads, fetchMs: t1 - t0, sessionMs: t2 - t1, loadMs: t2 - t0, tasks: {} };
  return new Site(base, index, session, encoder, baseTensors, stats);
}
