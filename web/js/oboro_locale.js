// Two gaps of ComfyUI frontend 1.32 that a pack can only close from the page; both leave the page as
// it was when the frontend's internals are not where 1.32 has them.
//
// 1. Japanese (any non-English) node names. The frontend merges every pack's locales (/i18n) into
//    vue-i18n at start-up, then lazy-loads its own bundle for the chosen language with
//    setLocaleMessage, which replaces what was merged: oboro's Japanese names, tooltips and
//    categories vanish and the English ones show. Once the frontend's bundle is in, we merge /i18n
//    for that language again and reload the node definitions (as the frontend does after a change
//    of language).
// 2. Template titles. The template browser titles a pack's templates by file name, with the file
//    name again as description. Cards of our templates get the title and one-line description of
//    locales/<lang>/main.json "oboroTemplates" (served by /i18n with the rest of our locales).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const PROBE_KEY = "nodeDefs.OboroSampler.display_name";  // present in every language we ship
const CARD = '[data-testid^="template-workflow-"]';

function i18n() {
  const vue = document.getElementById("vue-app")?.__vue_app__;
  const symbol = vue?.__VUE_I18N_SYMBOL__;
  const global = symbol ? vue._context?.provides?.[symbol]?.global : undefined;
  return global?.mergeLocaleMessage && global?.te ? global : undefined;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function restoreLocale(wanted, tries = 120) {
  for (let i = 0; i < tries; i++) {  // the frontend sets the locale once its bundle has loaded
    const g = i18n();
    if (!g) return;
    const locale = g.locale.value;
    if (locale === wanted || (!wanted && locale)) {
      if (g.te(PROBE_KEY, locale)) return;  // nothing was replaced (English, or already restored)
      const packs = await api.getCustomNodesI18n();
      if (!packs?.[locale]) return;
      g.mergeLocaleMessage(locale, packs[locale]);
      await app.extensionManager?.command?.execute("Comfy.RefreshNodeDefinitions");
      return;
    }
    await sleep(250);
  }
}

function titleCards(root) {
  const g = i18n();
  if (!g) return;
  for (const card of root.querySelectorAll(CARD)) {
    const name = card.dataset.testid.slice("template-workflow-".length);
    const key = `oboroTemplates.${name}`;
    if (!g.te(`${key}.title`) && !g.te(`${key}.title`, "en")) continue;  // not ours
    const set = (el, text) => {
      if (el && el.textContent !== text) { el.textContent = text; el.title = text; }
    };
    set(card.querySelector("h3"), g.t(`${key}.title`));
    set(card.querySelector("p"), g.t(`${key}.description`));
  }
}

app.registerExtension({
  name: "oboro.locale",
  async setup() {
    let pending = false;
    new MutationObserver(() => {
      if (pending || !document.querySelector(CARD)) return;
      pending = true;
      requestAnimationFrame(() => { pending = false; titleCards(document); });
    }).observe(document.body, { childList: true, subtree: true, characterData: true });
    app.ui.settings.addEventListener("Comfy.Locale.change", (e) => restoreLocale(e.detail?.value));
    await restoreLocale(app.ui.settings.getSettingValue("Comfy.Locale"));
  },
});
