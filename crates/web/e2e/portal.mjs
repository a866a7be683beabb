// Browser test of the Basphere portal in Debian's headless Chromium, driven by playwright-core.
// Started by crates/web/tests/browser.rs against an in-process server (do-nothing test provider).
// Env: BASE_URL, ADMIN_TOKEN, OTHER_VM (a VM of another user), BASTION_HOST, SHOT_DIR.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { randomBytes } from "node:crypto";

const BASE = process.env.BASE_URL;
const ADMIN_TOKEN = process.env.ADMIN_TOKEN;
const OTHER_VM = process.env.OTHER_VM;
const BASTION = process.env.BASTION_HOST;
const SHOTS = process.env.SHOT_DIR;
mkdirSync(SHOTS, { recursive: true });

// The launch flags known to work on this machine (no network but loopback); playwright's
// launch() gives every run a fresh, empty --user-data-dir of its own.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
let passed = 0;
let failed = 0;
const consoleErrors = [];
// Navigations that answer an error status on purpose; Chromium logs those as console errors.
const expectedStatus = new Set();

function ed25519Key(comment) {
  const t = Buffer.from("ssh-ed25519");
  const len = (n) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; };
  const blob = Buffer.concat([len(t.length), t, len(32), randomBytes(32)]);
  return `ssh-ed25519 ${blob.toString("base64")} ${comment}`;
}

async function newPage(who) {
  const ctx = await browser.newContext({ viewport: DESKTOP });
  const page = await ctx.newPage();
  page.setDefaultTimeout(15000);
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    const url = m.location().url || "";
    const path = url.startsWith(BASE) ? new URL(url).pathname : url;
    if (m.text().startsWith("Failed to load resource") && expectedStatus.has(path)) return;
    consoleErrors.push(`${who} ${page.url()}: ${m.text()} (${url})`);
  });
  page.on("pageerror", (e) => consoleErrors.push(`${who} ${page.url()}: ${e.message}`));
  return page;
}

async function shot(page, name) {
  await page.setViewportSize(DESKTOP);
  await page.screenshot({ path: `${SHOTS}/${name}-desktop.png`, fullPage: true });
  await page.setViewportSize(PHONE);
  await page.screenshot({ path: `${SHOTS}/${name}-phone.png`, fullPage: true });
  await page.setViewportSize(DESKTOP);
}

async function check(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    passed++;
    console.log(`PASS ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e.stack || e}`);
  }
}

function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

async function go(page, path) {
  return page.goto(BASE + path, { waitUntil: "load" });
}

// Clicks something that submits a form; returns the final response of the navigation.
async function submit(page, locator) {
  const [resp] = await Promise.all([page.waitForNavigation({ waitUntil: "load" }), locator.click()]);
  return resp;
}

const user = await newPage("user");
const admin = await newPage("admin");
const KEY = ed25519Key("dora@laptop");
let code = "";

await check("bad registration shows every field's error inline and keeps the input", async () => {
  await go(user, "/register");
  await shot(user, "01-register");
  await user.getByLabel("Username").fill("dora-bad");
  await user.getByLabel("Email").fill("not-an-email");
  await user.getByLabel("Team").fill("");
  await user.getByLabel("SSH public key").fill("ssh-ed25519 not-base64!!");
  expectedStatus.add("/register");
  const r = await submit(user, user.getByRole("button", { name: "Register" }));
  assert(r.status() === 400, `status ${r.status()}`);
  for (const f of ["email", "public_key"]) {
    const n = await user.locator(`.field-error[data-field="${f}"]`).count();
    assert(n === 1, `no inline error for ${f}`);
  }
  for (const f of ["username", "team"]) {
    const n = await user.locator(`.field-error[data-field="${f}"]`).count();
    assert(n === 0, `${f} was valid (team is optional)`);
  }
  assert((await user.getByLabel("Username").inputValue()) === "dora-bad", "input kept");
  assert((await user.getByLabel("Email").getAttribute("aria-invalid")) === "true", "aria-invalid");
  await shot(user, "02-register-errors");
});

