-- Realm's control plane, version 1 (SQLite). Times are unix seconds.

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    -- 'config': written from realm.toml at each start and reload (the file
    -- wins); 'api': made through the admin API, owned by the database.
    source TEXT NOT NULL CHECK (source IN ('config', 'api')),
    weight BIGINT NOT NULL DEFAULT 1,
    default_adapter TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- What a tenant may use: models and adapters by name; pipelines (name and
-- file) and its component (file or sources) as realm.toml names them.
CREATE TABLE grants (
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('model', 'adapter', 'pipeline', 'component')),
    name TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (tenant_id, kind, name)
);

CREATE TABLE limits (
    tenant_id TEXT PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    requests_per_minute BIGINT,
    tokens_per_minute BIGINT,
    concurrent_streams BIGINT,
    tokens_per_day BIGINT,
    -- The sandbox limits of its guest calls, as realm.toml's `limits` (JSON).
    sandbox TEXT NOT NULL DEFAULT '{}'
);

-- Argon2id hashes only; the key itself is shown once and never stored.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL CHECK (source IN ('config', 'api')),
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    expires_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE admin_principals (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('admin', 'viewer')),
    created_at BIGINT NOT NULL,
    disabled_at BIGINT
);

CREATE TABLE admin_keys (
    id TEXT PRIMARY KEY,
    principal_id TEXT NOT NULL REFERENCES admin_principals (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    expires_at BIGINT,
    revoked_at BIGINT
);

-- The usage ledger: one row per tenant, model, adapter and minute. Rows are
-- never deleted and their counters only grow (the triggers below), so a
-- bill computed from it cannot shrink. No foreign key: usage outlives a
-- deleted tenant.
CREATE TABLE usage (
    tenant_id TEXT NOT NULL,
    model TEXT NOT NULL,
    adapter TEXT NOT NULL DEFAULT '',
    minute BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    requests BIGINT NOT NULL DEFAULT 0,
    errors BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, model, adapter, minute)
);
CREATE INDEX usage_minute ON usage (minute);

CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}',
    peer TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_log_at ON audit_log (at);

-- Bumped by every change to tenants, grants, limits or keys; hosts sharing
-- the database poll it and reload when it moves.
CREATE TABLE revision (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO revision (id, value) VALUES (1, 0);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER usage_no_delete BEFORE DELETE ON usage
BEGIN SELECT RAISE(ABORT, 'the usage ledger is append-only'); END;
CREATE TRIGGER usage_only_grows BEFORE UPDATE ON usage
WHEN NEW.prompt_tokens < OLD.prompt_tokens OR NEW.completion_tokens < OLD.completion_tokens
  OR NEW.requests < OLD.requests OR NEW.errors < OLD.errors
  OR NEW.tenant_id <> OLD.tenant_id OR NEW.model <> OLD.model
  OR NEW.adapter <> OLD.adapter OR NEW.minute <> OLD.minute
BEGIN SELECT RAISE(ABORT, 'usage ledger counters only grow'); END;
