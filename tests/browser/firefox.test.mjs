// The web UI's scenarios (scenarios.mjs) in Debian's Firefox ESR, driven by puppeteer-core over
// WebDriver BiDi.
import { scenarios } from "./scenarios.mjs";
import { launchFirefox } from "./drivers.mjs";

scenarios("firefox", launchFirefox);
