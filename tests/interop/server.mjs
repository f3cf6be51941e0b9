// Interop OpenID provider for the gateway's test suite, built on the
// OpenID-certified `oidc-provider` package (9.x). Test use only: in-memory
// storage, development login/consent pages, fresh keys on every start.
//
// Usage: node tests/interop/server.mjs '<json config>'   (or a path to a JSON file)
//
// Config keys (all optional but `clients`):
//   host               loopback address to bind (default 127.0.0.1; anything else is refused)
//   port               TCP port, 0 = any free port (default 0)
//   clients            oidc-provider client metadata (client_id, client_secret, redirect_uris,
//                      token_endpoint_auth_method, post_logout_redirect_uris,
//                      backchannel_logout_uri, ...). grant_types defaults to
//                      authorization_code + refresh_token, and backchannel_logout_session_required
//                      to true when a backchannel_logout_uri is given.
//   access_token_ttl, id_token_ttl, refresh_token_ttl, session_ttl, grant_ttl   seconds
//   access_token_format   "opaque" (default) or "jwt"
//   access_token_audience resource indicator / `aud` of JWT access tokens
//                         (default "urn:gateway:interop:api"; only used for "jwt")
//   offline_access_implies_consent_prompt  false (default) keeps OpenID Connect Core
//                      behaviour: offline_access is silently dropped (no refresh token)
//                      unless the authorization request has prompt=consent. true adds
//                      prompt=consent to GET /auth requests that ask for offline_access
//                      and carry no prompt, like IdPs that issue refresh tokens anyway.
//   par                "enabled" (default, as oidc-provider ships: a pushed authorization
//                      request endpoint), "required" (require_pushed_authorization_requests:
//                      plain authorization requests are refused) or "off" (no PAR endpoint).
//                      Clients may register for private_key_jwt with an inline `jwks`.
//
// When listening it prints exactly one line on stdout:
//   {"issuer": "http://127.0.0.1:PORT", "port": PORT}
// Diagnostics go to stderr and never contain secrets or tokens.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { isIP } from 'node:net';
import * as querystring from 'node:querystring';

import Provider, { errors } from 'oidc-provider';

function fail(message) {
  process.stderr.write(`interop-idp: ${message}\n`);
  process.exit(2);
}

// ---- configuration -------------------------------------------------------
const arg = process.argv[2];
if (!arg) fail('usage: server.mjs <json config | path to json file>');
let cfg;
try {
  cfg = JSON.parse(arg.trimStart().startsWith('{') ? arg : readFileSync(arg, 'utf8'));
} catch (err) {
  fail(`cannot read config: ${err.message}`);
}

const isLoopback = (host) => host === 'localhost' || host === '::1'
  || (isIP(host) === 4 && host.startsWith('127.'));

const host = cfg.host ?? '127.0.0.1';
if (!isLoopback(host)) fail(`refusing to listen on non-loopback host ${JSON.stringify(host)}`);
const port = Number(cfg.port ?? 0);
const ttl = (key, fallback) => Number(cfg[key] ?? fallback);
const jwtAccessTokens = (cfg.access_token_format ?? 'opaque') === 'jwt';
if (!['opaque', 'jwt'].includes(cfg.access_token_format ?? 'opaque')) {
  fail('access_token_format must be "opaque" or "jwt"');
}
const audience = cfg.access_token_audience ?? 'urn:gateway:interop:api';
const parMode = cfg.par ?? 'enabled';
if (!['off', 'enabled', 'required'].includes(parMode)) {
  fail('par must be "off", "enabled" or "required"');
}

const clients = (cfg.clients ?? []).map((client) => ({
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  ...(client.backchannel_logout_uri ? { backchannel_logout_session_required: true } : {}),
  ...client,
}));

// Fresh RS256 signing key for this process.
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingJwk = { ...privateKey.export({ format: 'jwk' }), kid: randomBytes(8).toString('hex'), alg: 'RS256', use: 'sig' };

// ---- accounts: any login works, the login becomes the subject -------------
function account(login) {
  return {
    accountId: login,
    async claims() {
      return {
        sub: login,
        email: `${login}@example.com`,
        email_verified: true,
        name: login.charAt(0).toUpperCase() + login.slice(1),
        preferred_username: login,
        groups: login === 'alice' ? ['staff', 'admins'] : ['staff'],
      };
    },
  };
}

// ---- logout confirmation page ----------------------------------------------
// oidc-provider hands us a <form> holding the xsrf token. We add logout=yes
// (end the whole OP session) and a plain submit button; browsers auto-submit
// via the inline script, HTTP clients just POST the form fields.
async function logoutSource(ctx, form) {
  const withLogout = form.replace('</form>', '<input type="hidden" name="logout" value="yes"/><button type="submit">Sign out</button></form>');
  ctx.type = 'html';
  ctx.body = `<!DOCTYPE html><html><head><meta charset="utf-8"><title>Sign out</title></head>
<body>${withLogout}<script>document.forms[0].submit()</script></body></html>`;
}

