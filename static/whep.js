// camrelay's WHEP player: one RTCPeerConnection per <video>, no build step.
//
// - The offer goes out with the candidates gathered within GATHER_TIMEOUT_MS
//   (host candidates come in ms: a LAN connects at once); those gathered later
//   (a TURN allocation over a slow mobile or satellite link) follow by PATCH to
//   the session (trickle ICE, RFC 8840). Firefox may offer only mDNS
//   candidates; the relay learns the real address from the first ICE check, as
//   a peer-reflexive candidate.
// - Reconnects with backoff when the connection fails, frames stop, or the
//   relay restarts.
// - Reads the test pattern's pixel clock (shared/spec/test-pattern.md) from
//   each video frame and reports glass-to-glass latency in ms; in MJPEG
//   fallback, from each new picture of the <img> (latencyFrom).
// - Asks the browser to hold video frames as little as it can
//   (jitterBufferTarget 0, lowLatency); the relay also sends the playout-delay
//   RTP header extension ([webrtc] playout_delay).
// - With { audio: true } it offers to receive sound too: by default played
//   from an <audio> of its own, the picture not held for it; with lip sync
//   (setSync) one MediaStream with the video, offered without the playout-delay
//   extension so that Chromium may hold the picture back to the sound. It
//   starts muted (autoplay rules) and the page unmutes it on a click.
//   BurstListener hears the test sound's bursts (the spec's "Sound") and
//   reports audio latency; the stats carry the parts of it Chromium reports.
"use strict";

const PIXEL_CLOCK_CELLS = 48;
const PIXEL_CLOCK_TIME_BITS = 44;
// VideoFrame formats whose first plane is the luma, one byte a pixel: the pixel clock reads from it.
const LUMA_FIRST_FORMATS = ["I420", "I420A", "I422", "I444", "NV12"];
const RECONNECT_MIN_MS = 1000;
const RECONNECT_MAX_MS = 15000;
const GATHER_TIMEOUT_MS = 2000;  // offer what we have by then (host candidates come in ms); later ones trickle
const TRICKLE_TYPE = "application/trickle-ice-sdpfrag";
const ICE_SERVERS_HEADER = "X-Camrelay-Ice-Servers";  // signalling/access.py: an OPTIONS that wants them
const STALL_MS = 5000;           // connected but no new frame for this long: reconnect
const LATENCY_WINDOW = 30;       // readings in the displayed median
const FALLBACK_AFTER_ATTEMPTS = 3;  // failed WebRTC connects before the page shows MJPEG
const LATENCY_MAX_MS = 60000;    // a reading further from now is a chance decode of a real camera's picture

// The test sound's bursts as the page hears them, read as benchmarks/bursts.py reads them: mean square of 10 ms
// windows over half the -6 dBFS tone's; an onset heard at wall-clock R ms is burst k = floor(R / 1000), its
// latency R - k * 1000. Each chunk is stamped when the script gets it plus the context's output latency.
const BURST_LEVEL = 10 ** (-6 / 20);  // the tone's amplitude (full scale 1)
const BURST_THRESHOLD = (BURST_LEVEL ** 2 / 2) / 2;
const BURST_MAX_WINDOWS = 30;  // three times a 100 ms burst: longer is a held tone or noise, no onset
const BURST_CHUNK = 512;  // samples per script callback: about 11 ms at 48 kHz

class BurstListener {
  constructor(stream, onOnset) {
    this.ctx = new AudioContext();
    this.onOnset = onOnset;
    this.window = Math.round(this.ctx.sampleRate / 100);
    this._pending = [];
    this._onset = null;
    this._windows = 0;
    const source = this.ctx.createMediaStreamSource(stream);
    const node = this.ctx.createScriptProcessor(BURST_CHUNK, 1, 1);
    // Stamped when it will be heard through this context: the script gets a chunk that much before its output.
    const outputMs = () => ((this.ctx.baseLatency || 0) + (this.ctx.outputLatency || 0)) * 1000;
    this.outputMs = null;  // the last stamp's output latency: how much of a reading is the context's own
    node.onaudioprocess = (ev) => {
      this.outputMs = outputMs();
      this._feed(Date.now() + this.outputMs, ev.inputBuffer.getChannelData(0));
    };
    source.connect(node);
    node.connect(this.ctx.destination);  // a script node runs only when connected; it writes silence
    this.ctx.resume().catch(() => {});
  }

