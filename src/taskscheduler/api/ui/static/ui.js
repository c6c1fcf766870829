// taskscheduler dashboard: refresh the overview's live part in place, every few seconds, without
// reloading the page. Paused while the tab is hidden, and on request (WCAG 2.2.2).
"use strict";
(function () {
  const live = document.getElementById("live");
  const toggle = document.getElementById("refresh-toggle");
  if (!live || !toggle) return;
  const every = Number(live.dataset.every) || 5000;
  let paused = false;
  let busy = false;
  toggle.hidden = false;
  toggle.addEventListener("click", function () {
    paused = !paused;
    toggle.setAttribute("aria-pressed", String(paused));
    toggle.textContent = paused ? "Resume auto-refresh" : "Pause auto-refresh";
  });
  async function refresh() {
    // Not while the keyboard is in the part that would be replaced: the focus would be lost.
    if (paused || busy || document.hidden || live.contains(document.activeElement)) return;
    busy = true;
    try {
      const response = await fetch(live.dataset.live, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (response.redirected && response.url.indexOf("/login") !== -1) {
        window.location.reload(); // the session ended: show the login page
        return;
      }
      if (response.ok) {
        const open = Array.from(live.querySelectorAll("figure details[open]")).map((d) => d.parentElement.id);
        live.innerHTML = await response.text();
        open.forEach((id) => { const d = document.querySelector("#" + id + " details"); if (d) d.open = true; });
        live.dispatchEvent(new CustomEvent("refreshed"));
      }
    } catch (e) {
      // the API is restarting or unreachable: try again at the next tick
    } finally {
      busy = false;
    }
  }
  window.setInterval(refresh, every);
})();
