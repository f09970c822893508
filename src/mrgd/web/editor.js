// The box editor: a canvas of labelled region boxes and the table of their fields, one document for both.
// Run by Gradio's gr.HTML as its js_on_load, with `element` (this component's root), `props` (props.value is the
// document as JSON, props.colors the role colours of mrgd.render) and `watch`. See mrgd/web/app.py for why this
// is plain JS. The document's format is mrgd/web/state.py's: boxes are [x, y, w, h] fractions of the canvas;
// the table shows them in canvas pixels. Every change is pushed to props.value, where Python reads it when a
// button asks; a document that Python sends (a loaded file) arrives through watch('value').

const COLORS = props.colors;      // role -> "rgb(r, g, b)", the grid.png colours
const REMOVED = props.removed;    // the target prompt that removes a region from the target
const DISPLAY = 512;              // the canvas is shown at most this many screen pixels per side
const HISTORY = 100;              // undo steps kept

let doc = JSON.parse(props.value);
let selected = -1;                // index of the selected region, -1 for none
let drag = null;                  // the pointer gesture in progress
let history = [];                 // earlier documents, as JSON, newest last
let focusSnapshot = null;         // the document when a table cell got focus (undo of typing)

const make = (tag, cls, parent) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (parent) parent.appendChild(node);
  return node;
};

// ---------------------------------------------------------------------------------------------- the page
const root = make("div", "mrgd-editor");
element.appendChild(root);
const left = make("div", "mrgd-left", root);  // the canvas and its tools; the table beside it (below when narrow)
const toolbar = make("div", "mrgd-toolbar", left);
for (const [act, text, title] of [
  ["undo", "Undo", "Undo the last change (Ctrl+Z)"],
  ["delete", "Delete box", "Delete the selected box from the layout (Delete)"],
  ["remove", "Remove in target", "Keep the selected box in the source, remove it from the target (or restore it)"],
  ["clear", "Clear all", "Delete every box (undoable)"],
]) {
  const button = make("button", "mrgd-tool", toolbar);
  button.type = "button";
  button.dataset.act = act;
  button.textContent = text;
  button.title = title;
}
const legend = make("span", "mrgd-legend", toolbar);
for (const role of ["background", "inherent", "modified", "added", "removed"]) {
  const item = make("span", "mrgd-legend-item", legend);
  item.style.setProperty("--role", COLORS[role]);
  item.textContent = role;
}
const stage = make("div", "mrgd-stage", left);
stage.tabIndex = 0;
stage.setAttribute("aria-label", "canvas: drag to draw a region box");
const picture = make("img", "mrgd-background", stage);
picture.alt = "";
picture.draggable = false;
const rubber = make("div", "mrgd-rubber", stage);
const message = make("div", "mrgd-message", left);
message.setAttribute("role", "status");
const table = make("table", "mrgd-table", make("div", "mrgd-table-wrap", root));
const head = make("tr", "", make("thead", "", table));
const COLUMNS = [["", ""], ["role", "role"], ["id", "id"], ["kind", "kind"], ["x", "x"], ["y", "y"], ["w", "w"],
  ["h", "h"], ["prompt", "prompt"], ["target_prompt", "target prompt"], ["negative_prompt", "negative prompt"],
  ["seed", "seed"], ["feather", "feather"]];
for (const [, text] of COLUMNS) make("th", "", head).textContent = text;
const body = make("tbody", "", table);

// ---------------------------------------------------------------------------------------------- the model
const W = () => doc.size[0];
const H = () => doc.size[1];
const scale = () => Math.min(DISPLAY / W(), DISPLAY / H());
const snapshot = () => JSON.stringify({ size: doc.size, regions: doc.regions });
const round2 = (v) => Math.round(v * 100) / 100;

function roleOf(row) {  // mirrors state.row_role
  const prompt = row.prompt || "", target = row.target_prompt || "";
  if (!prompt.trim()) return target.trim() && target.trim() !== REMOVED ? "added" : null;
  if (target.trim() === REMOVED) return "removed";
  return !target.trim() || target === prompt ? "inherent" : "modified";
}