  _feed(now, chunk) {
    const rate = this.ctx.sampleRate;
    const data = this._pending.length ? Float32Array.from([...this._pending, ...chunk]) : chunk;
    const whole = Math.floor(data.length / this.window) * this.window;
    for (let start = 0; start < whole; start += this.window) {
      let energy = 0;
      for (let i = start; i < start + this.window; i++) energy += data[i] * data[i];
      const at = now - ((data.length - start) / rate) * 1000;  // when this window's first sample came
      if (energy / this.window > BURST_THRESHOLD) {
        if (this._onset === null) this._onset = { at, windows: 0 };
        this._onset.windows += 1;
      } else if (this._onset !== null) {
        if (this._onset.windows <= BURST_MAX_WINDOWS) this.onOnset(this._onset.at - Math.floor(this._onset.at / 1000) * 1000);
        this._onset = null;
      }
    }
    this._pending = Array.from(data.subarray(whole));
  }

  close() {
    this.ctx.close().catch(() => {});
  }
}

// The player's audio stats before any are known (and again at each new connection).
const NO_AUDIO_STATS = {
  audioLevel: null, audioEnergy: null, audioJitterBufferMs: null, audioJitterTargetMs: null, audioPlayoutMs: null,
  audioConcealedMs: null,
};

// Chromium plays the audio and video of one remote stream (the answer's msid stream id: aiortc gives both tracks
// one) in sync by holding back the earlier, the video (docs/benchmarks.md has what it costs). Unless lip sync is
// asked for, the answer's audio gets a stream id of its own and plays from an <audio> of its own, so the picture
// is not held for the sound.
const OWN_AUDIO_STREAM = "camrelay-audio";
function audioOnItsOwnStream(sdp) {
  return sdp
    .split(/\r\n(?=m=)/)
    .map((section) => (!section.startsWith("m=audio") ? section : section
      .replace(/^a=msid:\S+ /gm, `a=msid:${OWN_AUDIO_STREAM} `)
      .replace(/^(a=ssrc:\d+ msid:)\S+ /gm, `$1${OWN_AUDIO_STREAM} `)))
    .join("\r\n");
}

// With lip sync the offer leaves out the playout-delay RTP header extension, so the relay sends none: a playout
// delay of 0 has Chromium render each frame as soon as it is decoded, whatever its sync with the sound would need.
const PLAYOUT_DELAY_URI = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay";
function withoutPlayoutDelay(sdp) {
  return sdp.split("\r\n").filter((line) => !(line.startsWith("a=extmap:") && line.includes(PLAYOUT_DELAY_URI))).join("\r\n");
}

// Lip sync's trim. Chromium's own sync moves a stream's delay only while the two are more than 30 ms apart as it
// reckons them (WebRTC's StreamSynchronization, kMinDeltaMs), and it reckons the picture by its jitter buffer's
// target, not by when a frame is rendered: the sound can stay tens of ms behind. Each stats poll with lip sync the
// page reads how far behind, as Chromium plays them (sync_late_ms: each track's estimatedPlayoutTimestamp, the
// capture time through the relay's sender reports of what plays now), and moves the video receiver's
// jitterBufferTarget (a floor under the picture's delay, which Chromium's sync may raise but never lowers) a part
// of the way from the delay the picture now has: SYNC_TRIM_GAIN of the gap a poll, so the video's own
// 33 ms steps of estimate average out over a few polls. Sound ahead of its picture lowers the floor, to 0 at least.
const SYNC_TRIM_GAIN = 0.5;
const SYNC_TRIM_MAX_MS = 1000;  // far above any sound's lag in sync (NetEq holds 20-500 ms); the browser's cap is 4 s
// The most a poll moves the floor: one bogus reading (a sender report's mapping jumping as a camera or its sound
// restarts) moves the picture by this much at most, where half of it could be 500 ms; a real gap of 100 ms is
// still closed in a few polls.
const SYNC_TRIM_STEP_MS = 50;
function syncLateMs(audio, video) {
  const a = audio && audio.estimatedPlayoutTimestamp;
  const v = video && video.estimatedPlayoutTimestamp;
  return a && v ? v - a : null;
}
function syncTrim(delayMs, lateMs) {
  const step = Math.max(-SYNC_TRIM_STEP_MS, Math.min(SYNC_TRIM_STEP_MS, SYNC_TRIM_GAIN * lateMs));
  return Math.round(Math.max(0, Math.min(SYNC_TRIM_MAX_MS, delayMs + step)));
}

