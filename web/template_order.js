// The pack's workflow templates in their numbered order (1_basic first) in ComfyUI's Templates browser.
//
// ComfyUI lists a pack's templates in the order its file system returns them (app/custom_node_manager.py globs the
// folder and does not sort: hash order on Linux), and the frontend keeps that order. This extension sorts this
// pack's list, numbers compared as numbers, where the frontend fetches it. It changes nothing else, and does
// nothing on a frontend without api.getWorkflowTemplates.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// This file is served as /extensions/<the pack's folder name>/template_order.js; the templates are listed under
// the same folder name.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-2));

export function sortTemplates(templates, pack = PACK) {
  const names = templates?.[pack];
  if (Array.isArray(names)) {
    names.sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
  }
  return templates;
}

app.registerExtension({
  name: "fusion_style.TemplateOrder",
  init() {
    const list = api.getWorkflowTemplates;
    if (typeof list !== "function") return;
    api.getWorkflowTemplates = async function (...args) {
      return sortTemplates(await list.apply(this, args));
    };
  },
});
