// ionflow dashboard: draws the charts whose figures the server put in the page (JSON blocks),
// fetches the charts that need the model, and keeps a running campaign's page current.
"use strict";

const CONFIG = { displaylogo: false, responsive: true };
const ELEMENT_COLOURS = { H: "#dddddd", C: "#555555", N: "#3050f8", O: "#ff0d0d", F: "#90e050", Na: "#ab5cf2",
  Cl: "#1ff01f", K: "#8f40d4", Li: "#cc80ff", S: "#ffff30", P: "#ff8000", Br: "#a62929", I: "#940094" };

function draw(el, figure) {
  window.Plotly.newPlot(el, figure.data, figure.layout, CONFIG);
  el.dataset.drawn = String(figure.data.length);
}

function drawFigures() {
  document.querySelectorAll("[data-figure]").forEach((el) => {
    const block = document.getElementById(el.dataset.figure);
    if (block) draw(el, JSON.parse(block.textContent));
  });
}

async function drawParity() {
  const box = document.getElementById("parity");
  if (!box) return;
  const reply = await fetch(box.dataset.src);
  const found = await reply.json();
  if (!reply.ok) {
    box.textContent = "no parity plot: " + found.error;
    return;
  }
  box.textContent = found.n_structures + " test structures";
  draw(document.getElementById("chart-parity-energy"), found.figures.energy);
  draw(document.getElementById("chart-parity-forces"), found.figures.forces);
  if (found.figures.charges.data.length) draw(document.getElementById("chart-charges"), found.figures.charges);
}

function bonds(pos, radii) {
  const x = [], y = [], z = [];
  for (let i = 0; i < pos.length; i++) {
    for (let j = i + 1; j < pos.length; j++) {
      const d = Math.hypot(pos[i][0] - pos[j][0], pos[i][1] - pos[j][1], pos[i][2] - pos[j][2]);
      if (d < 1.2 * (radii[i] + radii[j])) {
        x.push(pos[i][0], pos[j][0], null); y.push(pos[i][1], pos[j][1], null); z.push(pos[i][2], pos[j][2], null);
      }
    }
  }
  return { type: "scatter3d", mode: "lines", x, y, z, line: { color: "#888888", width: 4 }, hoverinfo: "skip", name: "bonds" };
}

function atomsFigure(found, by) {
  const pos = found.positions_A;
  const values = by === "element" ? null : found[by];
  const marker = { size: found.radii_A.map((r) => 12 + 14 * r), line: { width: 1, color: "#333333" } };
  if (values) {
    marker.color = values;
    marker.colorscale = "RdBu";
    marker.reversescale = by === "charges_e";
    marker.showscale = true;
    marker.colorbar = { title: { text: by === "charges_e" ? "charge (e)" : "force spread (eV/Å)" } };
  } else {
    marker.color = found.symbols.map((s) => ELEMENT_COLOURS[s] || "#ff69b4");
  }
  const text = found.symbols.map((s, i) => s + (values ? " " + values[i].toFixed(3) : ""));
  const atoms = { type: "scatter3d", mode: "markers", name: "atoms", x: pos.map((p) => p[0]), y: pos.map((p) => p[1]),
    z: pos.map((p) => p[2]), marker, text, hoverinfo: "text" };
  return { data: [bonds(pos, found.radii_A), atoms],
    layout: { height: 480, margin: { l: 0, r: 0, t: 10, b: 0 }, showlegend: false,
      scene: { aspectmode: "data", xaxis: { title: { text: "x (Å)" } }, yaxis: { title: { text: "y (Å)" } }, zaxis: { title: { text: "z (Å)" } } } } };
}

async function drawAtoms() {
  const el = document.getElementById("chart-atoms");
  if (!el) return;
  const reply = await fetch(el.dataset.src);
  const found = await reply.json();
  const note = document.getElementById("atoms-note");
  if (!reply.ok) {
    note.textContent = found.error;
    return;
  }
  const select = document.getElementById("colour-by");
  note.textContent = found.model_version === null ? "(no model file to predict with)" : "(predicted by model v" + found.model_version + ")";
  if (found.model_version === null) select.querySelectorAll("option:not([value=element])").forEach((o) => (o.disabled = true));
  const show = () => draw(el, atomsFigure(found, select.value));
  select.addEventListener("change", show);
  show();
}

function keepCurrent() {
  const live = document.getElementById("live");
  if (!live || live.dataset.status !== "running") return;
  setInterval(async () => {
    const reply = await fetch(live.dataset.stateUrl, { cache: "no-store" });
    if (!reply.ok) return;
    const found = await reply.json();
    if (found.state !== live.dataset.state) window.location.reload();
  }, 3000);
}

document.addEventListener("DOMContentLoaded", () => {
  drawFigures();
  drawParity();
  drawAtoms();
  keepCurrent();
});
