//! Requests to Okapi (or to pubsub directly), built in one place: the URL from Okapi's address
//! and a path, and the headers every FOLIO call carries (`X-Okapi-Tenant`, `X-Okapi-Url`, the
//! token when there is one). The system user, the delivery engine, the client's registrar and
//! the command line all call through it.

use reqwest::{Method, RequestBuilder};

/// Okapi's address and the HTTP client that reaches it.
#[derive(Clone, Debug)]
pub struct Okapi {
    http: reqwest::Client,
    url: String,
}

impl Okapi {
    /// `url` is Okapi's base URL (a trailing `/` is dropped).
    pub fn new(http: reqwest::Client, url: &str) -> Self {
        Okapi {
            http,
            url: url.trim_end_matches('/').to_owned(),
        }
    }

    /// Okapi's base URL, as sent in `X-Okapi-Url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `method path` for `tenant`, with the token when given.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        tenant: &str,
        token: Option<&str>,
    ) -> RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .header("X-Okapi-Tenant", tenant)
            .header("X-Okapi-Url", &self.url);
        if let Some(t) = token {
            r = r.header("X-Okapi-Token", t);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_folio_headers() {
        let okapi = Okapi::new(reqwest::Client::new(), "http://okapi:9130/");
        let r = okapi
            .request(Method::POST, "/pubsub/publish", "diku", Some("t0k"))
            .build()
            .unwrap();
        assert_eq!(r.url().as_str(), "http://okapi:9130/pubsub/publish");
        assert_eq!(r.headers()["x-okapi-tenant"], "diku");
        assert_eq!(r.headers()["x-okapi-url"], "http://okapi:9130");
        assert_eq!(r.headers()["x-okapi-token"], "t0k");
        let r = okapi
            .request(Method::GET, "/x", "diku", None)
            .build()
            .unwrap();
        assert!(r.headers().get("x-okapi-token").is_none());
    }
}
