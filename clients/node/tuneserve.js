'use strict';
// A small tuneserve client for Node.js: loads the API from the .proto file at run time
// (@grpc/proto-loader), connects in plaintext or over TLS (mutual TLS with a client
// certificate) with an optional bearer token, and offers promise-returning calls with
// deadlines. Transient failures (UNAVAILABLE, RESOURCE_EXHAUSTED) are retried by grpc-js
// itself, from a service config: a stream only until its first message arrives. A failed
// call rejects with a TuneserveError carrying the server's rich details (AIP-193), decoded
// from the grpc-status-details-bin trailer.
//
// RoutedClient spreads calls over many replicas with adapter-aware routing, the same policy
// as the Python client's tuneserve_client.routing (see README.md): rendezvous hashing ranks
// the replicas for each adapter, an adapter's requests go to the least loaded of its first
// `replicasPerAdapter` replicas and spill down its rank when they are full, a replica that
// answered UNAVAILABLE is skipped for a cool-down, and everything else goes to the least
// loaded replica in turn. rankReplicas() gives the same order as Python's rank_replicas().

const crypto = require('node:crypto');
const dns = require('node:dns');
const net = require('node:net');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs/light');

const DEFAULT_PROTO = path.resolve(__dirname, '../../proto/tuneserve/v1/tuneserve.proto');
const FINAL_STATES = new Set(['JOB_STATE_SUCCEEDED', 'JOB_STATE_FAILED', 'JOB_STATE_CANCELLED']);
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** The tuneserve.v1 package, from TUNESERVE_PROTO or the repository's proto/ directory.
 *  Fields keep their proto names (adapter_id, not adapterId); enums are their names;
 *  64-bit integers are strings. */
function loadApi(protoPath = process.env.TUNESERVE_PROTO || DEFAULT_PROTO) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).tuneserve.v1;
}

// The few google.rpc / google.protobuf messages of the error details, from their public
// definitions (google/rpc/status.proto, google/rpc/error_details.proto, google/protobuf/
// any.proto and duration.proto), as a protobufjs JSON descriptor: nothing to fetch or parse.
const RPC_TYPES = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: {
              fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } },
            },
            Duration: {
              fields: { seconds: { type: 'int64', id: 1 }, nanos: { type: 'int32', id: 2 } },
            },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
            BadRequest: {
              fields: { field_violations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
              nested: {
                FieldViolation: {
                  fields: {
                    field: { type: 'string', id: 1 },
                    description: { type: 'string', id: 2 },
                  },
                },
              },
            },
            RetryInfo: { fields: { retry_delay: { type: 'google.protobuf.Duration', id: 1 } } },
          },
        },
      },
    },
  },
});
const STATUS = RPC_TYPES.lookupType('google.rpc.Status');
const DETAIL_TYPES = Object.fromEntries(
  ['google.rpc.ErrorInfo', 'google.rpc.BadRequest', 'google.rpc.RetryInfo'].map((name) => [
    name,
    RPC_TYPES.lookupType(name),
  ]),
);
const TO_OBJECT = { longs: Number, defaults: true, arrays: true, objects: true };

/** The google.rpc.Status of a failed call, from its grpc-status-details-bin trailer, with
 *  its known details unpacked: { code, message, details: [{ type, ...fields }] }. Null when
 *  there is none, it does not decode, or its code disagrees with the call's. */
function decodeStatusDetails(error) {
  const raw = error.metadata && error.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return null;
  let status;
  try {
    status = STATUS.decode(Buffer.isBuffer(raw) ? raw : Buffer.from(String(raw), 'base64'));
  } catch {
    return null;
  }
  if (status.code !== error.code) return null;
  const details = [];
  for (const any of status.details) {
    const type = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    const messageType = DETAIL_TYPES[type];
    if (!messageType) continue; // a detail this client does not know: skip it
    try {
      details.push({ type, ...messageType.toObject(messageType.decode(any.value), TO_OBJECT) });
    } catch {
      // a detail that does not decode: skip it
    }
  }
  return { code: status.code, message: status.message, details };
}

