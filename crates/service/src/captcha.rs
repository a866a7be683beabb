//! reCAPTCHA v2: the answer a page's widget produced, checked with the verify endpoint
//! (`[recaptcha] verify_url`, Google's by default) before an anonymous registration or key
//! change is looked at.

use crate::error::Result;
use crate::{ServiceError, Services};
use basphere_core::FieldErrors;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

/// The form field (and JSON key) that carries the widget's answer.
pub const CAPTCHA_FIELD: &str = "g-recaptcha-response";

fn refused(why: &str) -> ServiceError {
    let mut e = FieldErrors::new();
    e.push(CAPTCHA_FIELD, why);
    ServiceError::Invalid(e)
}

fn http() -> std::result::Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<std::result::Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            // Err: a provider is installed already (ours or another part's): fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("basphere/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// `application/x-www-form-urlencoded` of one value.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Services {
    /// The site key pages embed, when reCAPTCHA is on.
    pub fn captcha_site_key(&self) -> Option<&str> {
        let rc = &self.config.recaptcha;
        rc.enabled().then_some(rc.site_key.as_str())
    }

    /// Checks a reCAPTCHA answer when reCAPTCHA is on: a missing or refused answer is a field
    /// error on [`CAPTCHA_FIELD`]; an endpoint that cannot be reached is `Unavailable`.
    pub async fn verify_captcha(&self, answer: Option<&str>, remote: Option<IpAddr>) -> Result<()> {
        let rc = &self.config.recaptcha;
        if !rc.enabled() {
            return Ok(());
        }
        let answer = answer.map(str::trim).unwrap_or("");
        if answer.is_empty() {
            return Err(refused(
                "is required: complete the reCAPTCHA (\"I'm not a robot\") and send again",
            ));
        }
        if answer.len() > 8192 {
            return Err(refused("is too long to be a reCAPTCHA answer"));
        }
        let mut body = format!(
            "secret={}&response={}",
            form_encode(&rc.secret_key),
            form_encode(answer)
        );
        if let Some(ip) = remote {
            body.push_str(&format!("&remoteip={}", form_encode(&ip.to_string())));
        }
        let unavailable = |e: String| {
            tracing::warn!(error = %e, "reCAPTCHA check not made");
            ServiceError::Unavailable {
                message: "the reCAPTCHA check could not be made now; try again in a minute".into(),
                retry_after: Some(60),
            }
        };
        let r = http()
            .map_err(unavailable)?
            .post(&rc.verify_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| unavailable(format!("reCAPTCHA verify request failed: {e}")))?;
        let status = r.status();
        let bytes = r
            .bytes()
            .await
            .map_err(|e| unavailable(format!("reCAPTCHA verify answer unreadable: {e}")))?;
        if !status.is_success() {
            return Err(unavailable(format!("reCAPTCHA verify answered {status}")));
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| unavailable(format!("reCAPTCHA verify answer is not JSON: {e}")))?;
        if v["success"] == serde_json::Value::Bool(true) {
            Ok(())
        } else {
            Err(refused(
                "was not accepted by reCAPTCHA (expired or wrong); solve it again and send again",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn form_values_are_encoded() {
        assert_eq!(super::form_encode("a b+c/=&ü"), "a+b%2Bc%2F%3D%26%C3%BC");
    }
}
