//! Validation of a purchase request. Money is parsed from the JSON text, never through a float.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::db::NewPayment;

/// A request body as sent: every field optional so that each problem can be named.
#[derive(Debug, Deserialize)]
pub struct RawPayment<'a> {
    /// The amount as its raw JSON text, so it is parsed as a decimal and never through a float.
    #[serde(borrow)]
    pub amount: Option<&'a RawValue>,
    /// The ISO 4217 currency code.
    pub currency: Option<serde_json::Value>,
    /// The card token.
    pub token_card: Option<serde_json::Value>,
    /// The card holder's e-mail address.
    pub card_holder_email: Option<serde_json::Value>,
    /// The card holder's name.
    pub card_holder_name: Option<serde_json::Value>,
}

/// One invalid field, as listed in a 422 answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// The request field that is wrong, as the client named it (`amount`, `currency`, …).
    pub field: &'static str,
    /// What is wrong with it.
    pub detail: String,
}

const MAX_AMOUNT_DIGITS: usize = 18;

fn err(field: &'static str, detail: impl Into<String>) -> FieldError {
    FieldError {
        field,
        detail: detail.into(),
    }
}

fn text(
    field: &'static str,
    v: &Option<serde_json::Value>,
    max: usize,
) -> Result<String, FieldError> {
    match v {
        None | Some(serde_json::Value::Null) => Err(err(field, "is required")),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => {
            Err(err(field, "must not be empty"))
        }
        Some(serde_json::Value::String(s)) if s.chars().count() > max => {
            Err(err(field, format!("must be at most {max} characters")))
        }
        Some(serde_json::Value::String(s)) => Ok(s.trim().to_owned()),
        Some(_) => Err(err(field, "must be a string")),
    }
}

fn currency(v: &Option<serde_json::Value>) -> Result<(String, u16), FieldError> {
    let code = text("currency", v, 3)?;
    let c = iso_currency::Currency::from_code(&code.to_ascii_uppercase())
        .filter(|_| code.len() == 3)
        .ok_or_else(|| {
            err(
                "currency",
                format!("{code:?} is not an ISO 4217 currency code"),
            )
        })?;
    Ok((c.code().to_owned(), c.exponent().unwrap_or(0)))
}

/// A positive decimal, given as a JSON string or number, with at most `minor` decimals.
fn amount(raw: Option<&RawValue>, minor: Option<u16>) -> Result<Decimal, FieldError> {
    let raw = raw.map(RawValue::get).filter(|r| *r != "null");
    let Some(raw) = raw else {
        return Err(err("amount", "is required"));
    };
    let literal = match serde_json::from_str::<String>(raw) {
        Ok(s) => s,
        Err(_) if raw.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => raw.to_owned(),
        Err(_) => {
            return Err(err(
                "amount",
                "must be a decimal number or a string holding one",
            ));
        }
    };
    let literal = literal.trim();
    let plain = literal
        .chars()
        .all(|c| c.is_ascii_digit() || c == '.' || c == '-');
    if !plain || literal.len() > MAX_AMOUNT_DIGITS + 2 {
        return Err(err(
            "amount",
            format!("{literal:?} is not a plain decimal number"),
        ));
    }
    let value = Decimal::from_str(literal)
        .map_err(|_| err("amount", format!("{literal:?} is not a decimal number")))?;
    if value <= Decimal::ZERO {
        return Err(err("amount", "must be greater than zero"));
    }
    if let Some(minor) = minor
        && value.normalize().scale() > u32::from(minor)
    {
        return Err(err(
            "amount",
            format!("has more than {minor} decimal places for its currency"),
        ));
    }
    Ok(value)
}

fn email(v: &Option<serde_json::Value>) -> Result<String, FieldError> {
    let e = text("card_holder_email", v, 254)?;
    if email_address::EmailAddress::is_valid(&e) && e.contains('.') {
        Ok(e)
    } else {
        Err(err(
            "card_holder_email",
            format!("{e:?} is not a valid e-mail address"),
        ))
    }
}

fn take<T>(errors: &mut Vec<FieldError>, r: Result<T, FieldError>) -> Option<T> {
    r.map_err(|e| errors.push(e)).ok()
}

/// Checks every field and reports all problems at once.
pub fn validate(raw: &RawPayment<'_>) -> Result<NewPayment, Vec<FieldError>> {
    let mut errors = Vec::new();
    let token_card = take(&mut errors, text("token_card", &raw.token_card, 128));
    let currency = take(&mut errors, currency(&raw.currency));
    let minor = currency.as_ref().map(|(_, m)| *m);
    let amount = take(&mut errors, amount(raw.amount, minor));
    let card_holder_email = take(&mut errors, email(&raw.card_holder_email));
    let card_holder_name = take(
        &mut errors,
        text("card_holder_name", &raw.card_holder_name, 200),
    );
    match (
        token_card,
        currency,
        amount,
        card_holder_email,
        card_holder_name,
    ) {
        (
            Some(token_card),
            Some((currency, _)),
            Some(amount),
            Some(card_holder_email),
            Some(card_holder_name),
        ) => Ok(NewPayment {
            token_card,
            amount,
            currency,
            card_holder_email,
            card_holder_name,
        }),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str) -> Result<NewPayment, Vec<&'static str>> {
        let raw: RawPayment = serde_json::from_str(body).unwrap();
        validate(&raw).map_err(|e| e.iter().map(|e| e.field).collect())
    }

    const OK: &str = r#"{"token_card":"tok_1","amount":"10.50","currency":"EUR","card_holder_email":"ana@example.com","card_holder_name":"Ana"}"#;

    #[test]
    fn accepts_a_valid_purchase_and_keeps_the_exact_amount() {
        let p = check(OK).unwrap();
        assert_eq!(p.amount.to_string(), "10.50");
        assert_eq!(p.currency, "EUR");
        let p = check(&OK.replace("\"10.50\"", "0.1")).unwrap();
        assert_eq!(
            p.amount.to_string(),
            "0.1",
            "a JSON number must not go through f64"
        );
    }

    #[test]
    fn names_every_bad_field() {
        let bad = r#"{"token_card":"","amount":"-1","currency":"XXY","card_holder_email":"nope","card_holder_name":7}"#;
        assert_eq!(
            check(bad).unwrap_err(),
            vec![
                "token_card",
                "currency",
                "amount",
                "card_holder_email",
                "card_holder_name"
            ]
        );
        assert_eq!(check("{}").unwrap_err().len(), 5);
    }

    #[test]
    fn minor_units_follow_the_currency() {
        assert!(check(&OK.replace("\"10.50\"", "\"10.505\"")).is_err());
        let jpy = OK.replace("\"EUR\"", "\"JPY\"");
        assert_eq!(
            check(&jpy.replace("\"10.50\"", "\"10.5\"")).unwrap_err(),
            vec!["amount"]
        );
        assert!(check(&jpy.replace("\"10.50\"", "\"1050\"")).is_ok());
        assert!(
            check(&OK.replace("\"10.50\"", "\"10.500\"")).is_ok(),
            "trailing zeros are not extra precision"
        );
    }

    #[test]
    fn rejects_non_numbers_and_exponents() {
        for amount in [
            "\"abc\"",
            "\"1e3\"",
            "true",
            "[1]",
            "\"\"",
            "0",
            "\"99999999999999999999999\"",
        ] {
            assert_eq!(
                check(&OK.replace("\"10.50\"", amount)).unwrap_err(),
                vec!["amount"],
                "{amount}"
            );
        }
    }
}
