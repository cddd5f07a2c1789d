// The two browsers the web UI is tested in, behind one small interface, so that every scenario
// (scenarios.mjs) is written once and runs in both:
//
//   const browser = await launchChromium();       // or launchFirefox()
//   const page = await browser.newPage({ width, height });
//   page.goto(url) / reload() / setViewport(width, height) / screenshot(path, fullPage) / close()
//   page.evaluate(fn, arg) / evaluateHandle(fn, arg)     (one argument, serialisable)
//   page.click(el) / fill(el, text) / setFiles(el, path) / select(el, value)   (el: an element handle)
//   page.problems                                  what the page reported that a test must not allow
//   page.requests                                  the URL of every request the page made, in order
//   browser.close()
//
// Chromium is Debian's, driven by playwright-core over the DevTools protocol; Firefox is
// Debian's firefox-esr, driven by puppeteer-core over WebDriver BiDi. Neither is downloaded,
// and both are started with what keeps them off the network.

// What a page reports that fails a test: script errors, console errors, and any console
// message about an input's invalid `pattern` (browsers then skip the input's check). Chromium
// also logs every API answer with a 4xx status (e.g. a refused join) as a console error: those
// are the agent answering in words, which the page shows, not a fault of the page.
function collectProblems(problems, type, text, url) {
  if (type === "error" && /^Failed to load resource: the server responded with a status of 4\d\d/.test(text) && /\/api\//.test(url || "")) {
    return;
  }
  if (type === "error" || ((type === "warning" || type === "warn") && /pattern|regular expression/i.test(text))) {
    problems.push(`console ${type}: ${text}${url ? ` (${url})` : ""}`);
  }
}

export async function launchChromium() {
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--no-first-run", "--disable-sync", "--disable-default-apps", "--disable-domain-reliability",
      "--metrics-recording-only", "--no-pings"],
  });
  return {
    name: "chromium",
    screenshots: true,
    async newPage({ width, height }) {
      const page = await browser.newPage({ viewport: { width, height } });
      const problems = [];
      page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
      page.on("console", (m) => collectProblems(problems, m.type(), m.text(), m.location().url));
      const requests = [];
      page.on("request", (r) => requests.push(r.url()));
      return {
        problems,
        requests,
        goto: (url) => page.goto(url),
        reload: () => page.reload(),
        setViewport: (w, h) => page.setViewportSize({ width: w, height: h }),
        screenshot: (path, fullPage = false) => page.screenshot({ path, fullPage }),
        evaluate: (fn, arg) => page.evaluate(fn, arg),
        evaluateHandle: (fn, arg) => page.evaluateHandle(fn, arg),
        click: (el) => el.click(),
        fill: (el, text) => el.fill(text),
        setFiles: (el, path) => el.setInputFiles(path),
        select: (el, value) => el.selectOption(value),
        close: () => page.close(),
      };
    },
    close: () => browser.close(),
  };
}

export async function launchFirefox() {
  const { default: puppeteer } = await import("puppeteer-core");
  const browser = await puppeteer.launch({
    browser: "firefox",
    executablePath: process.env.FIREFOX || "/usr/bin/firefox-esr",
    headless: true,
    extraPrefsFirefox: {
      "datareporting.policy.dataSubmissionEnabled": false,
      "datareporting.healthreport.uploadEnabled": false,
      "toolkit.telemetry.enabled": false,
      "toolkit.telemetry.unified": false,
      "app.update.auto": false,
      "app.update.enabled": false,
      "app.normandy.enabled": false,
      "network.captive-portal-service.enabled": false,
      "network.connectivity-service.enabled": false,
      "network.dns.disablePrefetch": true,
      "network.prefetch-next": false,
      "browser.region.network.url": "",
      "browser.region.update.enabled": false,
      "browser.safebrowsing.update.enabled": false,
      "extensions.getAddons.cache.enabled": false,
      "extensions.blocklist.enabled": false,
      "media.gmp-manager.updateEnabled": false,
    },
  });
  return {
    name: "firefox",
    screenshots: false,
    async newPage({ width, height }) {
      const page = await browser.newPage();
      await page.setViewport({ width, height });
      const problems = [];
      page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
      page.on("console", (m) => collectProblems(problems, m.type(), m.text(), (m.location() || {}).url));
      const requests = [];
      page.on("request", (r) => requests.push(r.url()));
      return {
        problems,
        requests,
        goto: (url) => page.goto(url),
        reload: () => page.reload(),
        setViewport: (w, h) => page.setViewport({ width: w, height: h }),
        screenshot: (path, fullPage = false) => page.screenshot({ path, fullPage }),
        evaluate: (fn, arg) => page.evaluate(fn, arg),
        evaluateHandle: (fn, arg) => page.evaluateHandle(fn, arg),
        click: (el) => el.click(),
        // Sets the value the way a paste does, with the events a user's input fires.
        fill: async (el, text) => {
          await el.focus();
          await el.evaluate((node, value) => {
            node.value = value;
            node.dispatchEvent(new InputEvent("input", { bubbles: true, inputType: "insertFromPaste" }));
            node.dispatchEvent(new Event("change", { bubbles: true }));
          }, text);
        },
        setFiles: (el, path) => el.uploadFile(path),
        select: (el, value) => el.select(value),
        close: () => page.close(),
      };
    },
    close: () => browser.close(),
  };
}
