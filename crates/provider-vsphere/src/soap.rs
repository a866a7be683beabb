//! A small vim25 SOAP client: the calls the provider needs, with session handling and typed faults.
//!
//! Requests are written as XML text with every value escaped; responses are parsed into a
//! namespace-aware tree ([`crate::xml::Node`]). The session cookie is kept in memory only, and a
//! call answered with `NotAuthenticated` logs in again once and is repeated.

use crate::config::{Credentials, Secret, TlsConfig};
use crate::error::{Error, Result};
use crate::xml::{self, Node, esc};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, RwLock};

const SESSION_COOKIE: &str = "vmware_soap_session";

/// A reference to a server-side object, e.g. `VirtualMachine:vm-42`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoRef {
    /// The managed object type (`VirtualMachine`, `Folder`, `Task`, …).
    pub kind: String,
    /// The server's id for it (`vm-42`).
    pub value: String,
}

impl MoRef {
    pub fn new(kind: &str, value: &str) -> Self {
        MoRef {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// Reads a reference from an element carrying a `type` attribute.
    pub fn from_node(n: &Node) -> Option<MoRef> {
        let kind = n.mo_type.as_deref().or(n.xsi_type.as_deref())?;
        if n.text.is_empty() {
            return None;
        }
        Some(MoRef::new(kind, n.text.trim()))
    }

    /// The reference as an XML element named `tag`.
    pub fn xml(&self, tag: &str) -> String {
        format!(
            "<{tag} type=\"{}\">{}</{tag}>",
            esc(&self.kind),
            esc(&self.value)
        )
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// The service's entry points, from RetrieveServiceContent.
#[derive(Debug, Clone)]
pub struct ServiceContent {
    pub root_folder: MoRef,
    pub property_collector: MoRef,
    pub search_index: MoRef,
    pub session_manager: MoRef,
    /// `about.apiVersion`, e.g. `6.5` or `8.0.2.0`.
    pub api_version: String,
}

/// One object's properties from RetrievePropertiesEx.
#[derive(Debug, Clone)]
pub struct ObjectContent {
    pub obj: MoRef,
    /// Property path → value element (`<val>`).
    pub props: Vec<(String, Node)>,
}

impl ObjectContent {
    /// The value of one property.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.props.iter().find(|(p, _)| p == path).map(|(_, v)| v)
    }

    /// The text of one property (empty string when unset).
    pub fn text(&self, path: &str) -> &str {
        self.get(path).map_or("", |v| v.text.as_str())
    }
}

/// A property collector query: which properties of which objects.
#[derive(Debug, Clone)]
pub struct PropertyQuery {
    /// Object type → property paths to fetch.
    pub props: Vec<(String, Vec<String>)>,
    /// The starting object.
    pub root: MoRef,
    /// Follow `Folder.childEntity` from `root` (recursively) instead of reading `root` itself.
    pub walk_folder: bool,
}

/// Number and total duration of SOAP round trips, for benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoapStats {
    pub calls: u64,
    pub time: Duration,
}

/// The SOAP connection to one vCenter (or vcsim): cheap to share behind an `Arc`.
pub struct Client {
    http: reqwest::Client,
    url: String,
    credentials: Credentials,
    /// Session cookie value and a generation counter bumped on every login.
    session: RwLock<(Option<Secret>, u64)>,
    login_lock: Mutex<()>,
    content: ServiceContent,
    calls: AtomicU64,
    nanos: AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .field("user", &self.credentials.username)
            .finish_non_exhaustive()
    }
}

/// Installs ring as rustls' process-wide crypto provider; safe to call any number of times.
pub fn install_crypto_provider() {
    // Err means a provider is installed already (ours or the embedding program's): fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn http_client(tls: &TlsConfig, https_only: bool) -> Result<reqwest::Client> {
    install_crypto_provider();
    let mut b = reqwest::Client::builder()
        // An https:// endpoint is never left for plain HTTP, not even by a redirect.
        .https_only(https_only)
        .connect_timeout(Duration::from_secs(10))
        // Task methods answer at once on vCenter; vcsim answers when the task is done.
        .timeout(Duration::from_secs(300))
        .pool_max_idle_per_host(32)
        .user_agent(concat!("basphere/", env!("CARGO_PKG_VERSION")));
    if tls.insecure {
        b = b.tls_danger_accept_invalid_certs(true);
    } else if let Some(path) = &tls.ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            Error::Config(format!(
                "cannot read vSphere CA file {}: {e}",
                path.display()
            ))
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            Error::Config(format!(
                "vSphere CA file {} holds no usable PEM certificate: {e}",
                path.display()
            ))
        })?;
        b = b.tls_certs_only(certs);
    }
    b.build()
        .map_err(|e| Error::Config(format!("cannot set up the HTTPS client for vSphere: {e}")))
}