// ---- outgoing requests (back-channel logout) ------------------------------
// oidc-provider's fetch refuses special-use addresses (loopback included) to
// prevent SSRF. Here every RP lives on loopback, so drop that guard but only
// ever talk to loopback hosts.
async function loopbackFetch(url, { dispatcher, ...options }) {
  const target = new URL(url);
  if (!isLoopback(target.hostname.replace(/^\[|\]$/g, ''))) {
    throw new Error('interop IdP only sends requests to loopback hosts');
  }
  return globalThis.fetch(url, options);
}

// ---- JWT access tokens via a default resource indicator -------------------
const resourceIndicators = {
  enabled: true,
  // Every authorization request implicitly asks for our single resource server...
  defaultResource: async (ctx, client, oneOf) => oneOf ?? (jwtAccessTokens ? audience : undefined),
  // ...and the token endpoint uses it without an explicit `resource` parameter.
  useGrantedResource: async () => jwtAccessTokens,
  getResourceServerInfo: async (ctx, resource) => {
    if (!jwtAccessTokens || resource !== audience) throw new errors.InvalidTarget();
    return {
      audience,
      scope: 'openid email profile groups',
      accessTokenFormat: 'jwt',
      accessTokenTTL: ttl('access_token_ttl', 300),
      jwt: { sign: { alg: 'RS256' } },
    };
  },
};

// ---- bind first, so the issuer is the exact URL we listen on ----------------
const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, host, resolve);
}).catch((err) => fail(`cannot listen on ${host}:${port}: ${err.message}`));
const boundPort = server.address().port;
const issuer = `http://${host.includes(':') ? `[${host}]` : host}:${boundPort}`;

const provider = new Provider(issuer, {
  clients,
  jwks: { keys: [signingJwk] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  findAccount: async (ctx, sub) => account(sub),
  responseTypes: ['code'], // authorization code flow only
  scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  // Scope-requested claims go straight into the ID token, not only userinfo.
  conformIdTokenClaims: false,
  pkce: { required: () => true }, // oidc-provider 9 only implements S256
  features: {
    devInteractions: { enabled: true }, // built-in login (any login/password) + consent pages
    revocation: { enabled: true },
    introspection: { enabled: true },
    backchannelLogout: { enabled: true },
    rpInitiatedLogout: { enabled: true, logoutSource },
    resourceIndicators,
    pushedAuthorizationRequests: {
      enabled: parMode !== 'off',
      requirePushedAuthorizationRequests: parMode === 'required',
    },
  },
  // Refresh tokens for code grants that asked for offline_access; rotate on every use.
  issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed('refresh_token')
    && code.scopes.has('offline_access'),
  rotateRefreshToken: true,
  ttl: {
    AccessToken: ttl('access_token_ttl', 300),
    IdToken: ttl('id_token_ttl', 300),
    RefreshToken: ttl('refresh_token_ttl', 86400),
    Session: ttl('session_ttl', 86400),
    Grant: ttl('grant_ttl', 86400),
    Interaction: 600,
  },
  fetch: loopbackFetch,
  renderError: async (ctx, out) => {
    ctx.type = 'json';
    ctx.body = out;
  },
});

// Log failures (error names and descriptions only, no token material) to stderr.
for (const event of ['server_error', 'backchannel.error', 'grant.error']) {
  provider.on(event, (ctx, err, client) => {
    const detail = [err?.name, err?.error, err?.error_description ?? err?.message, err?.cause?.code]
      .filter(Boolean).join(' ');
    const who = client?.clientId ? ` (client ${client.clientId})` : '';
    process.stderr.write(`interop-idp: ${event}${who}: ${detail}\n`);
  });
}

// The built-in pages @import a web font from the internet; this sandboxed test IdP must
// make browsers fetch nothing off-box. No script-src directive on purpose: inline
// scripts (form_post, logout auto-submit) fall back to default-src and keep working.
provider.use(async (ctx, next) => {
  ctx.set('content-security-policy', "default-src 'self' 'unsafe-inline'");
  await next();
});

if (cfg.offline_access_implies_consent_prompt) {
  provider.use(async (ctx, next) => {
    if (ctx.method === 'GET' && ctx.path === '/auth' && ctx.query.prompt === undefined
      && String(ctx.query.scope ?? '').split(' ').includes('offline_access')) {
      ctx.query = { ...ctx.query, prompt: 'consent' };
    } else if (ctx.method === 'POST' && ctx.path === '/request' && ctx.is('application/x-www-form-urlencoded')) {
      // The same for a pushed authorization request: its parameters are in the form body.
      // oidc-provider reads an already parsed body from ctx.request.body.
      const chunks = [];
      let size = 0;
      for await (const chunk of ctx.req) {
        size += chunk.length;
        if (size > 56 * 1024) ctx.throw(413);
        chunks.push(chunk);
      }
      const body = querystring.parse(Buffer.concat(chunks).toString('utf8'));
      if (body.prompt === undefined && String(body.scope ?? '').split(' ').includes('offline_access')) {
        body.prompt = 'consent';
      }
      ctx.request.body = body;
    }
    await next();
  });
}

server.on('request', provider.callback());
process.stdout.write(`${JSON.stringify({ issuer, port: boundPort })}\n`);

// ---- clean shutdown ---------------------------------------------------------
function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