/** A failed call: `code` is the status name ("INVALID_ARGUMENT"), `details` the server's
 *  message, and from the server's rich details (AIP-193, google.rpc.Status): `reason` and
 *  `domain` (ErrorInfo), `field` (the bad field, e.g. "dataset.inline.rows[3].response"),
 *  `row` (the dataset row, or null), `violations` ([{ field, description }], BadRequest) and
 *  `retryAfterMs` (the server's RetryInfo hint with RESOURCE_EXHAUSTED, or null).
 *  `statusDetails` is the whole decoded Status (null without one); `metadata` the trailers. */
class TuneserveError extends Error {
  constructor(error) {
    const code = CODE_NAMES[error.code] || String(error.code);
    super(`${code}: ${error.details || error.message}`);
    this.name = 'TuneserveError';
    this.code = code;
    this.details = error.details || '';
    this.metadata = error.metadata;
    this.reason = '';
    this.domain = '';
    this.field = '';
    this.row = null;
    this.violations = [];
    this.retryAfterMs = null;
    this.statusDetails = decodeStatusDetails(error);
    for (const detail of this.statusDetails ? this.statusDetails.details : []) {
      if (detail.type === 'google.rpc.ErrorInfo') {
        this.reason = detail.reason;
        this.domain = detail.domain;
        this.field = detail.metadata.field || '';
        const row = detail.metadata.row;
        if (row !== undefined && row !== '') this.row = Number(row);
      } else if (detail.type === 'google.rpc.BadRequest') {
        this.violations = detail.field_violations.map(({ field, description }) => ({
          field,
          description,
        }));
      } else if (detail.type === 'google.rpc.RetryInfo' && detail.retry_delay) {
        this.retryAfterMs = detail.retry_delay.seconds * 1000 + detail.retry_delay.nanos / 1e6;
      }
    }
  }
}

function retryConfig(maxAttempts) {
  // grpc-js refuses a retry policy with maxAttempts under 2: no policy at all means no retries.
  if (maxAttempts < 2) return JSON.stringify({ methodConfig: [] });
  return JSON.stringify({
    methodConfig: [
      {
        name: [{ service: 'tuneserve.v1.TuneserveService' }],
        retryPolicy: {
          maxAttempts,
          initialBackoff: '0.2s',
          maxBackoff: '10s',
          backoffMultiplier: 2,
          retryableStatusCodes: ['UNAVAILABLE', 'RESOURCE_EXHAUSTED'],
        },
      },
    ],
  });
}