await check("register in the browser", async () => {
  await user.getByLabel("Username").fill("dora");
  await user.getByLabel("Email").fill("dora@example.org");
  await user.getByLabel("Team").fill("payments");
  await user.getByLabel("SSH public key").fill(KEY);
  const r = await submit(user, user.getByRole("button", { name: "Register" }));
  assert(r.status() === 200, `status ${r.status()}`);
  assert(user.url().includes("/success"), user.url());
  assert((await user.locator("#registered").textContent()).includes("dora"), "thanks dora");
  await shot(user, "03-success");
});

await check("SSH guide names the bastion for Linux, macOS and Windows", async () => {
  await go(user, "/ssh-guide");
  const text = await user.locator("main").textContent();
  for (const s of ["Linux", "macOS", "Windows", "ssh-keygen -t ed25519", BASTION]) {
    assert(text.includes(s), `guide lacks ${s}`);
  }
  assert((await user.locator("#ssh-config").textContent()).includes(`HostName ${BASTION}`), "config");
  await shot(user, "04-ssh-guide");
});

await check("the API page, from the navigation, lists the operations of the OpenAPI document", async () => {
  await go(user, "/ssh-guide");
  await user.getByRole("navigation", { name: "Main" }).getByRole("link", { name: "API", exact: true }).click();
  await user.waitForLoadState();
  assert(user.url().endsWith("/api-docs"), user.url());
  const doc = await (await user.request.get(`${BASE}/api/v1/openapi.json`)).json();
  const rows = await user.locator("table.api tbody tr").count();
  const ops = Object.values(doc.paths).reduce((n, item) => n + Object.keys(item).length, 0);
  assert(rows === ops, `${rows} rows for ${ops} operations`);
  assert((await user.locator("main").textContent()).includes("POST /api/v1/vms"), "POST /vms listed");
  await shot(user, "04b-api-docs");
});

await check("admin signs in with a token and approves dora", async () => {
  await go(admin, "/signin");
  await shot(admin, "05-signin");
  await admin.getByLabel("API token").fill(ADMIN_TOKEN);
  await submit(admin, admin.getByRole("button", { name: "Sign in", exact: true }));
  assert(admin.url().endsWith("/dashboard"), admin.url());
  await go(admin, "/admin");
  assert((await admin.locator('article[data-user="dora"]').count()) === 1, "dora pending");
  assert((await admin.locator('article[data-user="dora-bad"]').count()) === 0, "bad one not stored");
  await shot(admin, "06-admin-approvals");
  await submit(admin, admin.getByRole("button", { name: "Approve dora" }));
  // The one-time code is in the page (never in a cookie).
  code = ((await admin.locator("#enrollment-code").textContent()) || "").trim();
  assert(code.length >= 16, `no enrollment code in the page: ${code}`);
  await shot(admin, "07-admin-approved");
  await go(admin, "/admin");
  assert((await admin.locator('article[data-user="dora"]').count()) === 0, "dora still pending");
});

await check("dora enrolls with the code and is signed in", async () => {
  await go(user, "/signin");
  await user.getByLabel("Username").fill("dora");
  await user.getByLabel("Enrollment code", { exact: true }).fill(code);
  const r = await submit(user, user.getByRole("button", { name: "Enroll and sign in" }));
  assert(r.status() === 200, `status ${r.status()}`);
  assert((await user.locator("#api-token").textContent()).startsWith("bsp_"), "token shown");
  await shot(user, "08-enrolled");
  await go(user, "/dashboard");
  assert(user.url().endsWith("/dashboard"), user.url());
  assert((await user.locator("#no-vms").count()) === 1, "no VMs yet");
  for (const l of ["VMs", "IP addresses", "vCPUs", "Memory"]) {
    assert((await user.getByText(l, { exact: true }).count()) >= 1, `quota ${l}`);
  }
  await shot(user, "09-dashboard-empty");
});

