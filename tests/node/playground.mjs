// Drives the browser playground (dist/web, scripts/build-web) in headless Chromium through
// puppeteer-core: opens URL, waits for the page's answer (window.playgroundResult), saves a
// screenshot, and prints the result as JSON on stdout (with the page's console on stderr).
//
//   node tests/node/playground.mjs URL SCREENSHOT.png [TIMEOUT_SECONDS]
//
// CHROMIUM names the browser binary (default /usr/bin/chromium, Debian's `chromium`);
// CHROMIUM_FLAGS adds flags (space-separated), e.g. V8's through --js-flags=...
import puppeteer from "puppeteer-core";

const [url, screenshot, timeoutSeconds = "600"] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node playground.mjs URL SCREENSHOT.png [TIMEOUT_SECONDS]");
  process.exit(2);
}

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  // --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
  args: ["--no-sandbox", "--disable-dev-shm-usage", ...(process.env.CHROMIUM_FLAGS?.split(" ").filter(Boolean) ?? [])],
});
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 900, height: 640 });
  page.on("console", (msg) => console.error(`[page ${msg.type()}] ${msg.text()}`));
  page.on("pageerror", (err) => console.error(`[page error] ${err.message}`));
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => window.playgroundResult !== undefined, {
    timeout: Number(timeoutSeconds) * 1000,
    polling: 500,
  });
  const result = await page.evaluate(() => window.playgroundResult);
  result.status = await page.$eval("#status", (el) => el.textContent);
  result.shown = await page.$eval("#answer", (el) => el.textContent);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
