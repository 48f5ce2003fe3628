'use strict';
// A small tuneserve client for Node.js: loads the API from the .proto file at run time
// (@grpc/proto-loader), connects in plaintext or over TLS (mutual TLS with a client
// certificate) with an optional bearer token, and offers promise-returning calls with
// deadlines. Transient failures (UNAVAILABLE, RESOURCE_EXHAUSTED) are retried by grpc-js
// itself, from a service config: a stream only until its first message arrives. A failed
// call rejects with a TuneserveError carrying the server's rich details (AIP-193), decoded
// from the grpc-status-details-bin trailer.

const crypto = require('node:crypto');
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

module.exports = { TuneserveClient, TuneserveError, decodeStatusDetails, loadApi, FINAL_STATES };