fn envelope(body: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\
<soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"
    )
}

/// A fault found in a response: its type name and message.
struct Fault {
    fault_type: String,
    message: String,
}

/// Reads `<soapenv:Fault>` from a parsed envelope.
fn soap_fault(body: &Node) -> Option<Fault> {
    let f = body.child("Fault")?;
    let message = f.child_text("faultstring").unwrap_or("").trim().to_string();
    let detail = f.child("detail").and_then(|d| d.children.first());
    let fault_type = match detail {
        Some(d) => d
            .xsi_type
            .clone()
            .unwrap_or_else(|| d.name.trim_end_matches("Fault").to_string()),
        None => f.child_text("faultcode").unwrap_or("Fault").to_string(),
    };
    Some(Fault {
        fault_type,
        message,
    })
}

/// Reads a `LocalizedMethodFault` (task `info.error`, `missingSet.fault`).
fn method_fault(n: &Node) -> Fault {
    let fault_type = n
        .child("fault")
        .and_then(|f| f.xsi_type.clone())
        .unwrap_or_else(|| "Fault".into());
    let message = n.child_text("localizedMessage").unwrap_or("").to_string();
    Fault {
        fault_type,
        message,
    }
}

impl Client {
    /// Connects, reads the service content and logs in.
    pub async fn connect(url: &str, tls: &TlsConfig, credentials: Credentials) -> Result<Client> {
        let http = http_client(tls, url.starts_with("https://"))?;
        let mut client = Client {
            http,
            url: url.to_string(),
            credentials,
            session: RwLock::new((None, 0)),
            login_lock: Mutex::new(()),
            content: ServiceContent {
                root_folder: MoRef::new("Folder", "group-d1"),
                property_collector: MoRef::new("PropertyCollector", "propertyCollector"),
                search_index: MoRef::new("SearchIndex", "SearchIndex"),
                session_manager: MoRef::new("SessionManager", "SessionManager"),
                api_version: String::new(),
            },
            calls: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
        };
        client.content = client.retrieve_service_content().await?;
        client.login().await?;
        Ok(client)
    }

    /// The service content read at connect time.
    pub fn content(&self) -> &ServiceContent {
        &self.content
    }

    /// Round trips made so far and the time spent in them.
    pub fn stats(&self) -> SoapStats {
        SoapStats {
            calls: self.calls.load(Ordering::Relaxed),
            time: Duration::from_nanos(self.nanos.load(Ordering::Relaxed)),
        }
    }

