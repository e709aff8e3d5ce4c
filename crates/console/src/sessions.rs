//! Signed-in browsers: a random session id in an HttpOnly, SameSite=Strict
//! cookie (Secure when the console is served over TLS), mapped in memory to
//! the user's tokens and a CSRF token. Tokens never leave the server: not
//! in a URL, a page or a log line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The session cookie's name.
pub const COOKIE: &str = "tm_session";

/// A signed-in user.
#[derive(Clone, Debug)]
pub struct WebSession {
    pub tenant_id: String,
    pub email: String,
    pub access_token: String,
    pub refresh_token: String,
    /// When the access token expires (Unix seconds).
    pub expires_at: i64,
    /// Sent back by every form; a POST without it is refused.
    pub csrf: String,
    last_used: Instant,
}

impl WebSession {
    pub fn new(tenant_id: String, email: String, access_token: String, refresh_token: String, expires_at: i64) -> Self {
        Self {
            tenant_id,
            email,
            access_token,
            refresh_token,
            expires_at,
            csrf: random_token(),
            last_used: Instant::now(),
        }
    }

    /// The platform's operator sees every tenant; anyone else their own.
    pub fn is_platform(&self) -> bool {
        self.tenant_id == tenantmesh_tenant_context::PLATFORM_TENANT
    }

    pub fn may_see(&self, tenant: &str) -> bool {
        self.is_platform() || self.tenant_id == tenant
    }
}

/// 256 random bits, base64url.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system's random source");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The sessions of one console process (a restart signs everyone out).
pub struct Sessions {
    map: Mutex<HashMap<String, WebSession>>,
    idle: Duration,
    max: usize,
}

impl Sessions {
    /// Sessions that end after `idle` without a request; at most `max` at
    /// once (the least recently used goes first).
    pub fn new(idle: Duration, max: usize) -> Self {
        Self { map: Mutex::new(HashMap::new()), idle, max: max.max(1) }
    }

    /// Keeps `session`; its id, for the cookie.
    pub fn create(&self, session: WebSession) -> String {
        let id = random_token();
        let mut map = self.map.lock().expect("sessions lock");
        let idle = self.idle;
        map.retain(|_, s| s.last_used.elapsed() < idle);
        if map.len() >= self.max
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(id.clone(), session);
        id
    }

    /// The session of `id`, if it is still live (and marks it used).
    pub fn get(&self, id: &str) -> Option<WebSession> {
        let mut map = self.map.lock().expect("sessions lock");
        let live = map.get(id).is_some_and(|s| s.last_used.elapsed() < self.idle);
        if !live {
            map.remove(id);
            return None;
        }
        let s = map.get_mut(id)?;
        s.last_used = Instant::now();
        Some(s.clone())
    }

    /// Stores refreshed tokens.
    pub fn update(&self, id: &str, access_token: String, refresh_token: String, expires_at: i64) {
        if let Some(s) = self.map.lock().expect("sessions lock").get_mut(id) {
            s.access_token = access_token;
            if !refresh_token.is_empty() {
                s.refresh_token = refresh_token;
            }
            s.expires_at = expires_at;
        }
    }

    pub fn remove(&self, id: &str) -> Option<WebSession> {
        self.map.lock().expect("sessions lock").remove(id)
    }
}

/// The session cookie's `Set-Cookie` value (`None`: clear it).
pub fn set_cookie(id: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match id {
        Some(id) => format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}"),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// The session id from a request's `Cookie` headers.
pub fn cookie_of(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> WebSession {
        WebSession::new("acme".into(), "a@acme.example".into(), "at".into(), "rt".into(), 0)
    }

    #[test]
    fn sessions_end_when_idle_and_the_oldest_go_past_the_cap() {
        let sessions = Sessions::new(Duration::from_secs(60), 2);
        let a = sessions.create(session());
        let b = sessions.create(session());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43, "256 bits, base64url");
        assert!(sessions.get(&a).is_some());
        let c = sessions.create(session());
        assert!(sessions.get(&b).is_none(), "the least recently used went");
        assert!(sessions.get(&a).is_some() && sessions.get(&c).is_some());
        let gone = Sessions::new(Duration::ZERO, 10);
        let id = gone.create(session());
        assert!(gone.get(&id).is_none());
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_over_tls() {
        assert_eq!(set_cookie(Some("x"), false), "tm_session=x; Path=/; HttpOnly; SameSite=Strict");
        assert!(set_cookie(Some("x"), true).ends_with("; Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
        let mut headers = http::HeaderMap::new();
        headers.append(http::header::COOKIE, "a=1; tm_session=abc; b=2".parse().unwrap());
        assert_eq!(cookie_of(&headers).as_deref(), Some("abc"));
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
        assert!(session().may_see("acme") && !session().may_see("globex"));
    }
}