await check("create a VM: steps progress live to running", async () => {
  await user.getByLabel("Name").fill("web");
  await user.getByLabel("Size").selectOption("small");
  await user.getByLabel("Count").fill("1");
  await submit(user, user.getByRole("button", { name: "Create" }));
  assert((await user.locator("#flash").textContent()).includes("Creating web"), "flash");
  const op = user.locator('.op[data-live="true"]');
  assert((await op.count()) === 1, "one live operation");
  // Mark this document: a live update must change it without a navigation.
  await user.evaluate(() => { window.__marker = 1; });
  const before = await user.locator(".op li.st-done").count();
  await user.waitForFunction(
    (n) => window.__marker === 1 && document.querySelectorAll(".op li.st-done").length > n,
    before,
  );
  await shot(user, "10-dashboard-progress");
  // When the operation ends the page reloads and the row says running.
  await user.locator('tr[data-vm="web"] .badge', { hasText: "running" }).waitFor({ timeout: 30000 });
  const ssh = await user.locator('tr[data-vm="web"] code').textContent();
  assert(/^ssh \S+@10\.\d+\.\d+\.\d+$/.test(ssh), `ssh command: ${ssh}`);
  const ip = await user.locator('tr[data-vm="web"] td[data-label="IP"]').textContent();
  assert(ssh.endsWith(ip), "ssh uses the IP");
  await user.locator('tr[data-vm="web"] button.copy').click();
  await shot(user, "11-dashboard-running");
});

await check("VM page shows the VM and its finished steps", async () => {
  await go(user, "/vms/web");
  assert((await user.locator("#vm-status").textContent()).includes("running"), "running");
  assert((await user.locator(".op li.st-done").count()) >= 3, "steps done");
  await shot(user, "12-vm");
});

await check("a user cannot open another user's VM page (404) nor admin pages (403)", async () => {
  expectedStatus.add(`/vms/${OTHER_VM}`);
  const r = await go(user, `/vms/${OTHER_VM}`);
  assert(r.status() === 404, `status ${r.status()}`);
  assert(!(await user.locator("main").textContent()).includes("10."), "no address leaked");
  await shot(user, "13-vm-404");
  expectedStatus.add(`/vms/${OTHER_VM}/delete`);
  const d = await go(user, `/vms/${OTHER_VM}/delete`);
  assert(d.status() === 404, `delete page status ${d.status()}`);
  expectedStatus.add("/admin");
  const a = await go(user, "/admin");
  assert(a.status() === 403, `admin status ${a.status()}`);
  const api = await user.request.get(`${BASE}/api/v1/vms/${OTHER_VM}`);
  assert(api.status() === 404, `api status ${api.status()}`);
});

await check("a form without its CSRF token is refused (403) and changes nothing", async () => {
  await go(user, "/dashboard");
  await user.getByLabel("Name").fill("nocsrf");
  await user.evaluate(() => document.querySelector('#create-form input[name="csrf"]').remove());
  expectedStatus.add("/vms");
  const r = await submit(user, user.getByRole("button", { name: "Create" }));
  assert(r.status() === 403, `status ${r.status()}`);
  assert((await user.locator("#csrf-refused").count()) === 1, "refusal text");
  await shot(user, "14-csrf-refused");
  // A wrong token, and a cross-origin style POST with the session cookie only, fare no better.
  const wrong = await user.request.post(`${BASE}/vms`, { form: { name: "nocsrf", csrf: "0".repeat(64) } });
  assert(wrong.status() === 403, `wrong token status ${wrong.status()}`);
  const apiPost = await user.request.post(`${BASE}/api/v1/vms`, { data: { name: "nocsrf" } });
  assert(apiPost.status() === 401, `cookie-only API POST status ${apiPost.status()}`);
  await go(user, "/dashboard");
  assert((await user.locator('tr[data-vm="nocsrf"]').count()) === 0, "nothing created");
});

await check("bad create input shows inline errors", async () => {
  await user.getByLabel("Name").fill("Bad_Name");
  await user.getByLabel("Count").fill("11");
  expectedStatus.add("/vms");
  const r = await submit(user, user.getByRole("button", { name: "Create" }));
  assert(r.status() === 400, `status ${r.status()}`);
  assert((await user.locator('.field-error[data-field="name"]').count()) === 1, "name error");
  assert((await user.locator('.field-error[data-field="count"]').count()) === 1, "count error");
  await shot(user, "15-create-errors");
});

