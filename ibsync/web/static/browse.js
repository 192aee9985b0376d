// ibsync snapshot browser: "select all" and the "Download selected as ZIP" button.
"use strict";
(function () {
  function init() {
    const form = document.getElementById("selection");
    if (!form) return;
    const all = document.getElementById("select-all");
    const button = document.getElementById("download-selected");
    const boxes = () => Array.from(form.querySelectorAll('input[type=checkbox][name="path"]'));
    const update = () => {
      const n = boxes().filter((b) => b.checked).length;
      if (button) {
        button.disabled = n === 0;
        button.textContent = n ? "Download " + n + " selected as ZIP" : "Download selected as ZIP";
      }
    };
    if (all) all.addEventListener("change", () => { boxes().forEach((b) => { b.checked = all.checked; }); update(); });
    form.addEventListener("change", update);
    update();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