class TuneserveClient {
  /**
   * @param {string} target host:port
   * @param {object} [options]
   * @param {string|Buffer} [options.ca] CA certificate (PEM, or a path to it): TLS on
   * @param {string|Buffer} [options.cert] client certificate chain, for mutual TLS
   * @param {string|Buffer} [options.key] its private key
   * @param {boolean} [options.tls] TLS with the system's trust store
   * @param {string} [options.serverName] name to check the server's certificate against
   * @param {string} [options.token] sent as `authorization: Bearer <token>` on every call
   * @param {number|null} [options.timeoutMs=30000] default deadline of quick calls (null: none)
   * @param {number} [options.maxAttempts=5] tries per call, retries included (1: no retries)
   * @param {string} [options.protoPath] the .proto file (default: TUNESERVE_PROTO or proto/)
   */
  constructor(target, options = {}) {
    const { ca, cert, key, tls, serverName, token, protoPath } = options;
    const api = loadApi(protoPath);
    if (Boolean(cert) !== Boolean(key)) throw new Error('mutual TLS needs both cert and key');
    const secure = Boolean(tls || ca || cert);
    this.metadata = new grpc.Metadata();
    let credentials;
    if (secure) {
      credentials = grpc.credentials.createSsl(pem(ca), pem(key), pem(cert));
      if (token) {
        const bearer = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
          const md = new grpc.Metadata();
          md.set('authorization', `Bearer ${token}`);
          callback(null, md);
        });
        credentials = grpc.credentials.combineChannelCredentials(credentials, bearer);
      }
    } else {
      // grpc-js refuses call credentials on an insecure channel: send the header ourselves.
      credentials = grpc.credentials.createInsecure();
      if (token) this.metadata.set('authorization', `Bearer ${token}`);
    }
    const channelOptions = {
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
      'grpc.max_send_message_length': 64 * 1024 * 1024,
      'grpc.service_config': retryConfig(options.maxAttempts ?? 5),
    };
    if (serverName) channelOptions['grpc.ssl_target_name_override'] = serverName;
    this.stub = new api.TuneserveService(target, credentials, channelOptions);
    this.timeoutMs = options.timeoutMs === undefined ? 30000 : options.timeoutMs;
  }

  close() {
    this.stub.close();
  }

  /** Call a unary method by its proto name; resolves with the response message.
   *  `timeoutMs` overrides the client's default deadline (null: none). */
  unary(method, request, { timeoutMs } = {}) {
    const ms = timeoutMs === undefined ? this.timeoutMs : timeoutMs;
    const callOptions = ms == null ? {} : { deadline: Date.now() + ms };
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata, callOptions, (error, response) =>
        error ? reject(new TuneserveError(error)) : resolve(response),
      );
    });
  }

  /** Queue a fine-tune; resolves with the QUEUED job. A request_id is generated when none
   *  is given, so that a retried call cannot queue the job twice. */
  async trainJob(request, options) {
    const withId = { request_id: crypto.randomUUID(), ...request };
    return (await this.unary('TrainJob', withId, options)).job;
  }

  async getStatus(jobId, options) {
    return (await this.unary('GetStatus', { job_id: jobId }, options)).job;
  }

  async cancelJob(jobId, options) {
    return (await this.unary('CancelJob', { job_id: jobId }, options)).job;
  }

  async listAdapters(options) {
    return (await this.unary('ListAdapters', {}, options)).adapters;
  }

  /** Generation has no deadline unless one is given: it takes as long as the model needs. */
  generate(request, { timeoutMs = null } = {}) {
    return this.unary('Generate', request, { timeoutMs });
  }

  /** Poll until the job is SUCCEEDED, FAILED or CANCELLED; resolves with it. `onProgress`
   *  sees the job at every poll. */
  async waitForJob(jobId, { pollMs = 250, onProgress, timeoutMs = null } = {}) {
    const deadline = timeoutMs == null ? Infinity : Date.now() + timeoutMs;
    for (;;) {
      const job = await this.getStatus(jobId);
      if (onProgress) onProgress(job);
      if (FINAL_STATES.has(job.state)) return job;
      if (Date.now() > deadline) throw new Error(`job ${jobId} not finished after ${timeoutMs} ms`);
      await new Promise((resolve) => setTimeout(resolve, pollMs));
    }
  }

  /** Stream a generation: an async iterable of GenerateStreamResponse messages (the last one
   *  has the finish reason and counts). Errors are thrown as TuneserveError. Breaking out of
   *  the loop cancels the call. */
  async *generateStream(request, { timeoutMs = null } = {}) {
    const callOptions = timeoutMs == null ? {} : { deadline: Date.now() + timeoutMs };
    const call = this.stub.GenerateStream(request, this.metadata, callOptions);
    try {
      for await (const chunk of call) yield chunk;
    } catch (error) {
      throw error.code === undefined ? error : new TuneserveError(error);
    } finally {
      call.cancel();
    }
  }
}

function pem(source) {
  if (source == null) return null;
  if (Buffer.isBuffer(source)) return source;
  return source.includes('-----BEGIN') ? Buffer.from(source) : fs.readFileSync(source);
}

// --- adapter-aware routing over many replicas

/** The rendezvous weight of (adapter, replica): the first 8 bytes of SHA-256 over
 *  `${adapterId}\n${address}` (UTF-8), an unsigned big-endian integer (a BigInt). The Python
 *  client's routing.score() computes the same number. */
function rendezvousScore(adapterId, address) {
  const digest = crypto.createHash('sha256').update(`${adapterId}\n${address}`).digest();
  return digest.readBigUInt64BE(0);
}

/** Every address, best first for `adapterId`: highest weight first, ties by address. */
function rankReplicas(adapterId, addresses) {
  const scored = [...new Set(addresses)].map((a) => [rendezvousScore(adapterId, a), a]);
  const order = (x, y) => (x < y ? -1 : x > y ? 1 : 0);
  scored.sort(([sa, a], [sb, b]) => order(sb, sa) || order(a, b));
  return scored.map(([, a]) => a);
}

/** The routing policy over a set of replica addresses, with this client's in-flight counts
 *  and the replicas marked down; no I/O. Picks as the Python Router does, call for call. */
