//! Who is calling: principals, tokens and development mode.
//!
//! Tokens are configured as SHA-256 hashes (never in plaintext) and compared in constant time.
//! Development mode — no tokens configured and every listener on loopback — trusts the
//! `x-tenant-id` header instead, and a request without it acts as the admin.

use std::net::SocketAddr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Error;
use crate::control::validate_tenant;
use crate::proto::Event;

/// Who a request is from, as authenticated once where its body is admitted, for its handler
/// to take rather than authenticate it again.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Result<Caller, Error>);

/// The header (gRPC metadata key) that names a tenant.
pub const TENANT_HEADER: &str = "x-tenant-id";

/// The tenant an admin acts for when it names none on a tenant-scoped request.
pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Tenant(String),
}

/// The principal of one request, and the tenant it acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    /// For an admin: the tenant named in `x-tenant-id`, if any.
    named_tenant: Option<String>,
}

impl Caller {
    pub fn admin() -> Caller {
        Caller {
            principal: Principal::Admin,
            named_tenant: None,
        }
    }

    pub fn tenant_principal(tenant: &str) -> Caller {
        Caller {
            principal: Principal::Tenant(tenant.to_string()),
            named_tenant: None,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.principal == Principal::Admin
    }

    /// The tenant a tenant-scoped request acts on: the caller's own, or for an admin the named
    /// one (`default` if none is named).
    pub fn tenant(&self) -> &str {
        match &self.principal {
            Principal::Tenant(tenant) => tenant,
            Principal::Admin => self.named_tenant.as_deref().unwrap_or(DEFAULT_TENANT),
        }
    }

    /// The tenant a listing or a watch is limited to; `None` for an admin who named none.
    pub fn scope(&self) -> Option<&str> {
        match &self.principal {
            Principal::Tenant(tenant) => Some(tenant),
            Principal::Admin => self.named_tenant.as_deref(),
        }
    }

    /// The `actor` recorded in events.
    pub fn actor(&self) -> String {
        match &self.principal {
            Principal::Admin => "admin".to_string(),
            Principal::Tenant(tenant) => format!("tenant:{tenant}"),
        }
    }

    pub fn require_admin(&self, what: &str) -> Result<(), Error> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Error::forbidden(format!("only the admin may {what}")))
        }
    }

    /// Whether this caller may see `event`: its own tenant's events; node-level events and
    /// everything else only for the admin (within the named tenant, if any).
    pub fn sees(&self, event: &Event) -> bool {
        match self.scope() {
            Some(tenant) => event.tenant == tenant,
            None => true,
        }
    }
}

/// The one value of a credential header: sent twice, it is refused rather than either copy
/// believed, as a proxy that appends a header could otherwise override the client's.
pub fn single_value<T>(name: &str, mut values: impl Iterator<Item = T>) -> Result<Option<T>, Error> {
    let first = values.next();
    if values.next().is_some() {
        return Err(Error::invalid(format!("{name}: sent more than once")));
    }
    Ok(first)
}

/// The one value of credential header `name` as text: absent is `None`, present but not
/// visible ASCII is an error (never mistaken for an absent header, which in development mode
/// would mean the admin), and so is a header sent twice.
pub fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Result<Option<&'a str>, Error> {
    match single_value(name, headers.get_all(name).iter())? {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(Some)
            .map_err(|_| Error::invalid(format!("{name}: not printable ASCII"))),
    }
}

/// How callers are recognised.
#[derive(Debug)]
pub struct Authenticator {
    development: bool,
    /// Whether every connection comes with a verified client certificate (`client_ca`).
    client_certificates: bool,
    /// (SHA-256 of a token, its principal).
    tokens: Vec<([u8; 32], Principal)>,
}

/// A configured token hash that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: '{value}' is not a SHA-256 in hex (64 hex digits); `solo token new` prints one")]
pub struct BadTokenHash {
    pub key: String,
    pub value: String,
}

