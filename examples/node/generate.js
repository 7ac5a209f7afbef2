#!/usr/bin/env node
// Streaming text generation against the Tandem router from Node.js.
//
// Loads the repo's .proto files at runtime (no generated code), calls the server-streaming
// RouterService.Generate, writes each text delta as it arrives and ends with one JSON summary
// line. Exit status: 0 on success, 1 on a gRPC error (its status name and message go to
// stderr), 2 on bad command-line flags.
//
//   node generate.js --router 127.0.0.1:50051 --prompt "Hello" --max-new-tokens 16

import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const PROTO_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../proto");
const ROUTER_PROTO = "tandem/router/v1/router.proto";

const USAGE = `usage: node generate.js [--router HOST:PORT] --prompt TEXT [options]

  --router HOST:PORT      router address (default: $TANDEM_ROUTER)
  --prompt TEXT           the prompt (tokenized by the router)
  --max-new-tokens N      tokens to generate per sample (default: the router's, 128)
  --temperature T         0 is greedy (default: the router's, 1.0)
  --seed S                sample i of n draws with seed + i
  --stop STR              a stop string (repeatable)
  --n N                   samples (default 1)
  --timeout SECONDS       deadline for the whole stream (default 60)
  --json                  print only the JSON summary line
  -h, --help              this text

Output: text deltas as they stream (n = 1: raw text; n > 1: one line per delta,
"[index] <JSON string>"), then one JSON summary line on a line of its own:
  {"request_id": "...", "samples": [{"index": 0, "text": "...", "token_ids": [...],
   "finish_reason": "FINISH_REASON_LENGTH", "usage": {...}}]}`;

class UsageError extends Error {}

const OPTIONS = {
  router: { type: "string" },
  prompt: { type: "string" },
  "max-new-tokens": { type: "string" },
  temperature: { type: "string" },
  seed: { type: "string" },
  stop: { type: "string", multiple: true },
  n: { type: "string" },
  timeout: { type: "string" },
  json: { type: "boolean", default: false },
  help: { type: "boolean", short: "h", default: false },
};

// parseArgs refuses `--temperature -1` (a value that looks like a flag): join each string
// option with the word after it, as `--temperature=-1`.
function joinValues(argv) {
  const out = [];
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i].startsWith("--") ? argv[i].slice(2) : null;
    if (OPTIONS[name]?.type === "string" && i + 1 < argv.length) out.push(`${argv[i]}=${argv[++i]}`);
    else out.push(argv[i]);
  }
  return out;
}

function parseCommandLine(argv) {
  const { values } = parseArgs({ args: joinValues(argv), options: OPTIONS, strict: true });
  if (values.help) return { help: true };
  const router = values.router ?? process.env.TANDEM_ROUTER;
  if (!router) throw new UsageError("no router address: pass --router HOST:PORT or set TANDEM_ROUTER");
  if (values.prompt === undefined) throw new UsageError("--prompt is required");
  return {
    router,
    prompt: values.prompt,
    maxNewTokens: integer(values, "max-new-tokens"),
    temperature: number(values, "temperature"),
    seed: integer(values, "seed"),
    stop: values.stop ?? [],
    n: integer(values, "n") ?? 1,
    timeoutS: number(values, "timeout") ?? 60,
    jsonOnly: values.json,
  };
}

// Flags are only checked for being numbers: range checks are the router's job, and its
// INVALID_ARGUMENT is what the caller should see.
function number(values, name) {
  if (values[name] === undefined) return undefined;
  const x = Number(values[name]);
  if (values[name].trim() === "" || !Number.isFinite(x)) throw new UsageError(`--${name}: not a number`);
  return x;
}

function integer(values, name) {
  const x = number(values, name);
  if (x !== undefined && !Number.isInteger(x)) throw new UsageError(`--${name}: not an integer`);
  return x;
}

function loadRouterService() {
  const definition = protoLoader.loadSync(ROUTER_PROTO, {
    keepCase: true,
    longs: String, // uint64 request_id, int64 seed: strings, exact beyond 2^53
    enums: String, // finish reasons by name
    defaults: true,
    oneofs: true,
    includeDirs: [PROTO_DIR],
  });
  return grpc.loadPackageDefinition(definition).tandem.router.v1.RouterService;
}

function buildRequest(opts) {
  // Every SamplingParams field is proto3 `optional`: leave out what was not given so the
  // router applies its default (an explicit temperature 0 still means greedy).
  const sampling_params = { stop: opts.stop };
  if (opts.maxNewTokens !== undefined) sampling_params.max_new_tokens = opts.maxNewTokens;
  if (opts.temperature !== undefined) sampling_params.temperature = opts.temperature;
  if (opts.seed !== undefined) sampling_params.seed = String(opts.seed);
  return { text: opts.prompt, n: opts.n, sampling_params };
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? `UNKNOWN_CODE_${code}`;
}

function generate(client, request, opts) {
  const samples = new Map(); // index -> summary entry, filled as increments arrive
  let requestId = null;
  const deadline = new Date(Date.now() + opts.timeoutS * 1000);
  const call = client.Generate(request, { deadline });
  process.once("SIGINT", () => call.cancel());

  call.on("data", (response) => {
    requestId = response.request_id;
    const out = response.output;
    let sample = samples.get(out.index);
    if (sample === undefined) {
      sample = { index: out.index, text: "", token_ids: [], finish_reason: null, usage: null, route: null };
      samples.set(out.index, sample);
    }
    sample.text += out.text;
    sample.token_ids.push(...out.token_ids);
    sample.usage = out.usage; // totals so far
    if (response.route) sample.route = response.route;
    if (out.finish) {
      sample.finish_reason = out.finish.reason;
      if (out.finish.message) sample.finish_message = out.finish.message;
    }
    if (opts.jsonOnly || out.text === "") return;
    if (opts.n === 1) process.stdout.write(out.text);
    else process.stdout.write(`[${out.index}] ${JSON.stringify(out.text)}\n`);
  });

  return new Promise((resolve, reject) => {
    call.on("error", reject);
    call.on("end", () => {
      const ordered = [...samples.values()].sort((a, b) => a.index - b.index);
      resolve({ request_id: requestId, samples: ordered });
    });
  });
}

async function main() {
  let opts;
  try {
    opts = parseCommandLine(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`error: ${err.message}\n\n${USAGE}\n`);
    return 2;
  }
  if (opts.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }

  const RouterService = loadRouterService();
  const client = new RouterService(opts.router, grpc.credentials.createInsecure());
  try {
    const summary = await generate(client, buildRequest(opts), opts);
    if (!opts.jsonOnly && opts.n === 1) process.stdout.write("\n"); // end the raw text's line
    process.stdout.write(`${JSON.stringify(summary)}\n`);
    return 0;
  } catch (err) {
    if (err.code === undefined) throw err;
    process.stderr.write(`error: ${statusName(err.code)} (${err.code}): ${err.details}\n`);
    return 1;
  } finally {
    client.close();
  }
}

// exitCode rather than exit(): let stdout drain when it is a pipe.
process.exitCode = await main();