class Router {
  /**
   * @param {string[]} [addresses]
   * @param {object} [options]
   * @param {number} [options.replicasPerAdapter=2] replicas that make an adapter's home
   * @param {number} [options.maxInFlightPerReplica=8] calls in flight on a replica before an
   *   adapter's requests spill past its home
   * @param {number} [options.cooldownMs=5000] how long a replica that answered UNAVAILABLE
   *   is skipped
   * @param {boolean} [options.affinity=true] false: route every call like a base-model one
   * @param {() => number} [options.now] the clock, in ms
   */
  constructor(addresses = [], options = {}) {
    this.replicasPerAdapter = options.replicasPerAdapter ?? 2;
    this.maxInFlightPerReplica = options.maxInFlightPerReplica ?? 8;
    this.cooldownMs = options.cooldownMs ?? 5000;
    this.affinity = options.affinity ?? true;
    if (this.replicasPerAdapter < 1) throw new Error('replicasPerAdapter must be at least 1');
    if (this.maxInFlightPerReplica < 1) throw new Error('maxInFlightPerReplica must be at least 1');
    this.now = options.now || Date.now;
    this.addresses = [];
    this.inFlightCounts = new Map();
    this.downUntil = new Map();
    this.turn = 0;
    this.update(addresses);
  }

  /** Replace the replica set; returns { added, removed }. Counts and marks of replicas that
   *  stay are kept; a removed replica's calls are counted until released. */
  update(addresses) {
    const next = [...new Set(addresses)].sort();
    const added = next.filter((a) => !this.addresses.includes(a));
    const removed = this.addresses.filter((a) => !next.includes(a));
    this.addresses = next;
    for (const a of removed) {
      this.downUntil.delete(a);
      if (!this.inFlightCounts.get(a)) this.inFlightCounts.delete(a);
    }
    for (const a of added) if (!this.inFlightCounts.has(a)) this.inFlightCounts.set(a, 0);
    return { added, removed };
  }

  rank(adapterId) {
    return rankReplicas(adapterId, this.addresses);
  }

  /** The first `replicasPerAdapter` replicas of the adapter's rank that are not down. */
  home(adapterId) {
    return this.live(this.rank(adapterId)).slice(0, this.replicasPerAdapter);
  }

  inFlight(address) {
    return this.inFlightCounts.get(address) || 0;
  }

  isDown(address) {
    return this.now() < (this.downUntil.get(address) ?? -Infinity);
  }

  markDown(address) {
    if (!this.addresses.includes(address)) return;
    this.downUntil.set(address, this.now() + this.cooldownMs);
  }

  live(candidates) {
    return candidates.filter((a) => !this.isDown(a));
  }

  /** Where a call for `adapterId` ('' for none) goes now; counts nothing (see acquire). */
  pick(adapterId, { exclude = [] } = {}) {
    const excluded = new Set(exclude);
    const key = this.affinity ? adapterId || '' : '';
    let candidates = this.addresses.filter((a) => !excluded.has(a));
    if (candidates.length === 0) {
      throw new Error(this.addresses.length ? 'all replicas tried' : 'no replica to route to');
    }
    const live = this.live(candidates);
    if (live.length) candidates = live; // every replica down: try them all anyway
    const load = (a) => this.inFlight(a);
    const least = (list) => list.reduce((best, a) => (load(a) < load(best) ? a : best));
    if (!key) {
      const start = this.turn++ % candidates.length;
      return least([...candidates.slice(start), ...candidates.slice(0, start)]);
    }
    const ranked = rankReplicas(key, candidates);
    const home = ranked.slice(0, this.replicasPerAdapter);
    const best = least(home);
    if (load(best) < this.maxInFlightPerReplica) return best;
    const spill = ranked.slice(home.length).find((a) => load(a) < this.maxInFlightPerReplica);
    return spill ?? least(ranked);
  }

  /** pick, and count one more call in flight there; release() it when the call ends. */
  acquire(adapterId, options) {
    const address = this.pick(adapterId, options);
    this.inFlightCounts.set(address, this.inFlight(address) + 1);
    return address;
  }

  release(address) {
    const count = this.inFlight(address) - 1;
    if (count > 0 || this.addresses.includes(address)) {
      this.inFlightCounts.set(address, Math.max(count, 0));
    } else {
      this.inFlightCounts.delete(address);
    }
  }
}

/** { addresses, dns }: static addresses for 'host1:50051,host2:50051' or an array; a DNS
 *  name to resolve ({ host, port }) for 'dns:///name:port' or 'dns:name:port'. */