impl Authenticator {
    /// `tokens` are (config key, hex hash, principal). Development mode needs no tokens and
    /// only loopback listeners; without tokens on another address the node must not start.
    pub fn new(tokens: Vec<(String, String, Principal)>, listeners: &[SocketAddr]) -> Result<Authenticator, String> {
        let mut parsed = Vec::with_capacity(tokens.len());
        for (key, hash, principal) in tokens {
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(hash.trim(), &mut bytes).map_err(|_| {
                BadTokenHash {
                    key: key.clone(),
                    value: hash.clone(),
                }
                .to_string()
            })?;
            if parsed.iter().any(|(other, _)| *other == bytes) {
                return Err(format!("{key}: this token hash is given to two principals"));
            }
            parsed.push((bytes, principal));
        }
        let loopback = listeners.iter().all(|addr| addr.ip().is_loopback());
        if parsed.is_empty() && !loopback {
            let exposed: Vec<String> = listeners
                .iter()
                .filter(|a| !a.ip().is_loopback())
                .map(ToString::to_string)
                .collect();
            return Err(format!(
                "no tokens are configured, but the node would listen on {}: anyone could act as the admin. \
                 Create a token with `solo token new` and put the line it prints under [security] \
                 (admin_token_sha256) or [tenants.<name>] (token_sha256), or listen on 127.0.0.1 only",
                exposed.join(", ")
            ));
        }
        Ok(Authenticator {
            development: parsed.is_empty(),
            client_certificates: false,
            tokens: parsed,
        })
    }

    /// Every connection presents a verified client certificate: one whose subject names no
    /// tenant is refused, never taken for a request without credentials (which in
    /// development mode acts as the admin).
    pub fn requiring_client_certificates(self, required: bool) -> Authenticator {
        Authenticator {
            client_certificates: required,
            ..self
        }
    }

    /// An authenticator for development mode.
    pub fn development() -> Authenticator {
        Authenticator {
            development: true,
            client_certificates: false,
            tokens: Vec::new(),
        }
    }

    pub fn is_development(&self) -> bool {
        self.development
    }

    /// Whether some token names `tenant` as its principal.
    pub fn has_token_for(&self, tenant: &str) -> bool {
        self.tokens
            .iter()
            .any(|(_, principal)| matches!(principal, Principal::Tenant(t) if t == tenant))
    }

    /// Recognises a request from its headers (`authorization`, `x-tenant-id`) and the tenant
    /// named by a verified client certificate, if any.
    pub fn authenticate_headers(
        &self,
        headers: &http::HeaderMap,
        certificate_tenant: Option<&str>,
    ) -> Result<Caller, Error> {
        self.authenticate(
            header(headers, "authorization")?,
            header(headers, TENANT_HEADER)?,
            certificate_tenant,
        )
    }

    /// Recognises a request from its `authorization` and `x-tenant-id` values, and the tenant
    /// named by a verified client certificate, if any.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        tenant_header: Option<&str>,
        certificate_tenant: Option<&str>,
    ) -> Result<Caller, Error> {
        // Present but empty is a mistake, not the admin: it is refused as an invalid name.
        let named = tenant_header.map(str::trim);
        if let Some(tenant) = named {
            validate_tenant(tenant).map_err(|e| Error::invalid(format!("{TENANT_HEADER}: {e}")))?;
        }
        let principal = match authorization {
            Some(value) => self.principal_for(value)?,
            None => match certificate_tenant {
                Some(tenant) => Principal::Tenant(tenant.to_string()),
                None if self.client_certificates => {
                    return Err(Error::unauthenticated(
                        "the client certificate names no tenant: its subject CN must be a tenant name \
                         (1 to 63 characters of a-z, 0-9, '_' and '-'), or send `authorization: Bearer <token>`",
                    ));
                }
                None if self.development => {
                    return Ok(match named {
                        Some(tenant) => Caller::tenant_principal(tenant),
                        None => Caller::admin(),
                    });
                }
                None => {
                    return Err(Error::unauthenticated(
                        "no credentials: send `authorization: Bearer <token>` (or a client certificate)",
                    ));
                }
            },
        };
        match principal {
            Principal::Admin => Ok(Caller {
                principal: Principal::Admin,
                named_tenant: named.map(str::to_string),
            }),
            Principal::Tenant(own) => match named {
                Some(other) if other != own => Err(Error::forbidden(format!(
                    "tenant '{own}' cannot act for tenant '{other}'"
                ))),
                _ => Ok(Caller::tenant_principal(&own)),
            },
        }
    }

    fn principal_for(&self, authorization: &str) -> Result<Principal, Error> {
        // The scheme's name is case-insensitive (RFC 9110).
        let token = authorization
            .split_at_checked(7)
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer "))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::unauthenticated("malformed authorization: expected `Bearer <token>`"))?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every entry is compared, whether or not an earlier one matched.
        let mut found = None;
        for (candidate, principal) in &self.tokens {
            if bool::from(candidate.ct_eq(&hash)) {
                found = Some(principal.clone());
            }
        }
        found.ok_or_else(|| Error::unauthenticated("invalid token"))
    }
}