function colorOf(row) {
  const role = roleOf(row);
  if (!role) return COLORS.invalid;
  return row.kind === "background" && role === "inherent" ? COLORS.background : COLORS[role];
}

function labelOf(row) {
  const role = roleOf(row);
  const text = { inherent: row.prompt, modified: `${row.prompt} \u2192 ${row.target_prompt}`,
    added: `+ ${row.target_prompt}`, removed: `\u2212 ${row.prompt}` }[role] || "(needs a prompt)";
  return `${row.id}: ${text}`;
}

function pixels(row) {  // [x, y, w, h] in canvas pixels
  const [x, y, w, h] = row.box;
  return [x * W(), y * H(), w * W(), h * H()];
}

function setPixels(row, [x, y, w, h]) {
  row.box = [x / W(), y / H(), w / W(), h / H()];
}

function say(text) {
  message.textContent = text || "";
}

function sync() {  // the document Python reads
  props.value = snapshot();
}

function commit(before, rebuild = true) {  // a finished change: undoable, then shown and sent
  if (before !== snapshot()) {
    history.push(before);
    if (history.length > HISTORY) history.shift();
  }
  render(rebuild);
  sync();
}

function undo() {
  if (!history.length) return say("nothing to undo");
  const earlier = JSON.parse(history.pop());
  doc = { ...doc, size: earlier.size, regions: earlier.regions };
  selected = Math.min(selected, doc.regions.length - 1);
  render(true);
  sync();
  say("undone");
}

function freeId() {
  const taken = new Set(doc.regions.map((r) => r.id));
  let n = 1;
  while (taken.has(`r${n}`)) n += 1;
  return `r${n}`;
}

// ---------------------------------------------------------------------------------------------- drawing
function renderStage() {
  const s = scale();
  stage.style.width = `${W() * s}px`;
  stage.style.height = `${H() * s}px`;
  left.style.width = `${Math.max(W() * s, 320)}px`;  // the tools wrap above the canvas, the table keeps the rest
  stage.querySelectorAll(".mrgd-box").forEach((node) => node.remove());
  // backgrounds first, then foregrounds in file order, the selected box on top
  const order = doc.regions.map((r, i) => i);
  order.sort((a, b) => (a === selected) - (b === selected)
    || (doc.regions[b].kind === "background") - (doc.regions[a].kind === "background") || a - b);
  for (const i of order) {
    const row = doc.regions[i];
    const [x, y, w, h] = pixels(row);
    const box = make("div", "mrgd-box", stage);
    box.dataset.index = i;
    box.dataset.id = row.id;
    box.dataset.role = roleOf(row) || "invalid";
    box.style.setProperty("--role", colorOf(row));
    Object.assign(box.style, { left: `${x * s}px`, top: `${y * s}px`, width: `${w * s}px`, height: `${h * s}px` });
    if (i === selected) box.classList.add("mrgd-selected");
    make("span", "mrgd-label", box).textContent = labelOf(row);
    if (i === selected) {
      for (const corner of ["nw", "ne", "sw", "se"]) {
        make("i", `mrgd-handle mrgd-${corner}`, box).dataset.corner = corner;
      }
    }
  }
}

function point(event) {  // the pointer in canvas pixels (fractional), clamped to the canvas
  const rect = stage.getBoundingClientRect();
  const s = scale();
  const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
  return [clamp((event.clientX - rect.left) / s, W()), clamp((event.clientY - rect.top) / s, H())];
}

