// The demo page of a site written by `bitfit export-web`: pick a task, type texts, see labels, scores and time.
// window.bitfitSite / window.bitfitReady let a test (or a curious person's console) reach the loaded site.
import { loadSite } from "./bitfit.js";

const $ = (id) => document.getElementById(id);
const kb = (n) => `${(n / 1024).toFixed(1)} KB`;
const mb = (n) => `${(n / 2 ** 20).toFixed(1)} MB`;
const ms = (x) => `${x.toFixed(1)} ms`;

function showError(e) {
  $("error").textContent = e && e.message ? e.message : String(e);
  $("error").hidden = false;
  $("answer").hidden = true;
}

function taskInfo(site) {
  const name = $("task").value;
  const t = site.tasks.find((x) => x.name === name);
  const loaded = site.stats.tasks[name];
  $("task-info").textContent = `${t.task_kind}, version ${t.digest.slice(0, 12)}` +
    (loaded ? ` · loaded in ${ms(loaded.ms)}, ${kb(loaded.bytes)}` : " · fetched on first use");
}

async function run(site) {
  $("error").hidden = true;
  const name = $("task").value;
  const lines = (el) => el.value.split("\n").filter((l) => l.trim());
  const texts = lines($("texts"));
  const entry = await site.task(name).catch((e) => { showError(e); return null; });
  if (!entry) return;
  const pairs = entry.textPair ? lines($("pairs")) : null;
  $("run").disabled = true;
  try {
    const out = await site.predict(name, texts, pairs);
    const body = $("results").querySelector("tbody");
    body.replaceChildren(...out.records.map((r, i) => {
      const tr = document.createElement("tr");
      const score = out.kind === "regression" ? r.label.toFixed(4) : Math.max(...Object.values(r.scores)).toFixed(3);
      for (const [cls, text] of [["text", texts[i]], ["label", String(out.kind === "regression" ? "value" : r.label)], ["score", score]]) {
        const td = document.createElement("td");
        td.className = cls;
        td.textContent = text;
        tr.append(td);
      }
      return tr;
    }));
    $("timing").textContent = `${texts.length} text${texts.length > 1 ? "s" : ""} in ${ms(out.ms.total)} ` +
      `(tokenize ${ms(out.ms.tokenize)}, graph ${ms(out.ms.run)}${out.ms.task > 1 ? `, task load ${ms(out.ms.task)}` : ""}) · ` +
      `task ${name}, version ${out.digest.slice(0, 12)}`;
    $("answer").hidden = false;
    taskInfo(site);
  } catch (e) {
    showError(e);
  } finally {
    $("run").disabled = false;
  }
}

async function main() {
  const site = await loadSite(new URL(".", location.href));
  window.bitfitSite = site;
  const idx = site.index;
  document.title = idx.title || document.title;
  $("title").textContent = idx.title || $("title").textContent;
  $("task").replaceChildren(...site.tasks.map((t) => new Option(`${t.name} (${t.task_kind})`, t.name)));
  $("texts").value = "An utterly charming film with a terrific cast.\nWhere is the Eiffel Tower?\n" +
    "URGENT! You have won a 1 week FREE membership. Text WIN to 80086 now!";
  $("status").textContent = `Graph loaded in ${ms(site.stats.loadMs)}: ${mb(site.stats.graphBytes)} ` +
    `(${idx.graph.precision}), ${site.tasks.length} tasks, onnxruntime-web ${idx.runtime["onnxruntime-web"]} on ` +
    `${site.stats.threads} wasm thread${site.stats.threads > 1 ? "s" : ""}.`;
  $("about").textContent = `base model ${idx.base_model_type}, fingerprint ${idx.base_fingerprint.slice(0, 12)}…, ` +
    `exported by bitfit ${idx.tool_version}`;
  const pick = async () => {
    const entry = await site.task($("task").value).catch((e) => { showError(e); return null; });
    $("pairs-box").hidden = !(entry && entry.textPair);
    if (entry) taskInfo(site);
  };
  $("task").addEventListener("change", () => { $("error").hidden = true; pick(); });
  $("form").addEventListener("submit", (ev) => { ev.preventDefault(); run(site); });
  $("task").disabled = false;
  $("run").disabled = false;
  taskInfo(site);
  return site;
}

window.bitfitReady = main();
window.bitfitReady.catch((e) => { $("status").textContent = "The site could not be loaded."; showError(e); });
