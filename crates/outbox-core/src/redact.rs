//! Credentials out of what is printed, logged or stored.
//!
//! Connection strings travel into error messages: a client library that cannot connect names
//! the URL it tried, a webhook error names the URL it posted to, and those messages end up on
//! a terminal, in a log collector or in the `last_error` column that anyone with read access to
//! the outbox can list. [`redact`] is the one function every part of the project passes such
//! text through. It works on free text, not on a parsed URL, because the secret usually
//! arrives embedded in someone else's message.

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// Parameter names whose value is a secret, matched as substrings of the lowercased name
/// (`password`, `sslpassword`, `access_token`, `client_secret`, …).
const SECRET_NAMES: &[&str] = &[
    "pass",
    "pwd",
    "secret",
    "token",
    "apikey",
    "api_key",
    "api-key",
    "accesskey",
    "access_key",
    "privatekey",
    "private_key",
    "credential",
    "signature",
    "authorization",
];

/// Names that are secrets only when they are the whole name (`sig=` in a signed URL, but
/// not `signal=`). A bare `key` is not among them: it is also a message's ordering key.
const SECRET_EXACT: &[&str] = &["sig", "auth"];

/// `text` with every credential replaced by [`MASK`]:
///
/// - the password of a URL: `amqp://user:pw@host` → `amqp://user:***@host` (the user name
///   stays, so the message still says who tried to connect);
/// - the value of a secret-like parameter, in a URL query or a key=value DSN:
///   `?password=pw`, `&access_token=t`, `host=db password='p w'` → `password=***`, and
///   the same in Rust's debug output or JSON (`password: "pw"`);
/// - a Standard Webhooks signing key: `whsec_…` → `whsec_***`.
///
/// Text without credentials comes back unchanged. When it cannot tell where a secret ends
/// (an unencoded `@` or `/` in a password), it hides too much rather than too little.
pub fn redact(text: &str) -> String {
    let text = url_passwords(text);
    let text = secret_parameters(&text);
    webhook_keys(&text)
}

/// Characters that end a URL written in free text.
fn ends_url(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`')
}

/// Masks the password part of `scheme://user:password@host`.
fn url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let has_scheme = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        let start = i + 3;
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        if !has_scheme {
            continue;
        }
        let end = rest.find(ends_url).unwrap_or(rest.len());
        let Some(at) = userinfo_end(&rest[..end]) else {
            continue;
        };
        let userinfo = &rest[..at];
        match userinfo.find(':') {
            Some(colon) if colon + 1 < at => {
                out.push_str(&userinfo[..=colon]);
                out.push_str(MASK);
                rest = &rest[at..];
            }
            _ => {}
        }
    }
    out.push_str(rest);
    out
}

/// Where the user information of a URL ends (its `@`), given the URL after `scheme://`.
fn userinfo_end(url: &str) -> Option<usize> {
    let authority_end = url.find(['/', '?', '#']).unwrap_or(url.len());
    let authority = &url[..authority_end];
    if let Some(at) = authority.rfind('@') {
        return Some(at);
    }
    // No `@` before the first `/`: either there is no user information, or a password holds
    // an unencoded `/`, `?` or `#` (an invalid URL, but one that still shows up in the error
    // saying so). A `host:port` has digits after its colon; anything else is taken for a
    // password and masked up to the last `@`.
    let colon = authority.find(':')?;
    let port_like = authority[colon + 1..].chars().all(|c| c.is_ascii_digit());
    if port_like || authority.starts_with('[') {
        return None;
    }
    url.rfind('@')
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

fn is_secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_EXACT.contains(&name.as_str()) || SECRET_NAMES.iter().any(|s| name.contains(s))
}