stage.addEventListener("pointerdown", (event) => {
  if (event.button !== 0) return;
  stage.focus();
  const p = point(event);
  const handle = event.target.closest(".mrgd-handle");
  const node = event.target.closest(".mrgd-box");
  const index = node ? Number(node.dataset.index) : -1;
  const before = snapshot();
  if (handle) {
    drag = { mode: "resize", corner: handle.dataset.corner, index, start: p, orig: pixels(doc.regions[index]), before };
  } else if (node && (doc.regions[index].kind !== "background" || index === selected)) {
    // a background box usually spans the canvas: it moves only once selected, so drawing over it stays easy
    selected = index;
    drag = { mode: "move", index, start: p, orig: pixels(doc.regions[index]), before };
    render(false);
  } else {
    drag = { mode: "draw", start: p, hit: index, before };
  }
  stage.setPointerCapture(event.pointerId);
  event.preventDefault();
});

function dragged(gesture, p) {  // the box the gesture makes now, in canvas pixels
  const [sx, sy] = gesture.start;
  if (gesture.mode === "draw") {
    const x0 = Math.round(Math.min(sx, p[0])), x1 = Math.round(Math.max(sx, p[0]));
    const y0 = Math.round(Math.min(sy, p[1])), y1 = Math.round(Math.max(sy, p[1]));
    return [x0, y0, x1 - x0, y1 - y0];
  }
  const [x, y, w, h] = gesture.orig;
  if (gesture.mode === "move") {
    const nx = Math.min(Math.max(x + Math.round(p[0] - sx), 0), Math.max(W() - w, 0));
    const ny = Math.min(Math.max(y + Math.round(p[1] - sy), 0), Math.max(H() - h, 0));
    return [nx, ny, w, h];
  }
  let [l, t, r, b] = [x, y, x + w, y + h];  // resize: the corner's two edges follow the pointer, 1 pixel at least
  if (gesture.corner.includes("w")) l = Math.min(Math.round(p[0]), r - 1);
  if (gesture.corner.includes("e")) r = Math.max(Math.round(p[0]), l + 1);
  if (gesture.corner.includes("n")) t = Math.min(Math.round(p[1]), b - 1);
  if (gesture.corner.includes("s")) b = Math.max(Math.round(p[1]), t + 1);
  return [l, t, r - l, b - t];
}

stage.addEventListener("pointermove", (event) => {
  if (!drag) return;
  const box = dragged(drag, point(event));
  if (drag.mode === "draw") {
    const s = scale();
    Object.assign(rubber.style, { display: "block", left: `${box[0] * s}px`, top: `${box[1] * s}px`,
      width: `${box[2] * s}px`, height: `${box[3] * s}px` });
    return;
  }
  setPixels(doc.regions[drag.index], box);
  render(false);
});

stage.addEventListener("pointerup", (event) => {
  if (!drag) return;
  const gesture = drag;
  drag = null;
  rubber.style.display = "none";
  const box = dragged(gesture, point(event));
  if (gesture.mode !== "draw") return commit(gesture.before, false);
  if (box[2] >= 1 && box[3] >= 1) {
    const row = { id: freeId(), kind: "foreground", box: [], prompt: "", target_prompt: "", negative_prompt: "",
      seed: null, feather: props.feather, keywords: [], keyword_count: null };
    setPixels(row, box);
    doc.regions.push(row);
    selected = doc.regions.length - 1;
    commit(gesture.before);
    say(`drew ${row.id}: type its prompt (source) and target prompt below`);
    const cell = body.querySelector(`tr[data-index="${selected}"] input[data-field="prompt"]`);
    if (cell) cell.focus({ preventScroll: true });  // the canvas stays where the mouse is
    return;
  }
  // a click, not a drag: select what is under it (a background box, say), or nothing
  const end = point(event);
  const moved = Math.abs(gesture.start[0] - end[0]) > 0.5 || Math.abs(gesture.start[1] - end[1]) > 0.5;
  selected = gesture.hit;
  render(false);
  if (moved) say("a box needs at least one canvas pixel each way; drag further to draw one");
});

stage.addEventListener("pointercancel", () => {
  drag = null;
  rubber.style.display = "none";
});

// ---------------------------------------------------------------------------------------------- the table
const NUMERIC = new Set(["x", "y", "w", "h", "seed", "feather"]);

