//! Who is looking at a page, the session and CSRF cookies, and the one-shot notice.
//!
//! Sessions are server-side: signing in (with an API token, or an enrollment code) mints a new
//! API token named `web session` that expires after [`SESSION_HOURS`]; its secret is the value of
//! the `bsp_session` cookie (HttpOnly, SameSite=Strict, Secure when the server speaks TLS, its
//! `public_url` is https, or a `trusted_proxies` peer says `X-Forwarded-Proto: https`; a
//! header from anyone else changes nothing). Like every token it is stored
//! only as a SHA-256 hash, shows in `basphere token list` and can be revoked there; signing out
//! revokes it. So no signing key has to be kept, and a stolen cookie dies with the session.
//!
//! CSRF: every form carries a `csrf` field, SHA-256 of `csrf|` + the session secret (or, before
//! sign-in, + the random `bsp_pre` cookie: double submit). A POST whose field does not match is
//! refused with 403 before anything else happens. SameSite=Strict is a second, independent wall.

use crate::html::{esc, layout};
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::{LOCATION, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use basphere_api::limits::ClientKey;
use basphere_api::{AppState, Caller, PeerInfo, SESSION_COOKIE, cookie_value};
use basphere_core::Role;
use basphere_store::hash_secret;
use std::collections::HashMap;

/// Lifetime of a web session.
pub const SESSION_HOURS: i64 = 12;
const PRE_COOKIE: &str = "bsp_pre";
const FLASH_COOKIE: &str = "bsp_flash";

/// The visitor of a page: signed in or not, with the cookies that go back with the answer.
pub struct Visitor {
    /// The signed-in caller, when the session cookie names a live session.
    pub caller: Option<Caller>,
    /// The session's token id (for sign-out).
    pub token_id: Option<String>,
    session: Option<String>,
    pre: String,
    new_pre: bool,
    stale_session: bool,
    /// A one-shot notice `(kind, text)` left by the previous request; `kind` is `ok` or
    /// `error` (the cookie is client-controlled: any other kind drops the notice).
    pub flash: Option<(String, String)>,
    had_flash: bool,
    /// Whether cookies get the Secure attribute.
    pub secure: bool,
    /// The connection, for the audit trail (`tcp:127.0.0.1:5000`).
    pub source: String,
    /// The client as the rate limits count it.
    pub client: ClientKey,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FromRequestParts<AppState> for Visitor {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Response> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<PeerInfo>>()
            .map(|c| &c.0);
        let source = match peer {
            Some(PeerInfo::Tcp(a)) => format!("tcp:{a}"),
            Some(PeerInfo::Unix { uid, .. }) => format!("unix:uid={}", uid.unwrap_or(u32::MAX)),
            None => "unknown".into(),
        };
        let client = peer.map_or(ClientKey::Unknown, ClientKey::of);
        let peer_ip = match parts.extensions.get::<ConnectInfo<PeerInfo>>() {
            Some(ConnectInfo(PeerInfo::Tcp(a))) => Some(a.ip().to_canonical()),
            _ => None,
        };
        let secure = st.config.server.cookies_secure(
            peer_ip,
            parts
                .headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok()),
        );
        let session = cookie_value(&parts.headers, SESSION_COOKIE).map(str::to_string);
        let caller = match &session {
            Some(s) => Caller::from_session(st, s, &source)
                .await
                .map_err(|e| error_page_plain(e.status, &e.message))?,
            None => None,
        };
        let token_id = caller
            .as_ref()
            .and_then(|c| c.source.rsplit_once("session="))
            .map(|(_, id)| id.to_string());
        let stale_session = session.is_some() && caller.is_none();
        let pre = cookie_value(&parts.headers, PRE_COOKIE)
            .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_string);
        let new_pre = pre.is_none();
        let flash = cookie_value(&parts.headers, FLASH_COOKIE).and_then(|v| {
            let v = decode(v);
            v.split_once(':')
                .filter(|(k, _)| matches!(*k, "ok" | "error"))
                .map(|(k, t)| (k.to_string(), t.to_string()))
        });
        let had_flash = cookie_value(&parts.headers, FLASH_COOKIE).is_some();
        Ok(Visitor {
            caller,
            token_id,
            session,
            pre: pre.unwrap_or_else(|| random_hex(32)),
            new_pre,
            stale_session,
            had_flash,
            flash,
            secure,
            source,
            client,
        })
    }
}

impl Visitor {
    pub fn is_admin(&self) -> bool {
        self.caller
            .as_ref()
            .is_some_and(|c| c.is_admin() && c.user.as_ref().is_some_and(|u| u.role == Role::Admin))
    }

    /// The CSRF token that this visitor's forms carry.
    pub fn csrf(&self) -> String {
        let basis = match (&self.caller, &self.session) {
            (Some(_), Some(s)) => s.as_str(),
            _ => self.pre.as_str(),
        };
        hash_secret(&format!("csrf|{basis}"))
    }

    /// The hidden CSRF field of a form.
    pub fn csrf_field(&self) -> String {
        format!(
            r#"<input type="hidden" name="csrf" value="{}">"#,
            self.csrf()
        )
    }

