// ibsync web app: live job progress (server-sent events) and the CSRF header for fetch().
"use strict";
(function () {
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  // POST from scripts with the session's CSRF token (forms carry it as a hidden field)
  window.ibsyncPost = function (url, data) {
    return fetch(url, {method: "POST", credentials: "same-origin",
                       headers: {"X-CSRF-Token": csrf(), "Content-Type": "application/x-www-form-urlencoded"},
                       body: new URLSearchParams(data || {})});
  };

  function size(n) {
    if (n === null || n === undefined) return "?";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
  }

  function render(el, job) {
    const bar = el.querySelector("progress");
    const text = el.querySelector(".job-text");
    const result = el.querySelector(".job-result");
    el.dataset.state = job.state;
    if (bar) {
      if (job.fraction === null || job.fraction === undefined) bar.removeAttribute("value");
      else bar.value = job.fraction;
    }
    const pct = job.fraction === null || job.fraction === undefined ? "" : Math.floor(job.fraction * 100) + " % · ";
    let line = pct + size(job.bytes_done) + (job.bytes_total ? " of " + size(job.bytes_total) : "") +
      " · " + job.files_done + (job.files_total ? " of " + job.files_total : "") + " files · " +
      size(job.rate) + "/s";
    if (job.message) line += " · " + job.message;
    if (job.state === "failed") line = "Failed: " + (job.error || "unknown error");
    if (job.state === "done") line = "Done · " + line;
    if (text) text.textContent = line;
    if (job.state === "done" && result && job.result && (job.result.url || job.result.label)) {
      result.textContent = "";
      if (job.result.url) {
        const a = document.createElement("a");
        a.href = job.result.url;
        a.textContent = job.result.label || job.result.url;
        result.append(a);
      } else {
        result.textContent = job.result.label;
      }
    }
    // reload once, when a job this page saw running has ended (not for a job already over)
    if (job.state !== "running" && el.dataset.done === "reload" && el.dataset.initial === "running") {
      el.dataset.done = "";
      setTimeout(() => window.location.reload(), 1500);
    }
  }

  function watch(el) {
    const id = el.dataset.job;
    const source = new EventSource("/api/jobs/" + encodeURIComponent(id) + "/events");
    source.addEventListener("job", (ev) => {
      const job = JSON.parse(ev.data);
      render(el, job);
      if (job.state !== "running") source.close();
    });
    source.onerror = () => { if (el.dataset.state && el.dataset.state !== "running") source.close(); };
  }

  // "Back up now" in the agent: the agent's loop starts the job; show it once it exists
  function waitForJob(el) {
    const after = parseInt(el.dataset.after || "0", 10);
    const udid = (el.dataset.udid || "").toUpperCase();
    const look = () => fetch("/api/jobs", {credentials: "same-origin"}).then((r) => r.json()).then((data) => {
      const job = data.jobs.find((j) => j.kind === el.dataset.waitForJob && parseInt(j.id, 10) > after &&
        (!udid || String(j.subject.udid || "").toUpperCase() === udid));
      if (job) {
        window.location.replace("/?flash=backup&job=" + encodeURIComponent(job.id));
      } else {
        setTimeout(look, 1000);
      }
    }).catch(() => setTimeout(look, 3000));
    look();
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll("[data-job]").forEach(watch);
    document.querySelectorAll("[data-wait-for-job]").forEach(waitForJob);
    // restore onto a device: the confirmation box carries the chosen device (the server checks it)
    const select = document.querySelector(".restore-device select[name=device]");
    const box = document.getElementById("confirm-device");
    if (select && box) { const sync = () => { box.value = select.value; }; select.addEventListener("change", sync); sync(); }
    // confirm() on forms that ask for it (restore onto a device)
    document.querySelectorAll("form[data-confirm]").forEach((form) => {
      form.addEventListener("submit", (ev) => { if (!window.confirm(form.dataset.confirm)) ev.preventDefault(); });
    });
  });
})();
