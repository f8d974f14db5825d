"use strict";
// The one-stream page: its player, the stats overlay, sound, fullscreen and the RTSP URL's copy button.
const $ = (id) => document.getElementById(id);
const video = $("video");
const fmt = (v, unit, digits = 0) => (v == null || Number.isNaN(v) ? "—" : v.toFixed(digits) + unit);
const player = new WhepPlayer(video, video.dataset.whep, {
  onAudioLatency: (audioMs, lipSyncMs) => {
    $("audio-latency").textContent = fmt(audioMs, " ms", 0);
    $("lip-sync").textContent = fmt(lipSyncMs, " ms", 0);
  },
  onState: (s) => { $("state").textContent = s; },
  onLatency: (ms) => { $("latency").textContent = ms == null ? "—" : ms + " ms"; },
  onFallback: (on) => {
    const img = $("mjpeg");
    if (on) {
      img.src = img.dataset.src;
      img.hidden = false;
      video.hidden = true;
      player.latencyFrom(img);  // the readout goes on from the MJPEG pictures
    } else {
      player.latencyFrom(null);
      img.removeAttribute("src");  // closes the MJPEG connection
      img.hidden = true;
      video.hidden = false;
    }
  },
  onStats: (st) => {
    $("fps").textContent = fmt(st.fps, "", 0);
    $("bitrate").textContent = fmt(st.bitrateKbps, " kbit/s", 0);
    $("rtt").textContent = fmt(st.rttMs, " ms", 1);
    $("jitter").textContent = fmt(st.jitterBufferMs, " ms", 0);
  },
}, { audio: Boolean(video.dataset.audio) });
window.camrelayPlayer = player;
player.start();
$("fullscreen").onclick = () => {
  const el = $("player");
  if (document.fullscreenElement) document.exitFullscreen();
  else if (el.requestFullscreen) el.requestFullscreen();
  else if (video.webkitEnterFullscreen) video.webkitEnterFullscreen();  // iOS Safari
};
const unmute = $("unmute");
if (unmute) {
  // Muted at first (browsers play sound only after a click); the button toggles it, the slider sets the volume.
  unmute.onclick = () => {
    if (player.muted) player.unmute(Number($("volume").value));
    else player.mute();
    unmute.textContent = player.muted ? "Unmute" : "Mute";
    unmute.setAttribute("aria-pressed", String(!player.muted));
  };
  $("volume").oninput = (ev) => player.setVolume(Number(ev.target.value));
  $("sync").onchange = (ev) => player.setSync(ev.target.checked);
}
$("toggle-stats").onclick = () => $("overlay").classList.toggle("hidden");
const copy = $("copy-rtsp");
if (copy) {
  copy.onclick = async () => {
    const text = $("rtsp-url").textContent;
    try {
      await navigator.clipboard.writeText(text);  // needs https or localhost
    } catch {
      const range = document.createRange();  // plain http on a LAN: select it for Ctrl+C
      range.selectNodeContents($("rtsp-url"));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      document.execCommand("copy");
    }
    copy.textContent = "Copied";
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  };
}