function parseTarget(target) {
  if (Array.isArray(target) || !target.startsWith('dns:')) {
    const list = Array.isArray(target) ? target : target.split(',');
    return { addresses: list.map((t) => t.trim()).filter(Boolean), dns: null };
  }
  let name = target.slice(4);
  if (name.startsWith('//')) {
    const slash = name.indexOf('/', 2);
    if (slash !== 2) throw new Error(`${target}: a DNS authority is not supported`);
    name = name.slice(3);
  }
  const m = /^(?:\[([^\]]+)\]|(.+)):(\d+)$/.exec(name);
  if (!m) throw new Error(`${name}: expected host:port`);
  return { addresses: [], dns: { host: m[1] || m[2], port: Number(m[3]) } };
}

function formatAddress(ip, port) {
  return net.isIPv6(ip) ? `[${ip}]:${port}` : `${ip}:${port}`;
}

/** Every address `host` resolves to (a headless Service: one per ready pod), as 'ip:port'. */
async function resolveDns(host, port) {
  const records = await dns.promises.lookup(host, { all: true });
  return [...new Set(records.map((r) => formatAddress(r.address, port)))].sort();
}

const RETRYABLE = new Set(['UNAVAILABLE', 'RESOURCE_EXHAUSTED']);
const ADAPTER_METHODS = new Set(['Generate', 'GenerateStream', 'Classify']);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** TuneserveClient's calls over many replicas, each sent where its Router says: Generate,
 *  GenerateStream and Classify by `adapter_id`, everything else to the least loaded replica.
 *  A call that fails with UNAVAILABLE or RESOURCE_EXHAUSTED is tried at once on the next
 *  replica; only when every replica has been tried does it back off (exponential, full
 *  jitter, at most `maxAttempts` tries in all). */
class RoutedClient {
  /**
   * @param {string|string[]} target 'host1:50051,host2:50051', an array, or a DNS name that
   *   resolves to every replica ('dns:///tuneserve-serve-headless.tuneserve.svc:50051')
   * @param {object} [options] TuneserveClient's options (ca, cert, key, tls, serverName,
   *   token, timeoutMs, protoPath), Router's (replicasPerAdapter, maxInFlightPerReplica,
   *   cooldownMs, affinity), and:
   * @param {number} [options.maxAttempts=5] tries per call over all replicas
   * @param {number} [options.resolveIntervalMs=30000] how often a DNS name is resolved again
   * @param {(host: string, port: number) => Promise<string[]>} [options.resolve] the resolver
   */
  constructor(target, options = {}) {
    const { addresses, dns: name } = parseTarget(target);
    this.router = new Router([], options);
    this.maxAttempts = options.maxAttempts ?? 5;
    this.timeoutMs = options.timeoutMs === undefined ? 30000 : options.timeoutMs;
    this.clientOptions = { ...options, maxAttempts: 1 }; // this client retries, on another replica
    if (name && (options.tls || options.ca || options.cert) && !options.serverName) {
      this.clientOptions.serverName = name.host; // check certificates against the DNS name
    }
    this.clients = new Map();
    this.retiring = new Map();
    this.dns = name;
    this.resolve = options.resolve || resolveDns;
    if (!name) {
      if (!addresses.length) throw new Error('no replica addresses');
      this.setAddresses(addresses);
      this.ready = Promise.resolve();
    } else {
      this.ready = this.refresh();
      const every = options.resolveIntervalMs ?? 30000;
      if (every > 0) this.timer = setInterval(() => this.refresh(), every).unref();
    }
  }

  /** Resolve a DNS target now; a failed or empty answer keeps the replicas there are. */
  async refresh() {
    if (!this.dns) return;
    try {
      const addresses = await this.resolve(this.dns.host, this.dns.port);
      if (addresses.length) this.setAddresses(addresses);
    } catch {
      // keep the replicas there are; the next refresh tries again
    }
  }

  setAddresses(addresses) {
    if (this.closed) return;
    const { added, removed } = this.router.update(addresses);
    for (const a of added) {
      this.clients.set(a, this.retiring.get(a) || new TuneserveClient(a, this.clientOptions));
      this.retiring.delete(a);
    }
    for (const a of removed) {
      const client = this.clients.get(a);
      this.clients.delete(a);
      if (this.router.inFlight(a)) this.retiring.set(a, client);
      else client.close();
    }
  }

