// The web UI's scenarios (scenarios.mjs) in Debian's Chromium, driven by playwright-core; this
// run also saves the screenshots in docs/screenshots/.
import { scenarios } from "./scenarios.mjs";
import { launchChromium } from "./drivers.mjs";

scenarios("chromium", launchChromium);
