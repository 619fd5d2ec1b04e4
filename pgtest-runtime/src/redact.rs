//! Redaction: a URL is shown with its password replaced, never as given.

use url::Url;

const MASK: &str = "***";

/// The URL with any password (in the user info or as a `password=` query
/// parameter) replaced by `***`. A string that does not parse as a URL with
/// a host keeps only its scheme and what follows the last `@`, so that a password in a
/// malformed URL is not shown either.
pub(crate) fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(url) if url.has_host() => redact_parsed(url),
        _ => redact_unparsed(raw),
    }
}

fn redact_parsed(mut url: Url) -> String {
    if url.password().is_some() {
        // Only fails for URLs that cannot have a password, which have none.
        let _ = url.set_password(Some(MASK));
    }
    if url.query_pairs().any(|(key, _)| key == "password") {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let value = if key == "password" {
                    MASK.to_owned()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

fn redact_unparsed(raw: &str) -> String {
    let (scheme, rest) = match raw.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), raw),
    };
    let rest = match rest.rfind('@') {
        Some(at) => format!("{MASK}@{}", &rest[at + 1..]),
        None => rest.to_owned(),
    };
    match rest.split_once('?') {
        Some((base, _)) => format!("{scheme}{base}?{MASK}"),
        None => format!("{scheme}{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn a_password_in_the_user_info_is_masked() {
        let shown = redact_url("postgres://app:s3cret@db.example:5432/app");
        assert_eq!(shown, "postgres://app:***@db.example:5432/app");
    }

    #[test]
    fn a_password_query_parameter_is_masked() {
        let shown =
            redact_url("postgres://db.example/app?user=app&password=s3cret&sslmode=require");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("sslmode=require"), "{shown}");
    }

    #[test]
    fn a_url_without_password_is_shown_as_is() {
        assert_eq!(
            redact_url("postgres://app@localhost/app"),
            "postgres://app@localhost/app"
        );
    }

    #[test]
    fn a_malformed_url_never_shows_its_password() {
        for raw in [
            "postgres://app:s3cret@db.example:notaport/app",
            "postgres://app:s3c@ret@[::1/app",
            "app:s3cret@host",
            "postgres://host/app?password=s3cret&x=%zz",
        ] {
            let shown = redact_url(raw);
            assert!(
                !shown.contains("s3cret") && !shown.contains("ret@"),
                "{raw} -> {shown}"
            );
        }
    }
}
