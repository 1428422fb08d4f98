// The status page in a real browser: Debian's chromium, headless, driven by playwright-core.
// Run by tests/browser.rs against a real lifeguard (with --admin-token) in front of the
// NapCat simulator, with 2 event sessions and 1 API session open.
//
// Environment: ADMIN_URL, ADMIN_TOKEN, SELF_ID, CHROMIUM (executable), SHOTS (directory for
// the screenshots), PROFILE (a fresh user-data directory).
// Prints one line per step; exits non-zero with the reason on the first failure.

import { chromium } from "playwright-core";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const ADMIN = env("ADMIN_URL");
const TOKEN = env("ADMIN_TOKEN");
const SELF_ID = env("SELF_ID");
const SHOTS = env("SHOTS");
const STEP_MS = 8000;

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

async function text(page, sel) {
  return (await page.locator(sel).textContent())?.trim() ?? "";
}

// Wait until the page itself shows `want` in `sel` (no reload: the page refreshes alone).
async function until(page, sel, want) {
  await page.waitForFunction(
    ([s, w]) => document.querySelector(s)?.textContent.trim() === w,
    [sel, want],
    { timeout: STEP_MS },
  );
}

const context = await chromium.launchPersistentContext(env("PROFILE"), {
  executablePath: env("CHROMIUM"),
  headless: true,
  // The machine has no network but loopback: nothing in the background may try it.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1280, height: 1000 },
});
let failed = false;
const page = context.pages()[0] ?? (await context.newPage());
const consoleLines = [];
page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
try {
  const external = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(ADMIN)) external.push(r.url());
  });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  // 1. Without the token: the form that asks for it, and nothing else.
  const first = await page.goto(ADMIN + "/");
  check(first.status() === 401, "the page without a token answers 401");
  check((await page.locator("#transitions").count()) === 0, "no state is shown without the token");
  await page.fill("#token", TOKEN);
  await page.click("button[type=submit]");
  await page.waitForSelector("body[data-loaded='1']", { timeout: STEP_MS });
  check((await text(page, "#state")) === "UP", "state UP");
  check((await text(page, "#cause-word")) === "healthy", "cause healthy");
  check((await text(page, "#reason")) === "backend healthy", "reason shown");
  check(/ago\)$/.test(await text(page, "#since")), "since when");
  check((await text(page, "#self-id")) === SELF_ID, `self id ${SELF_ID}`);
  check((await text(page, "#account")) === "online", "account online");
  const open = (path) => text(page, `#sessions tr[data-transport='forward'][data-path='${path}'] td.n`);
  check((await open("event")) === "1" && (await open("universal")) === "1" && (await open("api")) === "1",
    "open sessions by transport and path");
  check((await page.locator("#transitions tbody tr").count()) >= 1, "the start-up transition listed");
  await page.screenshot({ path: `${SHOTS}/status-page-up.png`, fullPage: true });

  // 2. Disable, with its confirmation accepted: sessions closed, the timeline shows it.
  let asked = "";
  page.once("dialog", (d) => { asked = d.message(); d.accept(); });
  await page.click("#disable");
  await until(page, "#state", "DOWN");
  check(asked.includes("Disable the backend?"), "disable asks for confirmation");
  check((await text(page, "#cause-word")) === "admin", "cause admin after disable");
  const newest = page.locator("#transitions tbody tr").first();
  check((await newest.getAttribute("data-cause")) === "admin", "newest transition: admin");
  check((await newest.locator("td").nth(5).textContent()) === "3", "it closed the 3 sessions");
  await page.waitForFunction(
    () => document.querySelector("#sessions-total")?.textContent.startsWith("0 "),
    null,
    { timeout: STEP_MS },
  );
  check(true, "no session left open");
  check((await page.locator("#timeline rect[data-cause='admin']").count()) === 1, "the timeline draws the down span");
  check(await page.locator("#disable").isDisabled(), "disable is off while disabled");
  await page.screenshot({ path: `${SHOTS}/status-page-disabled.png`, fullPage: true });

  // 3. Enable: a dismissed confirmation changes nothing; an accepted one enables.
  page.once("dialog", (d) => d.dismiss());
  await page.click("#enable");
  await page.waitForTimeout(300);
  check((await text(page, "#state")) === "DOWN", "a dismissed confirmation changes nothing");
  page.once("dialog", (d) => d.accept());
  await page.click("#enable");
  await until(page, "#state", "UP");
  check(true, "enable brings it back");

  // 4. It refreshes by itself: a change made elsewhere shows without a reload.
  const post = (p) => fetch(ADMIN + p, { method: "POST", headers: { Authorization: `Bearer ${TOKEN}` } });
  check((await post("/disable")).status === 200, "POST /disable from elsewhere");
  await until(page, "#state", "DOWN");
  check(true, "the page saw it without a reload");
  check((await post("/enable")).status === 200, "POST /enable from elsewhere");
  await until(page, "#state", "UP");

  // 5. A reload keeps the token (this tab's sessionStorage), never in the address.
  await page.reload();
  await page.waitForSelector("body[data-loaded='1']", { timeout: STEP_MS });
  check((await text(page, "#state")) === "UP", "after a reload, still signed in");
  check(!page.url().includes(TOKEN), "the token is not in the address");
  check((await page.locator("#transitions tbody tr").count()) >= 5, "five transitions listed");
  await page.screenshot({ path: `${SHOTS}/status-page.png`, fullPage: true });

  check(external.length === 0, `no request left the admin listener (${external.join(", ")})`);
  check(errors.length === 0, `no script errors (${errors.join("; ")})`);
  console.log("PASS");
} catch (e) {
  failed = true;
  console.error(`FAIL: ${e.message}`);
  console.error(`console:\n${consoleLines.join("\n")}`);
  await page.screenshot({ path: `${SHOTS}/status-page-failure.png`, fullPage: true }).catch(() => {});
} finally {
  await context.close();
}
process.exit(failed ? 1 : 0);