    /// Refuses (403) a form whose CSRF field is missing or wrong.
    pub fn check_csrf(&self, form: &HashMap<String, String>) -> Result<(), Response> {
        let ok = !self.new_pre || self.caller.is_some();
        match form.get("csrf") {
            Some(t) if ok && constant_eq(t.as_bytes(), self.csrf().as_bytes()) => Ok(()),
            _ => Err(self.page(
                StatusCode::FORBIDDEN,
                "Form refused",
                r#"<p id="csrf-refused">This form was refused: its security token is missing or out of date (CSRF protection). Go back, reload the page and send it again.</p>"#,
            )),
        }
    }

    /// The caller for a form, or a redirect to sign-in.
    pub fn signed_in(&self) -> Result<&Caller, Response> {
        self.caller
            .as_ref()
            .ok_or_else(|| redirect("/signin", Some(("error", "Please sign in first."))))
    }

    /// An anonymous caller (registration, enrollment): no user, the connection as source.
    pub fn anonymous(&self) -> Caller {
        Caller {
            user: None,
            name: "anonymous".into(),
            source: format!("web:{}", self.source),
            local: false,
            unidentified: None,
        }
    }

    fn cookie(&self, name: &str, value: &str, max_age: Option<i64>) -> HeaderValue {
        let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
        if let Some(a) = max_age {
            c.push_str(&format!("; Max-Age={a}"));
        }
        if self.secure {
            c.push_str("; Secure");
        }
        HeaderValue::from_str(&c).expect("cookie text is ASCII")
    }

    /// Adds the cookies this visit must set or clear to `resp`.
    pub fn finish(&self, mut resp: Response) -> Response {
        let h = resp.headers_mut();
        if self.new_pre {
            h.append(SET_COOKIE, self.cookie(PRE_COOKIE, &self.pre, None));
        }
        if self.had_flash {
            h.append(SET_COOKIE, self.cookie(FLASH_COOKIE, "", Some(0)));
        }
        if self.stale_session {
            h.append(SET_COOKIE, self.cookie(SESSION_COOKIE, "", Some(0)));
        }
        resp
    }

    /// A page in the layout.
    pub fn page(&self, status: StatusCode, title: &str, body: &str) -> Response {
        let html = layout(self, title, body);
        self.finish((status, [("content-type", "text/html; charset=utf-8")], html).into_response())
    }

    /// This visitor, now signed in with the session `secret` (token `token_id`).
    pub fn into_session(mut self, caller: Caller, token_id: String, secret: String) -> Self {
        self.caller = Some(caller);
        self.token_id = Some(token_id);
        self.session = Some(secret);
        self.stale_session = false;
        self
    }

    /// Sets the session cookie on `resp`.
    pub fn start_session(&self, mut resp: Response, secret: &str) -> Response {
        resp.headers_mut().append(
            SET_COOKIE,
            self.cookie(SESSION_COOKIE, secret, Some(SESSION_HOURS * 3600)),
        );
        resp
    }

    /// Clears the session cookie on `resp`.
    pub fn end_session(&self, mut resp: Response) -> Response {
        resp.headers_mut()
            .append(SET_COOKIE, self.cookie(SESSION_COOKIE, "", Some(0)));
        resp
    }

    /// A 303 to `to` with a one-shot notice.
    pub fn redirect(&self, to: &str, flash: Option<(&str, &str)>) -> Response {
        let mut r = redirect(to, None);
        if let Some((kind, text)) = flash {
            r.headers_mut().append(
                SET_COOKIE,
                self.cookie(
                    FLASH_COOKIE,
                    &crate::html::url(&format!("{kind}:{text}")),
                    Some(60),
                ),
            );
        }
        if self.had_flash && flash.is_none() {
            r.headers_mut()
                .append(SET_COOKIE, self.cookie(FLASH_COOKIE, "", Some(0)));
        }
        r
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A bare 303 redirect (with an optional notice, not Secure: used before a visitor exists).
pub fn redirect(to: &str, flash: Option<(&str, &str)>) -> Response {
    let mut r = (StatusCode::SEE_OTHER, [(LOCATION, to.to_string())]).into_response();
    if let Some((kind, text)) = flash {
        let c = format!(
            "{FLASH_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age=60",
            crate::html::url(&format!("{kind}:{text}"))
        );
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append(SET_COOKIE, v);
        }
    }
    r
}

/// A minimal error page for failures before a visitor exists.
pub fn error_page_plain(status: StatusCode, message: &str) -> Response {
    (
        status,
        [("content-type", "text/html; charset=utf-8")],
        format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Error · Basphere</title><link rel=\"icon\" href=\"/static/icon.svg\"></head><body><main><h1>Error</h1><p>{}</p></main></body></html>",
            esc(message)
        ),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn flash_text_round_trips_through_the_cookie() {
        let text = "ok:User dora approved; code: ab12 (é)";
        assert_eq!(super::decode(&crate::html::url(text)), text);
        assert_eq!(super::decode("100%"), "100%");
    }

    #[test]
    fn constant_time_compare() {
        assert!(super::constant_eq(b"abc", b"abc"));
        assert!(!super::constant_eq(b"abc", b"abd"));
        assert!(!super::constant_eq(b"abc", b"ab"));
    }
}