function cellValue(row, field) {
  const [x, y, w, h] = pixels(row);
  const value = { x, y, w, h }[field];
  if (value !== undefined) return String(round2(value));
  return row[field] === null || row[field] === undefined ? "" : String(row[field]);
}

function renderTable(full) {
  if (full || body.rows.length !== doc.regions.length) {
    body.textContent = "";
    doc.regions.forEach((row, i) => {
      const tr = make("tr", "", body);
      tr.dataset.index = i;
      for (const [field] of COLUMNS) {
        const td = make("td", "", tr);
        if (field === "role") {
          make("span", "mrgd-swatch", td);
        } else if (field === "kind") {
          const select = make("select", "", td);
          select.dataset.field = field;
          for (const kind of ["foreground", "background"]) {
            const option = make("option", "", select);
            option.value = kind;
            option.textContent = kind === "foreground" ? "fg" : "bg";
          }
        } else if (field === "") {
          const button = make("button", "mrgd-row-delete", td);
          button.type = "button";
          button.textContent = "\u00d7";
          button.title = "delete this box";
        } else {
          const input = make("input", "", td);
          input.dataset.field = field;
          input.type = "text";
          if (NUMERIC.has(field)) input.inputMode = "decimal";
          input.classList.add(NUMERIC.has(field) ? "mrgd-number" : field === "id" ? "mrgd-id" : "mrgd-text");
        }
      }
    });
  }
  doc.regions.forEach((row, i) => {
    const tr = body.rows[i];
    tr.classList.toggle("mrgd-selected", i === selected);
    const swatch = tr.querySelector(".mrgd-swatch");
    swatch.style.setProperty("--role", colorOf(row));
    swatch.textContent = roleOf(row) || "no prompt";
    tr.querySelectorAll("[data-field]").forEach((input) => {
      if (input !== document.activeElement) input.value = cellValue(row, input.dataset.field);
    });
  });
}

function render(full) {
  renderStage();
  renderTable(full);
}

body.addEventListener("focusin", (event) => {
  const tr = event.target.closest("tr");
  if (!tr) return;
  focusSnapshot = snapshot();
  if (selected !== Number(tr.dataset.index)) {
    selected = Number(tr.dataset.index);
    renderStage();
    body.querySelectorAll("tr").forEach((r, i) => r.classList.toggle("mrgd-selected", i === selected));
  }
});

function readCell(input) {  // the cell's new value for the document, or an Error saying why it is refused
  const field = input.dataset.field;
  const text = input.value.trim();
  if (!NUMERIC.has(field)) {
    if (field === "id") {
      if (!text) return new Error("an id must not be empty");
      const index = Number(input.closest("tr").dataset.index);
      if (doc.regions.some((r, i) => i !== index && r.id === text)) {
        return new Error(`id ${text} is taken; give every box its own id`);
      }
      return text;
    }
    return input.value;
  }
  if (field === "seed" && text === "") return null;
  const number = Number(text);
  if (text === "" || !Number.isFinite(number)) return new Error(`${field} must be a number`);
  if (field === "seed") {
    return Number.isInteger(number) && number >= 0 ? number : new Error("seed must be a whole number >= 0, or empty");
  }
  if (field === "feather") return number >= 0 && number <= 1 ? number : new Error("feather must be in [0, 1]");
  const side = field === "x" || field === "w" ? W() : H();
  if ((field === "w" || field === "h") && number <= 0) {
    return new Error(`${field} must be > 0 (a box of zero size draws nothing)`);
  }
  if ((field === "x" || field === "y") && (number < 0 || number >= side)) {
    return new Error(`${field} must be in [0, ${side})`);
  }
  return number;
}

function applyCell(input, value) {
  const row = doc.regions[Number(input.closest("tr").dataset.index)];
  const field = input.dataset.field;
  if (["x", "y", "w", "h"].includes(field)) {
    const box = pixels(row);
    box[["x", "y", "w", "h"].indexOf(field)] = value;
    const keep = row.box.slice();
    setPixels(row, box);
    row.box = row.box.map((v, k) => (k === ["x", "y", "w", "h"].indexOf(field) ? v : keep[k]));  // others exact
  } else {
    row[field] = value;
  }
}