// The ICE servers in a WHEP answer's Link headers (fetch joins several with ", "):
// <turn:host:3478?transport=tcp>; rel="ice-server"; username="..."; credential="..."; credential-type="password"
function iceServersFromLinks(header) {
  const servers = [];
  for (const [, url, params] of (header || "").matchAll(/<([^>]*)>((?:\s*;\s*[\w-]+\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^",;]*))*)/g)) {
    const p = {};
    for (const [, key, quoted, bare] of params.matchAll(/;\s*([\w-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^",;]*))/g)) {
      p[key.toLowerCase()] = quoted !== undefined ? quoted.replace(/\\(.)/g, "$1") : bare;
    }
    if (p.rel !== "ice-server") continue;
    servers.push(p.username !== undefined ? { urls: url, username: p.username, credential: p.credential } : { urls: url });
  }
  return servers;
}

// A video receiver holds frames no longer than it must: its jitter buffer's target 0 ms (jitterBufferTarget, in
// ms; playoutDelayHint, in seconds, where only that exists). Never an audio receiver: a target of 0 there trades
// glitches in the sound for latency nobody sees. True when it set one.
function lowLatency(receiver) {
  if (!receiver || !receiver.track || receiver.track.kind !== "video") return false;
  if ("jitterBufferTarget" in receiver) receiver.jitterBufferTarget = 0;
  else if ("playoutDelayHint" in receiver) receiver.playoutDelayHint = 0;
  else return false;
  return true;
}

// Decode the band from RGBA pixels of the band's rows (width w, s rows).
function readPixelClock(rgba, w) {
  return pixelClockFrom(w, (x, y) => {
    const o = (y * w + x) * 4;
    return 0.299 * rgba[o] + 0.587 * rgba[o + 1] + 0.114 * rgba[o + 2];
  });
}

// The same from a luma plane: `y` bytes, row `r` of the picture at `offset + r * stride` (a VideoFrame's Y plane).
function readPixelClockLuma(y, w, offset, stride) {
  return pixelClockFrom(w, (x, r) => y[offset + r * stride + x]);
}

// The capture time the band of a picture `w` pixels wide shows, from `luma(x, y)` of its pixels, or null.
function pixelClockFrom(w, luma) {
  const s = Math.floor(w / PIXEL_CLOCK_CELLS);
  if (w < 320 || s < 1) return null;
  const side = Math.max(2, Math.floor(s / 2));
  const start = Math.floor((s - side) / 2);
  const bits = [];
  for (let i = 0; i < PIXEL_CLOCK_CELLS; i++) {
    let sum = 0;
    for (let y = start; y < start + side; y++) {
      for (let x = i * s + start; x < i * s + start + side; x++) sum += luma(x, y);
    }
    bits.push(sum / (side * side) > 128 ? 1 : 0);
  }
  if (bits[0] !== 1 || bits[1] !== 0 || bits[47] !== 0) return null;
  let t = 0, ones = 0;
  for (let i = 2; i < 2 + PIXEL_CLOCK_TIME_BITS; i++) {
    t = t * 2 + bits[i];  // not <<: T has 44 bits, JS shifts are 32-bit
    ones += bits[i];
  }
  if ((ones & 1) !== bits[46]) return null;
  return t;
}

class WhepPlayer {
  constructor(video, url, handlers = {}, options = {}) {
    this.video = video;
    this.audio = Boolean(options.audio);  // offer to receive the stream's sound too
    this.sync = Boolean(options.sync);  // lip sync (the video waits for the sound) rather than the earliest picture
    this.stream = null;  // the MediaStream the <video> plays: its video, and its audio when answered
    this.audioLatencyMs = null;  // the test sound's, median of the last readings (BurstListener)
    this.audioReadings = 0;  // bursts heard since the page opened
    this.audioOutputMs = null;  // the AudioContext's output latency, included in each reading
    this.lipSyncMs = null;  // audio latency minus video latency: positive, the sound is late
    this._audioLatencies = [];
    this._listener = null;
    this._audioOut = null;  // the <audio> the sound plays from without lip sync
    this.url = url;
    this.handlers = handlers;
    this.pc = null;
    this.session = null;
    this.state = "idle";
    this.attempt = 0;
    this.stopped = true;
    this.syncTrimMs = null;  // with lip sync: the floor under the picture's delay that brings it to its sound
    this.syncLateMs = null;  // how far behind its picture the sound played at the last trim, as Chromium reckons
    this.syncTrims = 0;  // trims made since the page opened
    this._lastVideoMinimum = null;
    this.stats = { framesDecoded: 0, fps: null, bitrateKbps: null, rttMs: null, jitterBufferMs: null, ...NO_AUDIO_STATS };
    this._lastAudio = null;  // the audio counters at the last poll: the jitter buffer's figures are per poll
    this.latencies = [];
    this.latencyReadings = 0;
    this.latencyMs = null;
    this.clockReader = null;  // how the video's pixel clock is read: "frame" (its decoded picture), "canvas"
    this.connects = 0;
    this._lastFrames = 0;
    this._lastFrameChange = 0;
    this._lastBytes = null;
    this._image = null;  // latencyFrom's <img>, while the page shows MJPEG instead of the video
    this._lastImageClock = null;
    this._canvas = document.createElement("canvas");
    this._ctx = this._canvas.getContext("2d", { willReadFrequently: true });
    this._statsTimer = null;
    this._retryTimer = null;
    this._asking = null;  // the connect attempt now asking for the ICE servers
    // Leaving the page ends the session at once (keepalive: the DELETE outlives the page). Should the
    // page come back from the back/forward cache, it needs a new one.
    window.addEventListener("pagehide", () => this._teardown(true));
    window.addEventListener("pageshow", (ev) => {
      if (ev.persisted && !this.stopped) this._connect();
    });
  }

  start() {
    this.stopped = false;
    this._connect();
    this._statsTimer = setInterval(() => this._pollStats(), 1000);
    this._watchFrames();
  }

  stop() {
    this.stopped = true;
    clearInterval(this._statsTimer);
    clearTimeout(this._retryTimer);
    this._teardown();
  }

  _setState(s) {
    this.state = s;
    if (this.handlers.onState) this.handlers.onState(s);
  }

  async _connect() {
    this._teardown();
    clearTimeout(this._retryTimer);
    this._setState("connecting");
    // Counters restart with each peer connection; so does the latency window (not while MJPEG gives it).
    this._lastFrames = 0;
    this._lastBytes = null;
    Object.assign(this.stats, NO_AUDIO_STATS);
    this._lastAudio = null;
    this._lastVideoMinimum = null;
    this.syncTrimMs = null;  // a new connection's picture starts with no floor: nothing trimmed yet
    this.syncLateMs = null;
    if (!this._image) this.latencies = [];
    if (this.latencyMs != null && !this._image) {
      this.latencyMs = null;
      if (this.handlers.onLatency) this.handlers.onLatency(null);
    }
    // The relay's ICE servers (STUN, TURN with credentials minted for this connection), asked for before every
    // offer as any WHEP player does; none (a LAN): host candidates only. The header marks the request as a
    // viewer's, not a CORS preflight: without credentials it gets a 401 challenge, which the browser answers with
    // the password it has for the relay (it sends none unasked to a path that has not challenged it).
    const asking = {};
    this._asking = asking;
    let iceServers = [];
    try {
      const resp = await fetch(this.url, { method: "OPTIONS", headers: { [ICE_SERVERS_HEADER]: "1" } });
      iceServers = iceServersFromLinks(resp.headers.get("Link"));
    } catch {}  // the relay is away: the offer below fails and is retried
    if (this.stopped || this._asking !== asking) return;  // stopped, or another connect began meanwhile
    let pc;
    try {
      pc = new RTCPeerConnection({ iceServers });
    } catch (err) {  // e.g. a TURN server without credentials
      this._retry(`ICE servers refused: ${err.message || err}`);
      return;
    }
    this.pc = pc;
    lowLatency(pc.addTransceiver("video", { direction: "recvonly" }).receiver);
    if (this.audio) pc.addTransceiver("audio", { direction: "recvonly" });
    const stream = new MediaStream();
    pc.ontrack = (ev) => {
      if (pc !== this.pc) return;
      lowLatency(ev.receiver);  // again, should a browser reset it once negotiated (video only)
      stream.addTrack(ev.track);
      this.stream = stream;  // every track received
      // With lip sync the <video> plays both; else the picture alone, the sound in an <audio> of its own.
      const shown = this.sync ? stream : new MediaStream(stream.getVideoTracks());
      if (this.video.srcObject !== stream && (this.sync || ev.track.kind === "video")) this.video.srcObject = shown;
      if (ev.track.kind === "audio" && !this.sync) {
        this.output.srcObject = new MediaStream([ev.track]);
        this.output.play().catch(() => {});
      }
      if (ev.track.kind === "audio" && this.handlers.onAudio) this.handlers.onAudio(true);
      if (ev.track.kind === "audio" && this._listener) this.listen();  // unmuted before: hear the new track
      this.video.play().catch(() => {});
    };
    pc.onconnectionstatechange = () => {
      if (pc !== this.pc) return;
      const s = pc.connectionState;
      if (s === "connected") {
        // attempt (the backoff) resets only once frames flow: a relay that connects but sends
        // nothing must not be retried every few seconds forever.
        this.connects += 1;
        this._lastFrameChange = performance.now();
        this._setState("live");
      } else if (s === "failed" || s === "closed") {
        this._retry(`connection ${s}`);
      } else if (s === "disconnected") {
        this._setState("reconnecting");
      }
    };
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await this._gathered(pc);
      const offer = this.sync ? withoutPlayoutDelay(pc.localDescription.sdp) : pc.localDescription.sdp;
      const trickle = this._trickle(pc, offer);
      const resp = await fetch(this.url, {
        method: "POST",
        headers: { "Content-Type": "application/sdp" },
        body: offer,
      });
      if (resp.status !== 201) {
        const reason = (await resp.text()).trim();
        throw new Error(`${resp.status} ${reason}`);
      }
      const session = new URL(resp.headers.get("Location"), this.url.startsWith("http") ? this.url : location.href).href;
      const answer = await resp.text();
      if (pc !== this.pc) {
        // Replaced (retry, stop, pagehide) while the offer was out: this session has no viewer.
        fetch(session, { method: "DELETE" }).catch(() => {});
        return;
      }
      this.session = session;
      trickle(session);
      await pc.setRemoteDescription({ type: "answer", sdp: this.sync ? answer : audioOnItsOwnStream(answer) });
    } catch (err) {
      if (pc === this.pc) this._retry(String(err.message || err));
    }
  }

  // Sound on, at `volume` (0-1): called from a click, so the browser lets it play. The test sound's bursts are
  // listened for from then on.
  // The element the sound plays from: the <video> with lip sync, else an <audio> of its own (muted at first too).
  get output() {
    if (this.sync) return this.video;
    if (!this._audioOut) {
      this._audioOut = new Audio();
      this._audioOut.muted = true;
      this._audioOut.autoplay = true;
    }
    return this._audioOut;
  }

  get muted() {
    return this.output.muted;
  }

  setVolume(volume) {
    this.output.volume = volume;
  }

  unmute(volume = 1) {
    const out = this.output;
    out.muted = false;
    out.volume = volume;
    out.play().catch(() => {});
    this.listen();
  }

  mute() {
    this.output.muted = true;
  }

  // Lip sync on or off: a new peer connection, as the answer says which tracks play in sync, with the sound moved
  // to the element that will play it, as loud as it was.
  setSync(on) {
    if (this.sync === Boolean(on)) return;
    const { muted, volume } = this.output;
    this.output.muted = true;
    if (this._audioOut) this._audioOut.srcObject = null;
    this.sync = Boolean(on);
    this.output.muted = muted;
    this.output.volume = volume;
    if (!this.stopped) this._connect();
  }

  listen() {
    if (this._listener) this._listener.close();
    this._listener = null;
    if (!this.stream || !this.stream.getAudioTracks().length) return;
    this._listener = new BurstListener(new MediaStream(this.stream.getAudioTracks()), (ms) => this._heard(ms));
  }

  _heard(ms) {
    this.audioReadings += 1;
    if (this.handlers.onAudioSample) this.handlers.onAudioSample(ms, this.latencyMs);
    this._audioLatencies.push(ms);
    if (this._audioLatencies.length > LATENCY_WINDOW) this._audioLatencies.shift();
    const sorted = [...this._audioLatencies].sort((a, b) => a - b);
    this.audioLatencyMs = sorted[Math.floor(sorted.length / 2)];
    this.audioOutputMs = this._listener ? this._listener.outputMs : null;  // of that reading, the context's output
    this.lipSyncMs = this.latencyMs == null ? null : this.audioLatencyMs - this.latencyMs;
    if (this.handlers.onAudioLatency) this.handlers.onAudioLatency(this.audioLatencyMs, this.lipSyncMs);
  }

  _gathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { pc.removeEventListener("icegatheringstatechange", check); resolve(); };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      pc.addEventListener("icegatheringstatechange", check);
      setTimeout(done, GATHER_TIMEOUT_MS);
    });
  }

  // The candidates gathered after `offer` was taken, PATCHed to the session once its URL is known (the returned
  // function takes it), in order: without them the relay could never reach the viewer through them. Nothing
  // when gathering was over by then (a LAN): the offer has them all.
  _trickle(pc, offer) {
    if (pc.iceGatheringState === "complete") return () => {};
    const line = (start) => (offer.match(new RegExp(`^${start}.*$`, "m")) || [""])[0];
    const mline = line("m=video").replace(/^(m=video) \d+/, "$1 9");
    const head = [line("a=ice-ufrag:"), line("a=ice-pwd:"), mline, line("a=mid:")];
    let session = null;
    let late = [];
    let sent = Promise.resolve();
    const flush = () => {
      if (!session || !late.length || pc !== this.pc) return;
      const body = [...head, ...late].join("\r\n") + "\r\n";
      late = [];
      const patch = { method: "PATCH", headers: { "Content-Type": TRICKLE_TYPE, "If-Match": "*" }, body };
      sent = sent.then(() => fetch(session, patch)).catch(() => {});  // failed: the connection's state tells
    };
    pc.addEventListener("icecandidate", (ev) => {
      if (ev.candidate && !ev.candidate.candidate) return;  // one generation's end; the null event ends them all
      late.push(ev.candidate ? `a=${ev.candidate.candidate}` : "a=end-of-candidates");
      flush();
    });
    return (url) => { session = url; flush(); };
  }

  _retry(why) {
    if (this.stopped) return;
    this._teardown();
    const delay = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** this.attempt) * (0.8 + 0.4 * Math.random());
    this.attempt += 1;
    this._setState(`retrying in ${Math.round(delay / 1000)}s (${why})`);
    // WebRTC blocked (a strict firewall, an old browser): show MJPEG meanwhile, keep trying WebRTC.
    if (this.attempt === FALLBACK_AFTER_ATTEMPTS && this.handlers.onFallback) this.handlers.onFallback(true);
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._connect(), delay);
  }

  _deleteSession(keepalive = false) {
    if (this.session) {
      fetch(this.session, { method: "DELETE", keepalive }).catch(() => {});
      this.session = null;
    }
  }

  _teardown(keepalive = false) {
    this._deleteSession(keepalive);
    if (this.pc) {
      const pc = this.pc;
      this.pc = null;
      pc.close();
    }
  }

  // The latency readout follows `img` (an MJPEG <img> the page shows in fallback) instead of the video; null:
  // back to the video. A new picture is told by its clock: each is read once, when first painted.
  latencyFrom(img) {
    this._image = img;
    this._lastImageClock = null;
    this.latencies = [];
    if (img) requestAnimationFrame(() => this._watchImage(img));
  }

  _watchImage(img) {
    if (this._image !== img) return;
    const t = this._clockOf(img, img.naturalWidth);
    if (t != null && t !== this._lastImageClock) {
      this._lastImageClock = t;
      this._addLatency(t);
    }
    requestAnimationFrame(() => this._watchImage(img));
  }

  _watchFrames() {
    const onFrame = () => {
      this._readLatency();
      if (this.video.requestVideoFrameCallback) this.video.requestVideoFrameCallback(onFrame);
    };
    if (this.video.requestVideoFrameCallback) {
      this.video.requestVideoFrameCallback(onFrame);
    } else {
      setInterval(() => this._readLatency(), 100);  // older Firefox: sample instead
    }
  }

  _readLatency() {
    if (this._image) return;  // the page shows MJPEG: its pictures give the readings
    const at = Date.now();
    if (this.clockReader !== "canvas" && this._readFrameClock(at)) return;
    const t = this._clockOf(this.video, this.video.videoWidth);
    if (t != null) this._addLatency(t, at);
  }

  // The clock of the frame the video shows, from its decoded picture (WebCodecs): only the band's rows of its
  // luma are copied, where drawing the picture into the canvas converted all of it to RGB first (Chromium in
  // software: about 4 ms of its renderer's time a frame, a quarter of a core at 60 fps). False where the browser
  // cannot hand the frame over so (no VideoFrame, a picture in GPU memory only): the canvas reads from then on.
  _readFrameClock(at) {
    if (typeof VideoFrame === "undefined") {
      this.clockReader = "canvas";
      return false;
    }
    let frame;
    try {
      frame = new VideoFrame(this.video);
    } catch (e) {
      return false;  // no picture to hand over at this moment: the canvas reads this one
    }
    const w = frame.visibleRect ? frame.visibleRect.width : 0;
    if (!LUMA_FIRST_FORMATS.includes(frame.format) || w < 320) {
      frame.close();
      this.clockReader = "canvas";
      return false;
    }
    const vr = frame.visibleRect;
    const rows = Math.floor(w / PIXEL_CLOCK_CELLS);
    const rect = { x: vr.x & ~1, y: vr.y & ~1, width: w + (w & 1), height: rows + (rows & 1) };  // 4:2:0: even
    let buffer;
    try {
      buffer = new Uint8Array(frame.allocationSize({ rect }));
    } catch (e) {
      frame.close();
      this.clockReader = "canvas";  // a rectangle it does not take: the canvas from then on
      return false;
    }
    this.clockReader = "frame";
    frame.copyTo(buffer, { rect }).then(
      (layout) => {
        frame.close();
        const t = readPixelClockLuma(buffer, w, layout[0].offset, layout[0].stride);
        if (t != null) this._addLatency(t, at);
      },
      () => frame.close(),
    );
    return true;
  }

  // The capture time in the pixel clock of what `el` (a <video> or an <img>, `w` pixels wide) shows, or null.
  _clockOf(el, w) {
    if (!w || w < 320) return null;
    const s = Math.floor(w / PIXEL_CLOCK_CELLS);
    if (this._canvas.width !== w || this._canvas.height !== s) {
      this._canvas.width = w;
      this._canvas.height = s;
    }
    this._ctx.drawImage(el, 0, 0, w, s, 0, 0, w, s);
    return readPixelClock(this._ctx.getImageData(0, 0, w, s).data, w);
  }

  _addLatency(t, at = Date.now()) {
    const ms = at - t;
    if (Math.abs(ms) > LATENCY_MAX_MS) return;
    this.latencies.push(ms);
    if (this.latencies.length > LATENCY_WINDOW) this.latencies.shift();
    this.latencyReadings += 1;
    if (this.handlers.onLatencySample) this.handlers.onLatencySample(ms, t);
    const sorted = [...this.latencies].sort((a, b) => a - b);
    const median = sorted[Math.floor(sorted.length / 2)];
    if (median === this.latencyMs) return;  // the readout as it is: no text rewritten (laid out, painted) a frame
    this.latencyMs = median;
    if (this.handlers.onLatency) this.handlers.onLatency(median);
  }

  // The parts of the sound's latency in Chromium, over the last poll (since-start means would carry a connection's
  // first seconds for minutes): what its jitter buffer (NetEq) held each sample and the delay it aimed for, and the
  // delay of its output path (the audio device's buffer, as Chromium estimates it); the sound it made up for
  // packets that were not there in time, since the connection began.
  _audioParts(r, playout) {
    const now = {
      delay: r.jitterBufferDelay || 0, target: r.jitterBufferTargetDelay || 0, emitted: r.jitterBufferEmittedCount || 0,
      playout: playout ? playout.totalPlayoutDelay : 0, played: playout ? playout.totalSamplesCount : 0,
    };
    const last = this._lastAudio || { delay: 0, target: 0, emitted: 0, playout: 0, played: 0 };
    this._lastAudio = now;
    const st = this.stats;
    const emitted = now.emitted - last.emitted;
    if (emitted > 0) {
      st.audioJitterBufferMs = (1000 * (now.delay - last.delay)) / emitted;
      st.audioJitterTargetMs = (1000 * (now.target - last.target)) / emitted;
    }
    if (now.played > last.played) st.audioPlayoutMs = (1000 * (now.playout - last.playout)) / (now.played - last.played);
    if (r.totalSamplesReceived) st.audioConcealedMs = (1000 * r.totalSamplesDuration * (r.concealedSamples || 0)) / r.totalSamplesReceived;
  }

  // With lip sync, the picture's floor moved toward its sound (SYNC_TRIM_GAIN above), from the delay the video's
  // jitter buffer now has at least (the floor, or more where Chromium's sync asked for more: per frame since the
  // last poll). The floor and the gap it answered are kept for the page's readers (syncTrimMs, syncLateMs).
  _trimSync(pc, audio, video) {
    const late = syncLateMs(audio, video);
    const receiver = pc.getReceivers().find((r) => r.track && r.track.kind === "video");
    const last = this._lastVideoMinimum;
    this._lastVideoMinimum = video ? { delay: video.jitterBufferMinimumDelay || 0, emitted: video.jitterBufferEmittedCount || 0 } : null;
    if (late === null || !receiver || !("jitterBufferTarget" in receiver)) return;
    const floor = receiver.jitterBufferTarget || 0;
    const frames = last ? this._lastVideoMinimum.emitted - last.emitted : 0;
    const minimum = frames > 0 ? (1000 * (this._lastVideoMinimum.delay - last.delay)) / frames : floor;
    receiver.jitterBufferTarget = syncTrim(Math.max(floor, minimum), late);
    this.syncTrimMs = receiver.jitterBufferTarget;
    this.syncLateMs = late;
    this.syncTrims += 1;
  }

  async _pollStats() {
    const pc = this.pc;
    if (!pc) return;
    let report;
    try { report = await pc.getStats(); } catch { return; }
    if (pc !== this.pc) return;  // replaced meanwhile: its counters are not the new connection's
    const now = performance.now();
    let audio = null;
    let video = null;
    let playout = null;
    report.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") {
        video = r;
        const st = this.stats;
        st.fps = r.framesPerSecond ?? null;
        if (r.framesDecoded && r.framesDecoded !== this._lastFrames) {
          this._lastFrames = r.framesDecoded;
          this._lastFrameChange = now;
          if (this.state === "live") {
            if (this.attempt >= FALLBACK_AFTER_ATTEMPTS && this.handlers.onFallback) this.handlers.onFallback(false);
            this.attempt = 0;
          }
        }
        st.framesDecoded = r.framesDecoded || 0;
        if (this._lastBytes) {
          const dt = (r.timestamp - this._lastBytes.t) / 1000;
          if (dt > 0) st.bitrateKbps = ((r.bytesReceived - this._lastBytes.b) * 8) / 1000 / dt;
        }
        this._lastBytes = { t: r.timestamp, b: r.bytesReceived };
        if (r.jitterBufferEmittedCount) st.jitterBufferMs = (1000 * r.jitterBufferDelay) / r.jitterBufferEmittedCount;
      } else if (r.type === "inbound-rtp" && r.kind === "audio") {
        this.stats.audioLevel = r.audioLevel ?? null;  // 0-1, of the sound played out (muted or not)
        this.stats.audioEnergy = r.totalAudioEnergy ?? null;
        audio = r;
      } else if (r.type === "media-playout" && r.kind === "audio") {
        playout = r;
      } else if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded") {
        if (r.currentRoundTripTime != null) this.stats.rttMs = r.currentRoundTripTime * 1000;
      }
    });
    if (audio) this._audioParts(audio, playout);
    if (this.sync) this._trimSync(pc, audio, video);
    if (this.handlers.onStats) this.handlers.onStats(this.stats);
    // Also while ICE is "disconnected": Chromium declares it failed only ~10 s later.
    const waiting = this.state === "live" || this.state === "reconnecting";
    if (waiting && now - this._lastFrameChange > STALL_MS) this._retry("no frames");
  }
}

window.WhepPlayer = WhepPlayer;
window.BurstListener = BurstListener;
window.audioOnItsOwnStream = audioOnItsOwnStream;
window.withoutPlayoutDelay = withoutPlayoutDelay;
window.syncTrim = syncTrim;
window.syncLateMs = syncLateMs;
window.readPixelClock = readPixelClock;
window.readPixelClockLuma = readPixelClockLuma;
window.lowLatency = lowLatency;
window.iceServersFromLinks = iceServersFromLinks;