  close() {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    for (const client of [...this.clients.values(), ...this.retiring.values()]) client.close();
    this.clients.clear();
    this.retiring.clear();
  }

  /** Call a unary method on the replica the router picks (see TuneserveClient.unary). */
  async unary(method, request, { timeoutMs } = {}) {
    const key = ADAPTER_METHODS.has(method) ? request.adapter_id || '' : '';
    const ms = timeoutMs === undefined ? this.timeoutMs : timeoutMs;
    const attempts = this.attempts(key, ms == null ? null : Date.now() + ms);
    for (let next = await attempts.next(); !next.done; next = await attempts.next()) {
      const { address, client, options, failed } = next.value;
      try {
        return await client.unary(method, request, options);
      } catch (error) {
        failed(error);
      } finally {
        this.releaseAddress(address);
      }
    }
    throw new Error('unreachable');
  }

  /** As TuneserveClient.generateStream; tried on another replica only before the first
   *  message. The call counts as in flight on its replica until the stream ends. */
  async *generateStream(request, { timeoutMs = null } = {}) {
    const deadline = timeoutMs == null ? null : Date.now() + timeoutMs;
    const attempts = this.attempts(request.adapter_id || '', deadline);
    for (let next = await attempts.next(); !next.done; next = await attempts.next()) {
      const { address, client, options, failed } = next.value;
      const stream = client.generateStream(request, options);
      try {
        let head;
        try {
          head = await stream.next();
        } catch (error) {
          failed(error);
          continue;
        }
        if (head.done) return;
        yield head.value;
        for (let chunk = await stream.next(); !chunk.done; chunk = await stream.next()) {
          yield chunk.value;
        }
        return;
      } finally {
        await stream.return();
        this.releaseAddress(address);
      }
    }
  }

  /** The attempts of one call: yields { address, client, options, failed } with the call
   *  counted in flight at `address`; the caller calls failed(error) when the attempt failed
   *  (it rethrows what is not worth another try) and releases the address. Throws the last
   *  failure once the attempts are spent. `deadline`: ms since the epoch, or null. */
  async *attempts(key, deadline) {
    await this.ready;
    const tried = new Set();
    const failures = [];
    let rounds = 0;
    const failed = (error) => {
      if (!(error instanceof TuneserveError) || !RETRYABLE.has(error.code)) throw error;
      failures.push(error);
    };
    for (;;) {
      if (failures.length) {
        const last = failures[failures.length - 1];
        if (failures.length >= this.maxAttempts) throw last;
        if (this.router.addresses.every((a) => tried.has(a))) {
          rounds += 1;
          const bound = Math.min(10000, 200 * 2 ** (rounds - 1));
          const wait = Math.max(Math.random() * bound, last.retryAfterMs || 0);
          if (deadline != null && Date.now() + wait >= deadline) throw last;
          await sleep(wait);
          tried.clear();
        }
      }
      let address;
      try {
        address = this.router.acquire(key, { exclude: tried });
      } catch (error) {
        if (failures.length) throw failures[failures.length - 1];
        throw error;
      }
      tried.add(address);
      const client = this.clients.get(address);
      if (!client) {
        this.releaseAddress(address); // removed by a refresh since the pick
        continue;
      }
      const timeoutMs = deadline == null ? null : Math.max(0, deadline - Date.now());
      const before = failures.length;
      yield { address, client, options: { timeoutMs }, failed };
      if (failures.length === before) return;
      if (failures[failures.length - 1].code === 'UNAVAILABLE') this.router.markDown(address);
    }
  }

  releaseAddress(address) {
    this.router.release(address);
    const retired = this.retiring.get(address);
    if (retired && this.router.inFlight(address) === 0) {
      this.retiring.delete(address);
      retired.close();
    }
  }
}

// The calls built on `unary` are the same for one replica or many (trainJob's request_id,
// made once, goes with every replica's attempt): RoutedClient takes them from
// TuneserveClient, its `unary` routing each.
for (const name of ['trainJob', 'getStatus', 'cancelJob', 'listAdapters', 'generate', 'waitForJob']) {
  RoutedClient.prototype[name] = TuneserveClient.prototype[name];
}

module.exports = {
  TuneserveClient,
  TuneserveError,
  RoutedClient,
  Router,
  decodeStatusDetails,
  loadApi,
  parseTarget,
  rankReplicas,
  rendezvousScore,
  resolveDns,
  FINAL_STATES,
};
