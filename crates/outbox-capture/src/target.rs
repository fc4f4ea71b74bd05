//! The replication connection's settings, from the same URL the store connects with.

use percent_encoding::percent_decode_str;
use pgwire_replication::{ReplicationConfig, TlsConfig};
use url::Url;

use crate::CaptureError;

/// The server, user and database a `postgres://` URL names, as a replication connection needs
/// them (slot and publication are set per session).
pub(crate) fn from_url(url: &str) -> Result<ReplicationConfig, CaptureError> {
    let bad = |why: String| CaptureError::Url(why);
    let u = Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if !matches!(u.scheme(), "postgres" | "postgresql") {
        return Err(bad(format!(
            "log-based capture needs a postgres:// URL, not {}://",
            u.scheme()
        )));
    }
    let query: Vec<(String, String)> = u.query_pairs().into_owned().collect();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    let host = param("host")
        .or_else(|| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "localhost".into());
    let user = Some(decode(u.username()))
        .filter(|s| !s.is_empty())
        .or_else(|| param("user"))
        .unwrap_or_else(|| "postgres".into());
    let password = u
        .password()
        .map(decode)
        .or_else(|| param("password"))
        .unwrap_or_default();
    let database = Some(decode(u.path().trim_start_matches('/')))
        .filter(|s| !s.is_empty())
        .or_else(|| param("dbname"))
        .unwrap_or_else(|| user.clone());
    let port = u
        .port()
        .or_else(|| param("port").and_then(|p| p.parse().ok()))
        .unwrap_or(5432);
    let root = param("sslrootcert").map(Into::into);
    let tls = match param("sslmode").as_deref() {
        None | Some("disable" | "allow" | "prefer") => TlsConfig::disabled(),
        Some("require") => TlsConfig::require(),
        Some("verify-ca") => TlsConfig::verify_ca(root),
        Some("verify-full") => TlsConfig::verify_full(root),
        Some(other) => return Err(bad(format!("unknown sslmode {other}"))),
    };
    Ok(
        ReplicationConfig::new(host, user, password, database, "", "")
            .with_port(port)
            .with_tls(tls),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_server_user_password_and_database() {
        let c = from_url("postgres://app:p%40ss@db.internal:6543/shop?sslmode=require").unwrap();
        assert_eq!(
            (
                c.host.as_str(),
                c.port,
                c.user.as_str(),
                c.password.as_str()
            ),
            ("db.internal", 6543, "app", "p@ss")
        );
        assert_eq!(c.database, "shop");
        assert!(c.tls.mode.requires_tls());
    }

    #[test]
    fn defaults_follow_libpq() {
        let c = from_url("postgresql://localhost").unwrap();
        assert_eq!(
            (c.port, c.user.as_str(), c.database.as_str()),
            (5432, "postgres", "postgres")
        );
        assert!(!c.tls.mode.requires_tls());
    }

    #[test]
    fn other_schemes_and_sslmodes_are_refused() {
        let e = from_url("mysql://root@localhost/test").unwrap_err();
        assert!(e.to_string().contains("postgres://"), "{e}");
        assert!(from_url("postgres://localhost/x?sslmode=sometimes").is_err());
    }
}