body.addEventListener("input", (event) => {  // text cells follow the keyboard: the box label and colour too
  const input = event.target;
  if (!input.dataset.field || NUMERIC.has(input.dataset.field) || input.dataset.field === "id") return;
  applyCell(input, input.value);
  render(false);
  sync();
});

body.addEventListener("change", (event) => {
  const input = event.target;
  if (!input.dataset.field) return;
  const value = readCell(input);
  if (value instanceof Error) {
    input.value = cellValue(doc.regions[Number(input.closest("tr").dataset.index)], input.dataset.field);
    return say(`${value.message}; kept ${input.value || "the old value"}`);
  }
  applyCell(input, value);
  say("");
  // no rebuild of the table: the cell that has the focus now (Tab) must keep it
  commit(focusSnapshot || snapshot(), false);
  focusSnapshot = snapshot();
});

body.addEventListener("click", (event) => {
  const button = event.target.closest(".mrgd-row-delete");
  if (button) remove(Number(button.closest("tr").dataset.index));
});

// ---------------------------------------------------------------------------------------------- actions
function remove(index) {
  if (index < 0 || index >= doc.regions.length) return say("select a box first (click it or its row)");
  const before = snapshot();
  const [gone] = doc.regions.splice(index, 1);
  selected = -1;
  commit(before);
  say(`deleted ${gone.id}; Undo brings it back`);
}

function toggleRemoved() {
  const row = doc.regions[selected];
  if (!row) return say("select a box first (click it or its row)");
  if (!(row.prompt || "").trim()) return say(`${row.id} is only in the target; delete it instead`);
  const before = snapshot();
  row.target_prompt = (row.target_prompt || "").trim() === REMOVED ? "" : REMOVED;
  commit(before, false);
}

toolbar.addEventListener("click", (event) => {
  const act = event.target.dataset && event.target.dataset.act;
  if (act === "undo") undo();
  if (act === "delete") remove(selected);
  if (act === "remove") toggleRemoved();
  if (act === "clear" && doc.regions.length) {
    const before = snapshot();
    doc.regions = [];
    selected = -1;
    commit(before);
  }
});

root.addEventListener("keydown", (event) => {
  const typing = event.target.matches("input, select, textarea");
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z" && !typing) {
    event.preventDefault();
    return undo();
  }
  if (event.target !== stage || selected < 0) return;
  if (event.key === "Delete" || event.key === "Backspace") {
    event.preventDefault();
    return remove(selected);
  }
  const step = event.shiftKey ? 8 : 1;
  const move = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] }[event.key];
  if (move) {  // nudge by canvas pixels
    event.preventDefault();
    const before = snapshot();
    const [x, y, w, h] = pixels(doc.regions[selected]);
    const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
    setPixels(doc.regions[selected], [clamp(x + move[0], W() - w), clamp(y + move[1], H() - h), w, h]);
    commit(before, false);
  }
});

// ---------------------------------------------------------------------------------------------- from Python
watch("value", () => {  // a loaded file, a new canvas size: undoable like any other change
  const incoming = JSON.parse(props.value);
  const before = snapshot();
  if (JSON.stringify({ size: incoming.size, regions: incoming.regions }) === before) return;
  doc = { ...doc, size: incoming.size, regions: incoming.regions };
  selected = -1;
  commit(before);
  say("");
});

// The canvas background (a generated source, an uploaded photo) comes through its own hidden field, so that
// a picture arriving at the end of a run never overwrites boxes drawn while it ran.
window.mrgdEditor = {
  setBackground(url) {
    picture.style.display = url ? "block" : "none";
    if (url) picture.src = url;
    else picture.removeAttribute("src");
  },
};
window.mrgdEditor.setBackground(null);
render(true);
