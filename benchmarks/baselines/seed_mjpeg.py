"""Baseline: MJPEG over HTTP the way the seed system served it.

A threaded ``http.server``, one capture thread, one condition variable: each
client's thread waits on the condition and writes every frame it is woken
for. Same source as camrelay's test pattern (real JPEGs with the pixel clock).

    python -m benchmarks.baselines.seed_mjpeg --port 8091 --size 1280x720 --fps 30
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from benchmarks.baselines import arguments
from relay.camera.testpattern import PatternRenderer
from relay.source import parse_size


class Camera:
    def __init__(self, width: int, height: int, fps: float) -> None:
        self.cond = threading.Condition()
        self.frame: bytes | None = None
        self.frames = 0
        threading.Thread(target=self._run, args=(width, height, fps), daemon=True).start()

    def _run(self, width: int, height: int, fps: float) -> None:
        renderer = PatternRenderer(width, height)
        t0 = time.monotonic()
        while True:
            self.frames += 1
            delay = t0 + self.frames / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            jpeg = renderer.jpeg(int(time.time() * 1000))
            with self.cond:
                self.frame = jpeg
                self.cond.notify_all()


def make_handler(camera: Camera):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet, like the seed with logging off
            pass

        def do_GET(self) -> None:
            if self.path == "/api/v1/streams":
                body = json.dumps({"streams": [{"name": "cam0", "frames_encoded": camera.frames}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if self.path != "/mjpeg/cam0":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            try:
                while True:
                    with camera.cond:
                        camera.cond.wait()
                        frame = camera.frame
                    self.wfile.write(
                        b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                        + str(len(frame)).encode()
                        + b"\r\n\r\n"
                        + frame
                        + b"\r\n"
                    )
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


if __name__ == "__main__":
    ap = arguments(__doc__)
    args = ap.parse_args()
    w, h = parse_size(args.size)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(Camera(w, h, args.fps)))
    server.daemon_threads = True
    server.serve_forever()
