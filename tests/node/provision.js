// Provisions one device with the stock Azure IoT Node.js clients over HTTPS, unmodified:
// azure-iot-provisioning-device with its HTTP transport, and the TPM, symmetric-key or
// X.509 security client. Reads one JSON request on stdin:
//   {"kind": "tpm" | "symmetricKey" | "x509", "host", "port", "idScope", "ca": PEM,
//    "registrationId"?, "key"?, "cert"?, "privateKey"?, "hubResource"?, "readout"?}
// and prints one JSON line: {"ok": true, "registrationId", "result"} or {"ok": false,
// "error", "name"}. With `hubResource` (TPM), also `hubSignature`: the TPM's HMAC of
// "{hubResource}\n{expiry}" with the key it was given, and that `expiry`. With `readout`
// (TPM), nothing is registered: {"ok": true, "registrationId", "endorsementKey"}.
'use strict';

const https = require('https');
const HttpBase = require('azure-iot-http-base').Http;
const ProvisioningHttp = require('azure-iot-provisioning-device-http').Http;
const ProvisioningDeviceClient = require('azure-iot-provisioning-device').ProvisioningDeviceClient;

// The answer, then exit: the TPM client keeps its TPM connection open.
function print(value) {
  process.stdout.write(JSON.stringify(value) + '\n');
  process.exit(0);
}

function fail(err) {
  print({ ok: false, name: err && err.name, error: String(err && (err.message || err)),
    status: err && err.response && err.response.statusCode,
    body: err && err.responseBody });
}

function security(request) {
  switch (request.kind) {
    case 'tpm': {
      // No TPM device on this machine: tss.js falls back to its user-mode TPM on
      // 127.0.0.1:2323 (a swtpm the test runs there).
      const { TpmSecurityClient } = require('azure-iot-security-tpm');
      return new TpmSecurityClient(request.registrationId);
    }
    case 'symmetricKey': {
      const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
      return new SymmetricKeySecurityClient(request.registrationId, request.key);
    }
    case 'x509': {
      const { X509Security } = require('azure-iot-security-x509');
      return new X509Security(request.registrationId, { cert: request.cert, key: request.privateKey });
    }
    default:
      throw new Error('unknown kind ' + request.kind);
  }
}

// The factory read-out as the stock client makes it: its EK (created and persisted at
// 0x81010001 on first use) and the registration id it derives from it.
function readout(request) {
  const client = security(request);
  client.getEndorsementKey((err, ek) => {
    if (err) return fail(err);
    client.getRegistrationId((err, id) => {
      if (err) return fail(err);
      print({ ok: true, registrationId: id, endorsementKey: ek.toString('base64') });
    });
  });
}

function main(request) {
  if (request.readout) return readout(request);
  // The server's CA and port, as an application sets them: http-base's own options.
  // (An Agent's port is its `defaultPort` property, not a constructor option.)
  const agent = new https.Agent({ ca: request.ca, keepAlive: true });
  agent.defaultPort = request.port;
  const base = new HttpBase();
  base.setOptions({ ca: request.ca, http: { agent } });
  const transport = new ProvisioningHttp(base);
  const client = security(request);
  const device = ProvisioningDeviceClient.create(request.host, request.idScope, transport, client);
  const registered = (err, result) => {
    if (err) return fail(err);
    const done = (registrationId) => {
      const answer = { ok: true, registrationId, result };
      if (!request.hubResource) return print(answer);
      const expiry = Math.ceil(Date.now() / 1000) + 600;
      client.signWithIdentity(Buffer.from(request.hubResource + '\n' + expiry), (err, signature) => {
        if (err) return fail(err);
        answer.hubSignature = signature.toString('base64');
        answer.expiry = expiry;
        print(answer);
      });
    };
    if (request.kind === 'tpm') client.getRegistrationId((err, id) => err ? fail(err) : done(id));
    else done(request.registrationId);
  };
  device.register(registered);
}

let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  try {
    main(JSON.parse(input));
  } catch (err) {
    fail(err);
  }
});
process.on('uncaughtException', fail);