await check("key change request, seen by the admin", async () => {
  await go(user, "/key-change");
  await user.getByLabel("New SSH public key").fill(ed25519Key("dora@new-laptop"));
  await submit(user, user.getByRole("button", { name: "Ask for the change" }));
  assert((await user.locator("#flash").textContent()).includes("requested"), "requested");
  await shot(user, "16-key-change");
  await go(admin, "/admin");
  assert((await admin.locator('article[data-key-user="dora"]').count()) === 1, "pending key change");
  await shot(admin, "17-admin-key-change");
  await admin.getByLabel("Reason").fill("please use your work laptop's key");
  await submit(admin, admin.locator('button[id="reject-key-changes-dora"]'));
  assert((await admin.locator("#flash").textContent()).includes("rejected"), "rejected");
});

await check("delete with confirmation; the VM disappears", async () => {
  await go(user, "/dashboard");
  await submit(user, user.getByRole("link", { name: "Delete web" }));
  assert(user.url().endsWith("/vms/web/delete"), user.url());
  await shot(user, "18-delete-confirm");
  await submit(user, user.locator("#confirm-delete"));
  assert((await user.locator("#flash").textContent()).includes("Deleting web"), "flash");
  await user.locator('tr[data-vm="web"]').waitFor({ state: "detached", timeout: 30000 });
  await user.locator("#no-vms").waitFor();
  await shot(user, "19-dashboard-deleted");
});

await check("admin pages: users with quota edit, all VMs with owner, audit trail", async () => {
  await go(admin, "/admin/users");
  await admin.locator("#q-dora-max_vms").fill("5");
  await submit(admin, admin.locator("#save-dora"));
  assert((await admin.locator("#flash").textContent()).includes("quota of dora updated"), "saved");
  assert((await admin.locator("#q-dora-max_vms").inputValue()) === "5", "new value shown");
  await shot(admin, "20-admin-users");
  await go(admin, "/admin/vms");
  const row = admin.locator(`tr[data-vm="${OTHER_VM}"]`);
  assert((await row.count()) === 1, "other VM listed");
  assert((await row.locator('td[data-label="Owner"]').textContent()) === "carol", "owner shown");
  await shot(admin, "21-admin-vms");
  await go(admin, "/admin/audit");
  const audit = await admin.locator("#audit-table").textContent();
  for (const s of ["dora", "vm.", "web:tcp:"]) assert(audit.includes(s), `audit lacks ${s}`);
  await shot(admin, "22-admin-audit");
});

await check("keyboard: skip link and form reachable by Tab", async () => {
  // A page showing a live operation reloads itself when the operation ends (taking the focus
  // with it): wait for one with none.
  for (let i = 0; ; i++) {
    await go(user, "/dashboard");
    if ((await user.locator('.op[data-live="true"]').count()) === 0) break;
    assert(i < 60, "an operation stayed live for 30 s");
    await user.waitForTimeout(500);
  }
  await user.keyboard.press("Tab");
  const first = await user.evaluate(() => document.activeElement.textContent);
  assert(first.includes("Skip to content"), `first tab stop: ${first}`);
  await user.keyboard.press("Enter");
  await user.waitForURL(/#main$/, { timeout: 5000 });
});

await check("sign out ends the session", async () => {
  await submit(user, user.getByRole("button", { name: "Sign out" }));
  assert((await user.locator("#flash").textContent()).includes("Signed out"), "flash");
  await go(user, "/dashboard");
  assert(user.url().endsWith("/signin"), user.url());
  const api = await user.request.get(`${BASE}/api/v1/vms`);
  assert(api.status() === 401, `api after sign-out ${api.status()}`);
});

await check("signed out, a lost key is replaced by asking with username and email", async () => {
  await go(user, "/key-change");
  assert(user.url().endsWith("/key-change"), user.url());
  await user.getByLabel("Username").fill("dora");
  await user.getByLabel("Registered email").fill("dora@example.org");
  await user.getByLabel("New SSH public key").fill(ed25519Key("dora@found-laptop"));
  await user.getByLabel("Reason (optional)").fill("lost laptop");
  const r = await submit(user, user.getByRole("button", { name: "Ask for the new key" }));
  assert(r.status() === 200, `status ${r.status()}`);
  assert(user.url().includes("/key-change-success"), user.url());
  assert((await user.locator("#key-change-received").textContent()).includes("dora"), "thanks dora");
  await shot(user, "18-key-change-signed-out");
});

await check("no console errors on any page", async () => {
  assert(consoleErrors.length === 0, consoleErrors.join("\n"));
});

await browser.close();
console.log(`screenshots: ${SHOTS}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
