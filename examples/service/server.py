#!/usr/bin/env python3
"""A tiny model server for a gpumesh service job; it needs no downloads.

It listens on $GPUMESH_HOST:$GPUMESH_PORT_HTTP (set by the agent) and answers
  GET  /healthz   200 once the model is loaded (503 after POST /unready)
  POST /predict   {"x": [4 numbers]} -> {"y": [...], "replica": ...}
                  ("delay_ms": N in the body answers N ms later: a slower model)
  GET  /stream    server-sent events, one token every 50 ms
On SIGTERM it stops accepting connections and exits once the requests in
flight are answered (the agent sends SIGTERM after routers stopped sending).
The model is a fixed-seed 4-8-2 MLP, in PyTorch when it can be imported
(set SERVE_NO_TORCH=1 to skip it) and in plain Python otherwise.
"""
import json
import os
import random
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = os.environ.get("GPUMESH_HOST", "127.0.0.1")
PORT = int(os.environ.get("GPUMESH_PORT_HTTP", "8080"))
REPLICA = "%s:%d rank %s" % (HOST, PORT, os.environ.get("RANK", "?"))

rng = random.Random(1)
W1 = [[rng.uniform(-1, 1) for _ in range(4)] for _ in range(8)]
W2 = [[rng.uniform(-1, 1) for _ in range(8)] for _ in range(2)]

predict = None
if os.environ.get("SERVE_NO_TORCH") != "1":
    try:
        import torch

        model = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.ReLU(), torch.nn.Linear(8, 2, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor(W1))
            model[2].weight.copy_(torch.tensor(W2))

        def predict(x):
            with torch.no_grad():
                return model(torch.tensor([x], dtype=torch.float32))[0].tolist()
    except ImportError:
        pass
if predict is None:
    def predict(x):
        h = [max(0.0, sum(w * v for w, v in zip(row, x))) for row in W1]
        return [sum(w * v for w, v in zip(row, h)) for row in W2]

ready = threading.Event()
ready.set()
inflight = 0
inflight_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def log_message(self, *args):
        pass

    def handle_one_request(self):
        # Count requests from their first line on (an idle keep-alive
        # connection waiting for one does not count).
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            self.close_connection = True
            return
        global inflight
        with inflight_lock:
            inflight += 1
        try:
            if not self.parse_request():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(501, "unsupported method %r" % self.command)
                return
            method()
            self.wfile.flush()
        finally:
            with inflight_lock:
                inflight -= 1

    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/healthz":
            self.reply(200 if ready.is_set() else 503, {"ready": ready.is_set(), "replica": REPLICA})
        elif self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                data = ("data: token %d\n\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.reply(200, {"replica": REPLICA})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/unready":
            ready.clear()
            self.reply(200, {"ready": False})
            return
        try:
            req = json.loads(body or b"{}")
            x = req.get("x", [0, 0, 0, 0])
            y = predict([float(v) for v in x][:4])
            delay = float(req.get("delay_ms", 0))
            if delay > 0:
                time.sleep(min(delay, 60000) / 1000)
            self.reply(200, {"y": y, "replica": REPLICA})
        except (ValueError, TypeError, AttributeError) as e:
            self.reply(400, {"error": "want {\"x\": [4 numbers]}: %s" % e})


# The listen backlog: socketserver's default of 5 overflows when the
# routers open connections in a burst and this process is slow to accept
# them, and the kernel then resets some after they were written to.
ThreadingHTTPServer.request_queue_size = 256
server = ThreadingHTTPServer((HOST, PORT), Handler)
server.daemon_threads = True
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
server.socket.close()  # no new connections
while True:  # answer what is in flight, then go (idle keep-alive connections do not hold us)
    with inflight_lock:
        if inflight == 0:
            break
    time.sleep(0.01)
