// A headless Chromium held open for a test or a benchmark: commands come one JSON object per line on stdin,
// answers go one JSON object per line to stdout ({"ok": true, "value": ...} or {"ok": false, "error": "..."}).
//
// It drives the system's Chromium (Debian's /usr/bin/chromium, or CHROMIUM) through playwright-core, which
// never downloads a browser. Commands:
//   {"op": "goto", "url": U}                 open a page (waits for its load event); clears the two logs below
//   {"op": "eval", "js": "async () => ..."}  run a function in the page and return its (JSON) value
//   {"op": "fill", "selector": S, "value": V} / {"op": "select", "selector": S, "value": V} / {"op": "click", "selector": S}
//   {"op": "wait", "selector": S, "text": T?, "timeout_ms": N?}  wait until S is visible (and holds T)
//   {"op": "text", "selector": S}            the element's inner text
//   {"op": "screenshot", "path": P}          a PNG of the whole page
//   {"op": "requests"}                       every request the page made so far: [{url, status, bytes}]
//                                            (bytes: headers and body as received, -1 where unknown)
//   {"op": "console"}                        the page's console messages and errors so far
//   {"op": "close"}
import { createInterface } from "node:readline";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
if (!existsSync(executablePath)) {
  console.log(JSON.stringify({ ok: false, error: `no Chromium at ${executablePath}: install Debian's chromium or set CHROMIUM` }));
  process.exit(3);
}
const profile = mkdtempSync(join(tmpdir(), "bitfit-chromium-"));
// the flags this machine needs (docs: ../../docs/web.md): no sandbox as root, no GPU, no calls home
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--disable-quic"],
  viewport: { width: 1100, height: 800 },
});
const page = context.pages()[0] ?? (await context.newPage());
const requests = [];
const consoleLines = [];
page.on("requestfinished", async (request) => {
  const response = await request.response();
  const sizes = await request.sizes().catch(() => null);
  requests.push({ url: request.url(), status: response ? response.status() : 0,
                  bytes: sizes ? sizes.responseBodySize + sizes.responseHeadersSize : -1 });
});
page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));

async function run(cmd) {
  switch (cmd.op) {
    case "goto":  // a new page: the request and console logs start again
      requests.length = 0;
      consoleLines.length = 0;
      await page.goto(cmd.url, { waitUntil: "load" });
      return page.url();
    case "eval": return await page.evaluate(`(${cmd.js})()`);
    case "fill": await page.fill(cmd.selector, cmd.value); return null;
    case "select": await page.selectOption(cmd.selector, cmd.value); return null;
    case "click": await page.click(cmd.selector); return null;
    case "wait": {
      const loc = cmd.text === undefined ? page.locator(cmd.selector) : page.locator(cmd.selector, { hasText: cmd.text });
      await loc.first().waitFor({ state: "visible", timeout: cmd.timeout_ms ?? 60000 });
      return null;
    }
    case "text": return await page.innerText(cmd.selector);
    case "screenshot": await page.screenshot({ path: cmd.path, fullPage: true }); return cmd.path;
    case "requests": return requests;
    case "console": return consoleLines;
    default: throw new Error(`unknown op ${JSON.stringify(cmd.op)}`);
  }
}

async function close() {
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}

const lines = createInterface({ input: process.stdin });
console.log(JSON.stringify({ ok: true, value: "ready" }));
for await (const line of lines) {
  if (!line.trim()) continue;
  let cmd;
  try { cmd = JSON.parse(line); } catch (e) { console.log(JSON.stringify({ ok: false, error: `bad command: ${e.message}` })); continue; }
  if (cmd.op === "close") break;
  try {
    const value = await run(cmd);
    console.log(JSON.stringify({ ok: true, value: value === undefined ? null : value }));
  } catch (e) {
    console.log(JSON.stringify({ ok: false, error: String(e && e.message ? e.message : e) }));
  }
}
await close();
