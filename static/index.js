"use strict";
// The index page: every stream's tile plays as it loads.
for (const tile of document.querySelectorAll(".tile")) {
  const video = tile.querySelector("video");
  const player = new WhepPlayer(video, video.dataset.whep, {
    onState: (s) => { tile.querySelector("[data-role=state]").textContent = s; },
    onLatency: (ms) => { tile.querySelector("[data-role=latency]").textContent = ms == null ? "" : ms + " ms"; },
  });
  player.start();
}