    /// One HTTP round trip. Returns the parsed `Body` element's first child, or the fault.
    async fn post(&self, op: &str, body: &str, cookie: Option<&Secret>) -> Result<PostOutcome> {
        let started = Instant::now();
        let mut req = self
            .http
            .post(&self.url)
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", "urn:vim25/6.5")
            .body(envelope(body));
        if let Some(c) = cookie {
            req = req.header("Cookie", format!("{SESSION_COOKIE}={}", c.expose()));
        }
        let result = async {
            let resp = req.send().await?;
            let status = resp.status();
            let set_cookie = resp
                .headers()
                .get_all("set-cookie")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|v| {
                    let first = v.split(';').next()?;
                    let (name, value) = first.split_once('=')?;
                    (name.trim() == SESSION_COOKIE).then(|| Secret::new(value.trim()))
                });
            let text = resp.text().await?;
            Ok::<_, reqwest::Error>((status, set_cookie, text))
        }
        .await;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let (status, set_cookie, text) = result.map_err(|e| {
            let message = error_chain(&e);
            if message.contains("certificate") {
                Error::Certificate {
                    server: self.url.clone(),
                    message,
                }
            } else {
                Error::Transport {
                    op: op.into(),
                    server: self.url.clone(),
                    message,
                }
            }
        })?;
        tracing::trace!(op, status = status.as_u16(), elapsed = ?started.elapsed(), "vim25 call");
        let root = xml::parse(&text).map_err(|m| Error::Protocol {
            op: op.into(),
            message: format!("HTTP {status}: {m}"),
        })?;
        let body = root.child("Body").ok_or_else(|| Error::Protocol {
            op: op.into(),
            message: format!("HTTP {status}: no SOAP Body"),
        })?;
        if let Some(f) = soap_fault(body) {
            return Ok(PostOutcome::Fault(f));
        }
        if status.is_server_error() {
            return Err(Error::Transport {
                op: op.into(),
                server: self.url.clone(),
                message: format!("HTTP {status}"),
            });
        }
        let first = body
            .children
            .first()
            .cloned()
            .ok_or_else(|| Error::Protocol {
                op: op.into(),
                message: "empty SOAP Body".into(),
            })?;
        Ok(PostOutcome::Ok(first, set_cookie))
    }

    /// Calls a method with the session, logging in again once on NotAuthenticated.
    /// Returns the response element (`<XxxResponse>`).
    async fn call(&self, op: &str, body: &str) -> Result<Node> {
        for attempt in 0..2 {
            let (cookie, generation) = self.session.read().await.clone();
            let outcome = self.post_retrying_reads(op, body, cookie.as_ref()).await?;
            let stale = match &outcome {
                PostOutcome::Fault(f) => f.fault_type == "NotAuthenticated",
                PostOutcome::Ok(resp, _) => missing_set_not_authenticated(resp),
            };
            if stale && attempt == 0 {
                tracing::info!(op, "vCenter session expired; logging in again");
                self.relogin(generation).await?;
                continue;
            }
            return match outcome {
                PostOutcome::Fault(f) => Err(Error::from_fault(op, &f.fault_type, &f.message)),
                PostOutcome::Ok(_, _) if stale => Err(Error::NotAuthenticated),
                PostOutcome::Ok(resp, _) => Ok(resp),
            };
        }
        Err(Error::NotAuthenticated)
    }

    /// Sends a request; a read-only call whose connection broke is sent again (twice at most).
    /// Pooled keep-alive connections closed by the server, and vcsim 0.24's per-request panics
    /// (FindByInventoryPath racing a clone), look like that; writes are never repeated here.
    async fn post_retrying_reads(
        &self,
        op: &str,
        body: &str,
        cookie: Option<&Secret>,
    ) -> Result<PostOutcome> {
        let read_only = matches!(op, "FindByInventoryPath" | "RetrievePropertiesEx");
        let mut tries = 0;
        loop {
            match self.post(op, body, cookie).await {
                Err(Error::Transport { message, .. }) if read_only && tries < 2 => {
                    tries += 1;
                    tracing::debug!(op, %message, "connection broke on a read; sending it again");
                    tokio::time::sleep(Duration::from_millis(20 * tries)).await;
                }
                r => return r,
            }
        }
    }

    async fn relogin(&self, seen_generation: u64) -> Result<()> {
        let _guard = self.login_lock.lock().await;
        if self.session.read().await.1 != seen_generation {
            return Ok(()); // another task logged in meanwhile
        }
        self.login().await
    }

    async fn retrieve_service_content(&self) -> Result<ServiceContent> {
        let op = "RetrieveServiceContent";
        let body = format!(
            "<{op} xmlns=\"urn:vim25\">{}</{op}>",
            MoRef::new("ServiceInstance", "ServiceInstance").xml("_this")
        );
        let resp = match self.post(op, &body, None).await? {
            PostOutcome::Ok(r, _) => r,
            PostOutcome::Fault(f) => return Err(Error::from_fault(op, &f.fault_type, &f.message)),
        };
        let rv = resp
            .child("returnval")
            .ok_or_else(|| protocol(op, "no returnval"))?;
        let get = |name: &str| {
            rv.child(name)
                .and_then(MoRef::from_node)
                .ok_or_else(|| protocol(op, &format!("service content lacks {name}")))
        };
        Ok(ServiceContent {
            root_folder: get("rootFolder")?,
            property_collector: get("propertyCollector")?,
            search_index: get("searchIndex")?,
            session_manager: get("sessionManager")?,
            api_version: rv
                .path(&["about", "apiVersion"])
                .map(|n| n.text.clone())
                .unwrap_or_default(),
        })
    }

    /// Logs in with the configured credentials and keeps the session cookie.
    pub async fn login(&self) -> Result<()> {
        let op = "Login";
        let body = format!(
            "<{op} xmlns=\"urn:vim25\">{}<userName>{}</userName><password>{}</password></{op}>",
            self.content.session_manager.xml("_this"),
            esc(&self.credentials.username),
            esc(self.credentials.password.expose()),
        );
        match self.post(op, &body, None).await? {
            PostOutcome::Ok(_, Some(cookie)) => {
                let mut s = self.session.write().await;
                *s = (Some(cookie), s.1 + 1);
                tracing::debug!(user = %self.credentials.username, server = %self.url, "logged in to vCenter");
                Ok(())
            }
            PostOutcome::Ok(_, None) => Err(protocol(op, "no session cookie in the login answer")),
            PostOutcome::Fault(f) if f.fault_type == "InvalidLogin" => Err(Error::InvalidLogin {
                server: self.url.clone(),
                user: self.credentials.username.clone(),
            }),
            PostOutcome::Fault(f) => Err(Error::from_fault(op, &f.fault_type, &f.message)),
        }
    }

    /// Ends the session (best effort: a dead session is as good as a closed one).
    pub async fn logout(&self) -> Result<()> {
        let op = "Logout";
        let body = format!(
            "<{op} xmlns=\"urn:vim25\">{}</{op}>",
            self.content.session_manager.xml("_this")
        );
        let cookie = self.session.read().await.0.clone();
        if cookie.is_none() {
            return Ok(());
        }
        let r = self.post(op, &body, cookie.as_ref()).await;
        self.session.write().await.0 = None;
        match r? {
            PostOutcome::Ok(..) => Ok(()),
            PostOutcome::Fault(f) if f.fault_type == "NotAuthenticated" => Ok(()),
            PostOutcome::Fault(f) => Err(Error::from_fault(op, &f.fault_type, &f.message)),
        }
    }

    /// Finds an object by inventory path (`DC0/vm/folder/name`); `None` when nothing is there.
    pub async fn find_by_inventory_path(&self, path: &str) -> Result<Option<MoRef>> {
        let op = "FindByInventoryPath";
        let body = format!(
            "<{op} xmlns=\"urn:vim25\">{}<inventoryPath>{}</inventoryPath></{op}>",
            self.content.search_index.xml("_this"),
            esc(path)
        );
        let resp = self.call(op, &body).await?;
        Ok(resp.child("returnval").and_then(MoRef::from_node))
    }

    /// RetrievePropertiesEx, following ContinueRetrievePropertiesEx tokens to the end.
    /// `page_size` bounds the objects per answer (the server may send fewer).
    pub async fn retrieve(&self, q: &PropertyQuery, page_size: u32) -> Result<Vec<ObjectContent>> {
        let mut prop_sets = String::new();
        for (kind, paths) in &q.props {
            prop_sets.push_str(&format!("<propSet><type>{}</type>", esc(kind)));
            for p in paths {
                prop_sets.push_str(&format!("<pathSet>{}</pathSet>", esc(p)));
            }
            prop_sets.push_str("</propSet>");
        }
        let object_set = if q.walk_folder {
            format!(
                "<objectSet>{}<skip>true</skip>\
<selectSet xsi:type=\"TraversalSpec\"><name>folderTraversal</name><type>Folder</type><path>childEntity</path><skip>false</skip>\
<selectSet><name>folderTraversal</name></selectSet></selectSet></objectSet>",
                q.root.xml("obj")
            )
        } else {
            format!(
                "<objectSet>{}<skip>false</skip></objectSet>",
                q.root.xml("obj")
            )
        };
        let op = "RetrievePropertiesEx";
        let body = format!(
            "<{op} xmlns=\"urn:vim25\">{}<specSet>{prop_sets}{object_set}</specSet>\
<options><maxObjects>{page_size}</maxObjects></options></{op}>",
            self.content.property_collector.xml("_this")
        );
        let mut out = Vec::new();
        let mut resp = self.call(op, &body).await?;
        loop {
            let Some(rv) = resp.child("returnval") else {
                return Ok(out); // no objects at all
            };
            for o in rv.children_named("objects") {
                out.push(object_content(op, o)?);
            }
            let Some(token) = rv.child_text("token").filter(|t| !t.is_empty()) else {
                return Ok(out);
            };
            let op = "ContinueRetrievePropertiesEx";
            let body = format!(
                "<{op} xmlns=\"urn:vim25\">{}<token>{}</token></{op}>",
                self.content.property_collector.xml("_this"),
                esc(token)
            );
            resp = self.call(op, &body).await?;
        }
    }

    /// Reads properties of one object; `None` if the object does not exist (any more).
    pub async fn properties(&self, obj: &MoRef, paths: &[&str]) -> Result<Option<ObjectContent>> {
        let q = PropertyQuery {
            props: vec![(
                obj.kind.clone(),
                paths.iter().map(|p| p.to_string()).collect(),
            )],
            root: obj.clone(),
            walk_folder: false,
        };
        match self.retrieve(&q, 100).await {
            Ok(mut v) => Ok(v.pop()),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Calls a `*_Task` method and returns the task it started.
    async fn start_task(&self, op: &str, this: &MoRef, args: &str) -> Result<MoRef> {
        let body = format!(
            "<{op} xmlns=\"urn:vim25\">{}{args}</{op}>",
            this.xml("_this")
        );
        let resp = self.call(op, &body).await?;
        resp.child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| protocol(op, "no task reference in the answer"))
    }

    /// Polls a task until it succeeds, fails or `deadline` passes. Returns its `info.result`.
    pub async fn wait_task(
        &self,
        op: &str,
        task: &MoRef,
        deadline: Duration,
    ) -> Result<Option<Node>> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            let info = self
                .properties(task, &["info.state", "info.error", "info.result"])
                .await?
                .ok_or_else(|| protocol(op, &format!("task {task} vanished")))?;
            match info.text("info.state") {
                "success" => return Ok(info.get("info.result").cloned()),
                "error" => {
                    let f = info.get("info.error").map(method_fault).unwrap_or(Fault {
                        fault_type: "Fault".into(),
                        message: String::new(),
                    });
                    return Err(Error::from_fault(op, &f.fault_type, &f.message));
                }
                _ => {}
            }
            if started.elapsed() + pause > deadline {
                return Err(Error::Timeout {
                    op: op.into(),
                    after: deadline,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Starts a task and waits for it; the whole call, including the request, is bounded by
    /// `deadline` (vcsim finishes tasks before it answers). Returns `info.result`.
    pub async fn run_task(
        &self,
        op: &str,
        this: &MoRef,
        args: &str,
        deadline: Duration,
    ) -> Result<Option<Node>> {
        let started = Instant::now();
        let work = async {
            let task = self.start_task(op, this, args).await?;
            let left = deadline.saturating_sub(started.elapsed());
            match self.wait_task(op, &task, left).await {
                Err(e @ Error::Timeout { .. }) => {
                    // Best effort: most tasks cannot be cancelled, and then this fails quietly.
                    let _ = self.cancel_task(&task).await;
                    Err(e)
                }
                r => r,
            }
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                op: op.into(),
                after: deadline,
            }),
        }
    }

    /// Asks vCenter to cancel a running task.
    pub async fn cancel_task(&self, task: &MoRef) -> Result<()> {
        let op = "CancelTask";
        let body = format!("<{op} xmlns=\"urn:vim25\">{}</{op}>", task.xml("_this"));
        self.call(op, &body).await.map(|_| ())
    }

    /// Clones `vm` into `folder` as `name`, `spec` being the `<spec>` element's inner XML.
    /// Returns the new VM.
    pub async fn clone_vm(
        &self,
        vm: &MoRef,
        folder: &MoRef,
        name: &str,
        spec: &str,
        deadline: Duration,
    ) -> Result<MoRef> {
        let args = format!(
            "{}<name>{}</name><spec>{spec}</spec>",
            folder.xml("folder"),
            esc(name)
        );
        let op = "CloneVM_Task";
        let result = self.run_task(op, vm, &args, deadline).await?;
        result
            .as_ref()
            .and_then(MoRef::from_node)
            .ok_or_else(|| protocol(op, "task result is not a VM reference"))
    }

    /// Reconfigures a VM, `spec` being the `<spec>` element's inner XML.
    pub async fn reconfigure_vm(&self, vm: &MoRef, spec: &str, deadline: Duration) -> Result<()> {
        let args = format!("<spec>{spec}</spec>");
        self.run_task("ReconfigVM_Task", vm, &args, deadline)
            .await
            .map(|_| ())
    }

    /// Powers a VM on.
    pub async fn power_on(&self, vm: &MoRef, deadline: Duration) -> Result<()> {
        self.run_task("PowerOnVM_Task", vm, "", deadline)
            .await
            .map(|_| ())
    }

    /// Powers a VM off (hard).
    pub async fn power_off(&self, vm: &MoRef, deadline: Duration) -> Result<()> {
        self.run_task("PowerOffVM_Task", vm, "", deadline)
            .await
            .map(|_| ())
    }

    /// Destroys a managed entity (VM, folder) and, for a VM, its files.
    pub async fn destroy(&self, obj: &MoRef, deadline: Duration) -> Result<()> {
        self.run_task("Destroy_Task", obj, "", deadline)
            .await
            .map(|_| ())
    }

    /// Turns a powered-off VM into a template.
    pub async fn mark_as_template(&self, vm: &MoRef) -> Result<()> {
        let op = "MarkAsTemplate";
        let body = format!("<{op} xmlns=\"urn:vim25\">{}</{op}>", vm.xml("_this"));
        self.call(op, &body).await.map(|_| ())
    }

    /// Creates a folder under `parent` and returns it.
    pub async fn create_folder(&self, parent: &MoRef, name: &str) -> Result<MoRef> {
        let op = "CreateFolder";
        let body = format!(
            "<{op} xmlns=\"urn:vim25\">{}<name>{}</name></{op}>",
            parent.xml("_this"),
            esc(name)
        );
        let resp = self.call(op, &body).await?;
        resp.child("returnval")
            .and_then(MoRef::from_node)
            .ok_or_else(|| protocol(op, "no folder reference in the answer"))
    }
}

enum PostOutcome {
    Ok(Node, Option<Secret>),
    Fault(Fault),
}

/// vcsim (and vCenter for some objects) answers RetrievePropertiesEx without a valid session
/// with `missingSet` entries whose fault is NotAuthenticated instead of a SOAP fault.
fn missing_set_not_authenticated(resp: &Node) -> bool {
    let mut missing = Vec::new();
    resp.descendants("missingSet", &mut missing);
    missing.iter().any(|m| {
        m.child("fault")
            .is_some_and(|f| method_fault(f).fault_type == "NotAuthenticated")
    })
}

fn object_content(op: &str, o: &Node) -> Result<ObjectContent> {
    let obj = o
        .child("obj")
        .and_then(MoRef::from_node)
        .ok_or_else(|| protocol(op, "object without obj"))?;
    let props = o
        .children_named("propSet")
        .filter_map(|p| Some((p.child_text("name")?.to_string(), p.child("val")?.clone())))
        .collect();
    Ok(ObjectContent { obj, props })
}

fn protocol(op: &str, message: &str) -> Error {
    Error::Protocol {
        op: op.into(),
        message: message.into(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(doc: &str) -> Node {
        xml::parse(doc).unwrap().child("Body").unwrap().clone()
    }

    #[test]
    fn soap_faults_map_to_typed_errors_whatever_the_xsi_prefix() {
        let vcenter = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Cannot complete login due to an incorrect user name or password.</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        let f = soap_fault(&body(vcenter)).unwrap();
        assert_eq!(f.fault_type, "InvalidLogin");
        assert!(f.message.contains("incorrect user name"));

        let vcsim = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>The object has already been deleted</faultstring><detail><ManagedObjectNotFoundFault xmlns="urn:vim25" xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="ManagedObjectNotFound"><obj type="VirtualMachine">vm-9</obj></ManagedObjectNotFoundFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        let f = soap_fault(&body(vcsim)).unwrap();
        let e = Error::from_fault("RetrievePropertiesEx", &f.fault_type, &f.message);
        assert!(
            matches!(e, Error::NotFound { .. }) && !e.is_retryable(),
            "{e:?}"
        );

        // Without xsi:type the element name tells the type.
        let bare = r#"<Envelope><Body><Fault><faultstring></faultstring><detail><TaskInProgressFault/></detail></Fault></Body></Envelope>"#;
        let f = soap_fault(&body(bare)).unwrap();
        assert_eq!(f.fault_type, "TaskInProgress");
        assert!(Error::from_fault("PowerOnVM_Task", &f.fault_type, "").is_retryable());
    }

    #[test]
    fn task_errors_and_missing_sets_are_read() {
        let info = xml::parse(r#"<val xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="LocalizedMethodFault"><fault xsi:type="InvalidPowerState"><requestedState>poweredOn</requestedState></fault><localizedMessage>The attempted operation cannot be performed in the current state (Powered on).</localizedMessage></val>"#).unwrap();
        let f = method_fault(&info);
        let e = Error::from_fault("PowerOnVM_Task", &f.fault_type, &f.message);
        assert!(matches!(e, Error::InvalidPowerState { .. }), "{e:?}");
        assert!(e.to_string().contains("PowerOnVM_Task") && e.to_string().contains("Powered on"));

        let resp = xml::parse(r#"<RetrievePropertiesExResponse xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><returnval><objects><obj type="VirtualMachine">vm-1</obj><missingSet><path>name</path><fault><fault xsi:type="NotAuthenticated"></fault></fault></missingSet></objects></returnval></RetrievePropertiesExResponse>"#).unwrap();
        assert!(missing_set_not_authenticated(&resp));
    }

    #[test]
    fn requests_escape_values() {
        let r = MoRef::new("Folder", "group-<1>");
        assert_eq!(r.xml("obj"), "<obj type=\"Folder\">group-&lt;1&gt;</obj>");
        assert!(envelope("<X/>").contains("<soapenv:Body><X/></soapenv:Body>"));
    }
}