/// A fresh random token and the SHA-256 (hex) that goes in the configuration.
pub fn new_token() -> Result<(String, String), getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let token = format!("solo_{}", hex::encode(bytes));
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    Ok((token, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> Vec<SocketAddr> {
        vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()]
    }

    #[test]
    fn development_mode_only_on_loopback() {
        let dev = Authenticator::new(Vec::new(), &loopback()).unwrap();
        assert!(dev.is_development());
        assert_eq!(dev.authenticate(None, Some("acme"), None).unwrap().tenant(), "acme");
        assert!(dev.authenticate(None, None, None).unwrap().is_admin());
        assert_eq!(
            dev.authenticate(None, Some("Bad Name"), None).unwrap_err().kind,
            super::super::ErrorKind::InvalidArgument
        );
        let exposed = Authenticator::new(Vec::new(), &["0.0.0.0:8080".parse().unwrap()]).unwrap_err();
        assert!(
            exposed.contains("solo token new") && exposed.contains("0.0.0.0:8080"),
            "{exposed}"
        );
    }

    /// Under client certificates, a certificate whose subject names no tenant (its CN not a
    /// tenant name) is refused: never the admin, nor the tenant a header names.
    #[test]
    fn a_client_certificate_that_names_no_tenant_is_refused() {
        let mtls = Authenticator::new(Vec::new(), &loopback())
            .unwrap()
            .requiring_client_certificates(true);
        assert_eq!(mtls.authenticate(None, None, Some("acme")).unwrap().tenant(), "acme");
        for named in [None, Some("acme")] {
            let refused = mtls.authenticate(None, named, None).unwrap_err();
            assert_eq!(refused.kind, super::super::ErrorKind::Unauthenticated);
            assert!(refused.message().contains("names no tenant"), "{refused:?}");
        }
    }

    #[test]
    fn tokens_name_their_principal() {
        let (admin_token, admin_hash) = new_token().unwrap();
        let (acme_token, acme_hash) = new_token().unwrap();
        let auth = Authenticator::new(
            vec![
                ("security.admin_token_sha256".into(), admin_hash, Principal::Admin),
                (
                    "tenants.acme.token_sha256".into(),
                    acme_hash,
                    Principal::Tenant("acme".into()),
                ),
            ],
            &["0.0.0.0:1".parse().unwrap()],
        )
        .unwrap();
        assert!(!auth.is_development());
        let acme = auth
            .authenticate(Some(&format!("Bearer {acme_token}")), None, None)
            .unwrap();
        assert_eq!((acme.tenant(), acme.actor().as_str()), ("acme", "tenant:acme"));
        let admin = auth
            .authenticate(Some(&format!("Bearer {admin_token}")), Some("beta"), None)
            .unwrap();
        assert!(admin.is_admin() && admin.tenant() == "beta");
        let err = auth
            .authenticate(Some(&format!("Bearer {acme_token}")), Some("beta"), None)
            .unwrap_err();
        assert_eq!(err.kind, super::super::ErrorKind::PermissionDenied);
        for bad in [None, Some("Bearer nope"), Some("Basic abc"), Some("Bearer ")] {
            let err = auth.authenticate(bad, Some("acme"), None).unwrap_err();
            assert_eq!(err.kind, super::super::ErrorKind::Unauthenticated, "{bad:?}");
        }
        let by_certificate = auth.authenticate(None, None, Some("acme")).unwrap();
        assert_eq!(by_certificate.tenant(), "acme");
        let bad_hash = Authenticator::new(vec![("k".into(), "xyz".into(), Principal::Admin)], &loopback()).unwrap_err();
        assert!(bad_hash.contains("not a SHA-256"), "{bad_hash}");
    }
}
