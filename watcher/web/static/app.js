// pawcam web: the upload page (drag and drop, then follow each file until its row exists).
// No inline script anywhere (the Content-Security-Policy forbids it); text goes in as text.
"use strict";
(function () {
  const form = document.getElementById("upload-form");
  if (!form) return;
  const input = document.getElementById("upload-input");
  const tbody = document.querySelector("#uploads tbody");
  const maxBytes = Number(form.dataset.maxBytes);
  const maxFiles = Number(form.dataset.maxFiles);

  function cell(tr, text) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }

  function addRow(name) {
    const tr = document.createElement("tr");
    tr.className = "upload-row";
    cell(tr, name);
    const state = cell(tr, "sending…");
    state.className = "state";
    const result = cell(tr, "");
    result.className = "result";
    tbody.appendChild(tr);
    return {tr, state, result};
  }

  function showResult(row, r) {
    row.state.textContent = r.status === "ok" ? "classified" : "failed";
    row.tr.dataset.status = r.status;
    row.result.textContent = "";
    if (r.urls && r.urls.overlay) {
      const img = document.createElement("img");
      img.src = r.urls.overlay;
      img.alt = "overlay";
      row.result.appendChild(img);
    }
    const a = document.createElement("a");
    a.href = r.urls.detail;
    a.className = "result-link";
    a.textContent = r.status === "ok"
      ? r.label + (r.confidence != null ? " " + (100 * r.confidence).toFixed(1) + "%" : "")
      : "error: " + r.error;
    row.result.appendChild(a);
  }

  function follow(row, f, tries) {
    const q = new URLSearchParams({path: f.stored_as, since: f.uploaded_at, sort: "old", limit: "1"});
    fetch("/api/results?" + q.toString(), {credentials: "same-origin"})
      .then((resp) => resp.json())
      .then((data) => {
        if (data.results && data.results.length) { showResult(row, data.results[0]); return; }
        if (tries % 10 === 0) {
          fetch("/api/status", {credentials: "same-origin"}).then((r) => r.json()).then((s) => {
            const st = s.daemon ? s.daemon.state : "unknown";
            row.state.textContent = st === "running" ? "in the inbox, waiting for its row…"
              : "in the inbox; the daemon is " + st + " (it is classified once the daemon runs)";
          }).catch(() => {});
        }
        setTimeout(() => follow(row, f, tries + 1), tries < 20 ? 500 : 2000);
      })
      .catch(() => setTimeout(() => follow(row, f, tries + 1), 2000));
  }

  function send(fileList) {
    const list = Array.from(fileList);
    if (!list.length) return;
    const batch = [];
    for (const file of list) {
      const row = addRow(file.name);
      if (file.size > maxBytes) {
        row.state.textContent = "refused: larger than " + maxBytes.toLocaleString() + " bytes";
        row.tr.dataset.status = "refused";
        continue;
      }
      batch.push({file, row});
    }
    for (let i = 0; i < batch.length; i += maxFiles) {
      const part = batch.slice(i, i + maxFiles);
      const data = new FormData();
      part.forEach((p) => data.append("files", p.file, p.file.name));
      fetch("/api/upload", {method: "POST", body: data, credentials: "same-origin"})
        .then((resp) => resp.json().then((body) => ({ok: resp.ok, status: resp.status, body})))
        .then(({body}) => {
          if (!body.files) {
            part.forEach((p) => { p.row.state.textContent = "refused: " + (body.error || "?");
                                  p.row.tr.dataset.status = "refused"; });
            return;
          }
          body.files.forEach((f, k) => {
            const row = part[k].row;
            if (f.status !== "queued") {
              row.state.textContent = "refused: " + f.reason;
              row.tr.dataset.status = "refused";
              return;
            }
            row.state.textContent = "in the inbox as " + f.stored_as;
            row.tr.dataset.status = "queued";
            follow(row, f, 0);
          });
        })
        .catch((err) => part.forEach((p) => { p.row.state.textContent = "failed to send: " + err; }));
    }
  }

  input.addEventListener("change", () => { send(input.files); input.value = ""; });
  ["dragenter", "dragover"].forEach((t) => form.addEventListener(t, (e) => {
    e.preventDefault(); form.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => form.addEventListener(t, (e) => {
    e.preventDefault(); form.classList.remove("over"); }));
  form.addEventListener("drop", (e) => send(e.dataTransfer.files));
  form.addEventListener("submit", (e) => { e.preventDefault(); send(input.files); });
})();
