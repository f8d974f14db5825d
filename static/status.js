// The small status panel in the page header: temperature, CPU, viewers, throttling.
"use strict";

(function () {
  const POLL_MS = 5000;
  const el = document.getElementById("status-panel");
  if (!el) return;
  const fmt = (v, unit, digits = 0) => (v == null ? "—" : v.toFixed(digits) + unit);

  async function poll() {
    try {
      const resp = await fetch("/api/v1/status", { cache: "no-store" });
      if (!resp.ok) throw new Error(String(resp.status));
      const s = await resp.json();
      const sys = s.system;
      const throttled = sys.throttled
        ? Object.entries(sys.throttled).filter(([k, v]) => v && !k.endsWith("_occurred")).map(([k]) => k)
        : [];
      el.querySelector("[data-role=temp]").textContent = fmt(sys.temperature_celsius, " °C", 1);
      el.querySelector("[data-role=cpu]").textContent = fmt(sys.cpu_percent, " %");
      el.querySelector("[data-role=viewers]").textContent = String(s.viewers);
      const warn = el.querySelector("[data-role=throttled]");
      warn.textContent = throttled.length ? "⚠ " + throttled.join(", ").replaceAll("_", " ") : "";
      warn.hidden = throttled.length === 0;
      el.classList.remove("stale");
    } catch {
      el.classList.add("stale");
    }
  }
  poll();
  setInterval(poll, POLL_MS);
})();