/// Masks the value of `name=value`, `name = 'value'`, `name: "value"` and `"name":"value"`
/// when `name` looks like a secret. A bare value after `:` is left alone, so prose such as
/// "token: expired" is not touched.
fn secret_parameters(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < text.len() {
        let Some(c) = text[i..].chars().next() else {
            break;
        };
        if !is_name_char(c) || text[..i].chars().next_back().is_some_and(is_name_char) {
            i += c.len_utf8();
            continue;
        }
        let name_end = text[i..]
            .find(|c: char| !is_name_char(c))
            .map_or(text.len(), |n| i + n);
        let name = &text[i..name_end];
        if let Some((value_start, value_end)) = secret_value(text, name_end)
            && is_secret_name(name)
        {
            out.push_str(&text[copied..value_start]);
            out.push_str(MASK);
            copied = value_end;
            i = value_end;
        } else {
            i = name_end;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// The byte range of the value that follows a parameter name ending at `from`, if a value
/// follows it (the quotes of a quoted value stay outside the range).
fn secret_value(text: &str, from: usize) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut j = from;
    // `"password": "…"` in JSON: the name's closing quote.
    if bytes.get(j) == Some(&b'"') {
        j += 1;
    }
    while bytes.get(j) == Some(&b' ') {
        j += 1;
    }
    let separator = *bytes.get(j)?;
    if separator != b'=' && separator != b':' {
        return None;
    }
    j += 1;
    while bytes.get(j) == Some(&b' ') {
        j += 1;
    }
    match bytes.get(j) {
        Some(&quote @ (b'"' | b'\'')) => {
            let start = j + 1;
            let len = quoted_len(&text[start..], quote as char);
            Some((start, start + len))
        }
        _ if separator == b':' => None,
        _ => {
            let end = text[j..]
                .find(|c: char| {
                    c.is_whitespace() || matches!(c, '&' | ';' | '"' | '\'' | '<' | '>')
                })
                .map_or(text.len(), |n| j + n);
            (end > j).then_some((j, end))
        }
    }
}

/// Length of a quoted value up to its closing quote, skipping backslash escapes.
fn quoted_len(s: &str, quote: char) -> usize {
    let mut escaped = false;
    for (n, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            c if c == quote => return n,
            _ => {}
        }
    }
    s.len()
}

/// Masks `whsec_…` signing keys wherever they appear.
fn webhook_keys(text: &str) -> String {
    const PREFIX: &str = "whsec_";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(PREFIX) {
        let start = i + PREFIX.len();
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest
            .find(|c: char| {
                !(c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '_' | '-'))
            })
            .unwrap_or(rest.len());
        if end > 0 {
            out.push_str(MASK);
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    const SECRET: &str = "S3cretXYZ";

    fn hidden(text: &str) -> String {
        let shown = redact(text);
        assert!(!shown.contains(SECRET), "{text:?} became {shown:?}");
        shown
    }

    #[test]
    fn url_passwords_are_masked_and_users_kept() {
        for (text, want) in [
            (
                "amqp://guest:S3cretXYZ@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            ("redis://:S3cretXYZ@h:6379", "redis://:***@h:6379"),
            (
                "cannot connect to postgres://app:S3cretXYZ@db/app: refused",
                "cannot connect to postgres://app:***@db/app: refused",
            ),
            (
                "sink \"smtps://u:S3cretXYZ@mail:465?from=a@b\": bad",
                "sink \"smtps://u:***@mail:465?from=a@b\": bad",
            ),
            (
                "error sending request for url (http://u:S3cretXYZ@h:1/hook)",
                "error sending request for url (http://u:***@h:1/hook)",
            ),
        ] {
            assert_eq!(hidden(text), want);
        }
    }

    #[test]
    fn unencoded_characters_in_a_password_hide_more_not_less() {
        hidden("amqp://u:S3c@retXYZ@h/");
        hidden("amqp://u:S3cretXYZ/x@h/");
        hidden("postgres://u:S3c?retXYZ@h/db");
        hidden("a: nats://u:S3cretXYZ@h:1, b: nats://v:S3cretXYZ@h:2");
    }

    #[test]
    fn secret_parameters_are_masked() {
        for (text, want) in [
            (
                "postgres://h/db?user=a&password=S3cretXYZ&sslmode=require",
                "postgres://h/db?user=a&password=***&sslmode=require",
            ),
            ("https://h/hook?token=S3cretXYZ", "https://h/hook?token=***"),
            (
                "https://h/x?access_token=S3cretXYZ&sig=S3cretXYZ",
                "https://h/x?access_token=***&sig=***",
            ),
            (
                "host=db port=5432 user=app password=S3cretXYZ dbname=app",
                "host=db port=5432 user=app password=*** dbname=app",
            ),
            (
                "host=db password = 'S3cret XYZ' dbname=app",
                "host=db password = '***' dbname=app",
            ),
            (
                "Server=db;Password=S3cretXYZ;Database=app",
                "Server=db;Password=***;Database=app",
            ),
            (
                "AMQPUserInfo { username: \"u\", password: \"S3cretXYZ\" }",
                "AMQPUserInfo { username: \"u\", password: \"***\" }",
            ),
            (
                "{\"client_secret\":\"S3cretXYZ\"}",
                "{\"client_secret\":\"***\"}",
            ),
        ] {
            assert_eq!(hidden(text), want);
        }
        hidden("password=\"S3c\\\"retXYZ\"");
    }

    #[test]
    fn webhook_keys_are_masked() {
        assert_eq!(
            hidden("secret whsec_S3cretXYZ+/= is short"),
            "secret whsec_*** is short"
        );
    }

    #[test]
    fn ordinary_text_is_unchanged() {
        for text in [
            "",
            "postgres://postgres@127.0.0.1:5432/test",
            "http://127.0.0.1:8080/api/payments?page=2&limit=10",
            "http://127.0.0.1:8080/contact?email=ana@example.com",
            "http://[::1]:8080/a@b",
            "nats://127.0.0.1:4222",
            "kafka://h1:9092,h2:9092?prefix=t.",
            "sqlite:///var/lib/outbox/outbox.db",
            "file:/tmp/events.jsonl",
            "password authentication failed for user \"app\"",
            "the token expired; token: expired",
            "key=k-1 attempts=3 error=webhook answered 500",
            "signal=TERM design=flat",
            "ünïcödé = ✓ and key=värde",
            "webhook answered 503 Service Unavailable",
        ] {
            assert_eq!(redact(text), text);
        }
    }

    #[test]
    fn masking_twice_changes_nothing() {
        let once = redact("amqp://u:S3cretXYZ@h/?token=S3cretXYZ whsec_S3cretXYZ");
        assert_eq!(redact(&once), once);
    }
}
